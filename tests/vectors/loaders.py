"""Known-answer vectors are data: one generic loader per format, nothing per algorithm.

- ``load_nist(path)``: the NIST CAVP / IEEE 1619 ``KEY = value`` text format shipped in
  the ``cryptography-vectors`` package (``.rsp`` and ``.txt``): ``#`` comments,
  ``[ENCRYPT]``/``[DECRYPT]`` sections, ``[Keylen = 128]`` parameter headers, entries
  separated by blank lines, and a bare ``FAIL`` line marking an entry that must not
  verify.
- ``load_wycheproof(name)``: a Wycheproof JSON file, read unmodified from
  ``../shared/vectors/wycheproof/`` next to the project.

Paths are resolved from this file, never from the working directory, so the suite and
``scripts/vector_report.py`` find the same files wherever they are started from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography_vectors

PROJECT_ROOT = next(p for p in Path(__file__).resolve().parents
                    if (p / "pyproject.toml").is_file())
NIST_ROOT = Path(cryptography_vectors.__file__).resolve().parent


def wycheproof_dir() -> Path:
    """``../shared/vectors/wycheproof`` beside the project (``$CRYPTOPLANE_WYCHEPROOF``
    overrides). Missing vectors are an error, never a skip."""
    env = os.environ.get("CRYPTOPLANE_WYCHEPROOF")
    candidates = [Path(env)] if env else []
    candidates += [PROJECT_ROOT.parent / "shared" / "vectors" / "wycheproof",
                   PROJECT_ROOT / "shared" / "vectors" / "wycheproof"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "Wycheproof vectors not found; looked in " + ", ".join(str(c) for c in candidates))


# -- NIST CAVP / IEEE 1619 ------------------------------------------------------------------

@dataclass(frozen=True)
class NistVector:
    """One entry. ``fields`` keys are lowercased (``key``, ``iv``, ``pt``, ``count``...);
    ``params`` holds the bracketed headers in force (``keylen``, ``taglen``...)."""

    path: str
    line: int
    section: str  # "ENCRYPT", "DECRYPT" or "" when the file has no such header
    params: dict[str, str]
    fields: dict[str, str]
    fail: bool = False

    def __getitem__(self, name: str) -> str:
        return self.fields[name]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)

    def hex(self, name: str) -> bytes:
        """A hex field as bytes (an empty value is b"")."""
        return bytes.fromhex(self.fields[name])

    @property
    def ident(self) -> str:
        count = self.fields.get("count", "?")
        where = f"[{self.section}] " if self.section else ""
        return f"{where}COUNT={count} (line {self.line})"


def parse_nist(lines: Iterator[str] | list[str], path: str = "<text>") -> list[NistVector]:
    vectors: list[NistVector] = []
    section = ""
    params: dict[str, str] = {}
    entry: dict[str, str] = {}
    fail = False
    start = 0

    def flush() -> None:
        nonlocal entry, fail
        if entry:
            vectors.append(NistVector(path, start, section, dict(params), entry, fail))
        entry, fail = {}, False

    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            flush()
            inner = line[1:-1].strip()
            if "=" in inner:
                name, _, value = inner.partition("=")
                params[name.strip().lower()] = value.strip()
            else:
                section = inner.upper()
            continue
        if not entry and not fail:
            start = lineno
        if "=" in line:
            name, _, value = line.partition("=")
            entry[name.strip().lower()] = value.strip()
        elif line.upper() == "FAIL":
            fail = True
        else:
            raise ValueError(f"{path}:{lineno}: cannot parse {line!r}")
    flush()
    return vectors


def load_nist(relpath: str) -> list[NistVector]:
    """Entries of ``relpath`` inside the ``cryptography-vectors`` package."""
    with cryptography_vectors.open_vector_file(relpath, "r") as f:
        return parse_nist(f, relpath)


# -- Wycheproof -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WycheproofCase:
    """One Wycheproof test with the group it belongs to (keys and sizes live there)."""

    group: dict[str, Any]
    test: dict[str, Any]

    @property
    def tc_id(self) -> int:
        return int(self.test["tcId"])

    @property
    def result(self) -> str:
        return str(self.test["result"])

    @property
    def ident(self) -> str:
        comment = self.test.get("comment") or ""
        return f"tcId {self.tc_id}" + (f" ({comment})" if comment else "")

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.test[name])


@dataclass(frozen=True)
class WycheproofFile:
    name: str
    algorithm: str
    number_of_tests: int
    cases: list[WycheproofCase]


def load_wycheproof(name: str) -> WycheproofFile:
    with open(wycheproof_dir() / name, encoding="utf-8") as f:
        data = json.load(f)
    cases = [WycheproofCase(group, test)
             for group in data["testGroups"] for test in group["tests"]]
    return WycheproofFile(name, data["algorithm"], int(data["numberOfTests"]), cases)
