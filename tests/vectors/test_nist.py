"""NIST CAVP (AES-GCM, AES-CTR, AES-CBC) and IEEE 1619 (AES-XTS) known answers from the
``cryptography-vectors`` package: one case per file, every entry in both directions."""

from __future__ import annotations

import kat
import loaders
import pytest

import cryptoplane as cp


@pytest.mark.parametrize("relpath", list(kat.NIST_FILES))
def test_nist_file(plane: cp.Plane, relpath: str) -> None:
    t = kat.check_nist(plane, relpath)
    assert t.ok, kat.failure_report(t)
    assert t.valid > 0, f"{relpath}: no vector was expressible through the API"


def test_loader_reads_sections_parameters_and_fail_markers() -> None:
    text = """# comment
[Keylen = 128]
[Taglen = 96]

Count = 0
Key = 00ff
PT =

Count = 1
Key = 0102
FAIL
[DECRYPT]

COUNT = 2
KEY = AB
""".splitlines()
    a, b, c = loaders.parse_nist(text, "mem")
    assert (a.section, a.params, a.fields) == (
        "", {"keylen": "128", "taglen": "96"}, {"count": "0", "key": "00ff", "pt": ""})
    assert a.hex("key") == b"\x00\xff" and a.hex("pt") == b"" and not a.fail
    assert b.fail and b["count"] == "1" and b.line == 9
    assert (c.section, c.hex("key"), c.params["taglen"]) == ("DECRYPT", b"\xab", "96")
    assert c.ident == "[DECRYPT] COUNT=2 (line 14)"
