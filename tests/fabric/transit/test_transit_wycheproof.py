"""Wycheproof AEAD vectors through transit: each 256-bit key with a 96-bit nonce and a
128-bit tag is imported (BYOK) and each vector's ciphertext, framed as a transit blob,
decrypts to its message, or fails authentication when the vector is invalid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import support
from transitkit import TENANT

from cryptoplane.exceptions import AuthenticationFailed
from cryptoplane.fabric.transit import Transit, pack_ciphertext, wrap_for_import

VECTORS = Path(__file__).resolve().parents[4] / "shared" / "vectors" / "wycheproof"


def _cases(file: str) -> list[dict[str, Any]]:
    path = VECTORS / file
    if not path.exists():
        return []
    out = []
    for group in json.loads(path.read_text())["testGroups"]:
        if group["keySize"] == 256 and group["ivSize"] == 96 and group["tagSize"] == 128:
            out += group["tests"]
    return out


@pytest.mark.parametrize(("file", "kt"), [("aes_gcm_test.json", "aes256-gcm96"),
                                          ("chacha20_poly1305_test.json",
                                           "chacha20-poly1305")])
def test_wycheproof_decrypts(transit: Transit, file: str, kt: str) -> None:
    cases = _cases(file)
    if not cases:
        support.unavailable(f"Wycheproof's {file} (../shared/vectors/wycheproof/)")
    pem = transit.wrapping_key(TENANT)
    names: dict[str, str] = {}
    checked = 0
    for case in cases:
        key = case["key"]
        if key not in names:
            names[key] = f"w{len(names)}"
            transit.import_key(TENANT, names[key], kt,
                               wrap_for_import(pem, bytes.fromhex(key)))
        blob = pack_ciphertext(1, bytes.fromhex(case["iv"]),
                               bytes.fromhex(case["ct"] + case["tag"]))
        aad = bytes.fromhex(case["aad"])
        if case["result"] == "valid":
            assert transit.decrypt(TENANT, names[key], blob, aad=aad) == bytes.fromhex(
                case["msg"]), case["tcId"]
        else:
            with pytest.raises(AuthenticationFailed):
                transit.decrypt(TENANT, names[key], blob, aad=aad)
        checked += 1
    assert checked > 20
