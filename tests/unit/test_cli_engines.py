from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from cryptoplane.cli.main import cli
from cryptoplane.engines import REGISTRY

ROOT = Path(__file__).resolve().parents[2]


def test_engines_json_lists_self_tests() -> None:
    result = CliRunner().invoke(cli, ["engines", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    names = [e["name"] for e in info["engines"]]
    assert names == list(REGISTRY)
    inline = info["engines"][0]
    assert inline["self_tests"]["aes-256-gcm"] == {"passed": True, "detail": ""}
    assert "rsa-pss-sha256" in inline["algorithms"]
    assert info["sector_kernel"]["backend"] in ("native", "python")


def test_engines_table() -> None:
    result = CliRunner().invoke(cli, ["engines", "--engine", "inline"])
    assert result.exit_code == 0, result.output
    assert "aes-256-xts" in result.output and "passed" in result.output


def test_unknown_engine_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["engines", "--engine", "gpu"])
    assert result.exit_code == 2
    assert "unknown engine" in result.output


def test_readme_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    exec(compile(block.group(1), "README example", "exec"), {})


def test_readme_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    text = (ROOT / "README.md").read_text()
    assert "scripts/run" in text and "scripts/test" in text
    assert "exec scripts/test" in (ROOT / ".ci/run").read_text()
