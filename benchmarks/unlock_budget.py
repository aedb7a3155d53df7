"""How long one wrong passphrase costs on the worst header the KDF caps accept.

Builds, for LUKS1 and LUKS2, a header whose every keyslot asks for the largest KDF work
one keyslot may ask for, with a volume-key digest at its own maximum (LUKS2: 32
keyslots; LUKS1: 8), then times ``luks.unlock`` with a wrong passphrase. The keyslots
are sealed with a stand-in KDF (building 40 maximal keyslots for real would take a
quarter of an hour); the timed unlock runs the real one. ``kdf.Limits`` says the budget;
this is the measurement behind it.

    python benchmarks/unlock_budget.py            # both versions, ~1 minute
    python benchmarks/unlock_budget.py --version 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptoplane.volume import kdf, luks, luks1, luks2
from cryptoplane.volume.errors import KdfLimitExceeded, WrongPassphrase


@contextlib.contextmanager
def stand_in_kdf(spent: list[float] | None = None) -> Iterator[None]:
    """``kdf.derive`` replaced by a cheap deterministic function of its inputs, which
    checks the parameters and records each derivation's cost in ``spent``."""
    real = kdf.derive

    def derive(params: kdf.KdfParams, passphrase: bytes, salt: bytes, length: int,
               limits: kdf.Limits | None = None) -> bytes:
        kdf.check(params, limits)
        if spent is not None:
            spent.append(kdf.cost(params, limits))
        seed = hashlib.sha512(repr(params).encode() + passphrase + salt).digest()
        return (seed * (length // 64 + 1))[:length]

    kdf.derive = derive  # type: ignore[assignment]
    try:
        yield
    finally:
        kdf.derive = real  # type: ignore[assignment]


def worst_header(path: Path, version: int) -> None:
    """A volume at ``path`` whose keyslots and digest all ask for the per-slot maximum."""
    # a 64-byte keyslot key takes two SHA-256 blocks per iteration: half the iterations
    # are the per-slot maximum
    most = kdf.LIMITS.pbkdf2_work // 2
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    with stand_in_kdf():
        luks.format(path, b"slot 0", version=version, kdf="pbkdf2",
                    kdf_params={"iterations": most})
        slots = 8 if version == 1 else 32
        for i in range(1, slots):
            luks.add_key(path, passphrase=b"slot 0", new_passphrase=b"slot %d" % i,
                         kdf="pbkdf2", kdf_params={"iterations": most})
    _max_digest(path, version, kdf.LIMITS.digest_work)


def _max_digest(path: Path, version: int, iterations: int) -> None:
    blob = path.read_bytes()[:luks2.READ_SIZE]
    with open(path, "r+b") as f:
        if version == 1:
            h = luks1.decode(blob)
            f.write(luks1.encode(_replace(h, mk_digest_iterations=iterations)))
            return
        h2 = luks2.decode(blob)
        meta = h2.metadata
        digests = {i: _replace(d, iterations=iterations) for i, d in meta.digests.items()}
        new = h2.replace(metadata=_replace(meta, digests=digests), seqid=h2.seqid + 1)
        f.write(luks2.encode_copy(new, False))
        f.seek(h2.hdr_size)
        f.write(luks2.encode_copy(new, True))


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses
    return dataclasses.replace(obj, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", type=int, choices=(1, 2), action="append")
    args = ap.parse_args()
    limits = kdf.LIMITS
    print(f"budget: {limits.total_work} units of {limits.pbkdf2_work:,} PBKDF2-SHA256 "
          f"iterations or {limits.argon2_work_kib // (1 << 20)} GiB x passes of Argon2")
    t0 = time.perf_counter()
    kdf.derive(kdf.Pbkdf2("sha256", 2_000_000), b"x", b"salt" * 8, 32)
    rate = 2_000_000 / (time.perf_counter() - t0)
    print(f"PBKDF2-SHA256 here: {rate / 1e6:.2f}M iterations/s, so one unit ~ "
          f"{limits.pbkdf2_work / rate:.1f} s and the budget ~ "
          f"{limits.total_work * limits.pbkdf2_work / rate:.1f} s")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for version in args.version or (1, 2):
            img = Path(tmp) / f"worst-luks{version}.img"
            worst_header(img, version)
            t0 = time.perf_counter()
            try:
                luks.unlock(img, passphrase=b"not any of them")
            except (WrongPassphrase, KdfLimitExceeded) as e:
                outcome = f"{type(e).__name__}: {e}"
            else:
                outcome = "opened (?)"
            print(f"LUKS{version}, worst header: one wrong passphrase took "
                  f"{time.perf_counter() - t0:.1f} s ({outcome})")


if __name__ == "__main__":
    main()
