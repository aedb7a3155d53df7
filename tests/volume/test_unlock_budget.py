"""Issue 14, acceptance 4: whatever the passphrase, one unlock of the worst header the
caps accept spends at most ``kdf.Limits.total_work`` (keyslot KDFs and volume-key digest
checks together), for LUKS1 and LUKS2. Work is counted with a stand-in KDF, so the test
takes a second; ``python benchmarks/unlock_budget.py`` times the same headers for real."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cryptoplane.volume import kdf, luks
from cryptoplane.volume.errors import KdfLimitExceeded, WrongPassphrase

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "unlock_budget.py"
_spec = importlib.util.spec_from_file_location("unlock_budget", _BENCH)
assert _spec is not None and _spec.loader is not None
budget = importlib.util.module_from_spec(_spec)
sys.modules["unlock_budget"] = budget
_spec.loader.exec_module(budget)


@pytest.mark.parametrize("version", [1, 2])
def test_the_worst_header_costs_at_most_the_budget(tmp_path: Path, version: int) -> None:
    img = tmp_path / "worst.img"
    budget.worst_header(img, version)
    spent: list[float] = []
    with budget.stand_in_kdf(spent):
        for call in (lambda: luks.unlock(img, passphrase=b"wrong"),
                     lambda: luks.test_passphrase(img, passphrase=b"wrong"),
                     lambda: luks.add_key(img, passphrase=b"wrong", new_passphrase=b"x",
                                          kdf="pbkdf2", kdf_params={"iterations": 1000})):
            spent.clear()
            with pytest.raises((WrongPassphrase, KdfLimitExceeded)):
                call()
            # the digest checks were counted: each slot tried cost two derivations
            assert len(spent) >= 2 and spent[1] == pytest.approx(0.25)
            assert sum(spent) <= kdf.LIMITS.total_work


def test_a_digest_over_the_limit_skips_the_slot(tmp_path: Path) -> None:
    img = tmp_path / "digest.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    with budget.stand_in_kdf():
        luks.format(img, b"pw", kdf="pbkdf2", kdf_params={"iterations": 1000})
    budget._max_digest(img, 2, kdf.LIMITS.digest_work + 1)
    spent: list[float] = []
    with budget.stand_in_kdf(spent), pytest.raises(KdfLimitExceeded, match="iterations"):
        luks.unlock(img, passphrase=b"pw")
    assert spent == []  # refused before any work
