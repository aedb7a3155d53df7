"""``openssl speed`` for the yardstick: the command for a cell, run once per command, its
output parsed. Knows nothing of the plane, so ``speed`` stays about measuring it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess

# `openssl speed` positional names for the signature schemes (it has no PSS: its RSA
# figure is PKCS#1 v1.5, whose cost is the same private-key operation)
OPENSSL_SIGNERS = {"rsa-pss-sha256": "rsa2048", "rsa-pkcs1v15-sha256": "rsa2048",
                   "ecdsa-p256-sha256": "ecdsap256", "ecdsa-p384-sha384": "ecdsap384",
                   "ed25519": "ed25519"}

# (figure or None, note or None): MB/s or ops/s, as the cell counts
Figure = tuple[float | None, str | None]


def openssl_args(algorithm: str, size: int) -> tuple[list[str], list[str]]:
    """(options, positional names) for ``openssl speed`` measuring the same thing."""
    if algorithm in OPENSSL_SIGNERS:
        return [], [OPENSSL_SIGNERS[algorithm]]
    if algorithm.startswith("hmac-"):
        return ["-hmac", algorithm.removeprefix("hmac-"), "-bytes", str(size)], []
    return ["-evp", algorithm, "-bytes", str(size)], []


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_openssl_bytes(text: str, name: str) -> float:
    """Bytes/s from an ``openssl speed -evp/-hmac ... -bytes N`` report: the row named
    after the algorithm (``AES-256-GCM``, ``sha256``, ``hmac(sha256)``), figures in
    1000s of bytes per second with a trailing ``k``."""
    rows = [m for m in (re.match(r"^\s*(\S.*?)\s+((?:[\d.]+k\s*)+)$", line)
                        for line in text.splitlines()) if m is not None]
    want = _norm(name)
    named = [m for m in rows if _norm(m.group(1)) in (want, f"hmac{want}")]
    chosen = named or (rows if len(rows) == 1 else [])
    if not chosen:
        raise ValueError(f"no {name!r} row in openssl's output")
    return float(chosen[0].group(2).split()[-1].rstrip("k")) * 1e3


def parse_openssl_signatures(text: str) -> dict[str, float]:
    """{"sign": ops/s, "verify": ops/s} from ``openssl speed rsa2048|ecdsap256|ed25519``.

    The header names the columns (``sign verify sign/s verify/s``; newer OpenSSL adds
    encrypt/decrypt columns), so the figures are read by name from the row's tail."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = line.split()
        if "sign/s" not in header:
            continue
        for row in lines[i + 1:]:
            values = row.split()[-len(header):]
            try:
                figures = {h: float(v.rstrip("s")) for h, v in zip(header, values, strict=True)}
            except ValueError:
                continue
            return {"sign": figures["sign/s"], "verify": figures.get("verify/s", math.nan)}
    raise ValueError("no sign/s row in openssl's output")


class OpenSSLSpeed:
    """Runs the system's ``openssl speed`` for cells; one run serves every cell it
    measures (rsa2048 gives sign and verify)."""

    def __init__(self, seconds: float) -> None:
        self.exe = shutil.which("openssl")
        # openssl takes whole seconds; -elapsed: wall-clock time, as ours is (its default
        # divides by user CPU time, which a busy shared machine does not take away)
        self.seconds = max(1, round(seconds))
        self._cache: dict[tuple[str, ...], dict[str, float] | str] = {}

    def command(self, algorithm: str, size: int) -> list[str]:
        opts, names = openssl_args(algorithm, size)
        return [self.exe or "openssl", "speed", "-elapsed", "-seconds", str(self.seconds),
                *opts, *names]

    def figure(self, algorithm: str, op: str, size: int, by_bytes: bool) -> Figure:
        """MB/s (``by_bytes``) or ``op``/s, and a note (why none, or how it was taken)."""
        if self.exe is None:
            return None, "unavailable: no openssl on PATH"
        cmd = self.command(algorithm, size)
        got = self._cache.get(tuple(cmd))
        if got is None:
            got = self._cache[tuple(cmd)] = self._run(cmd, algorithm, by_bytes)
        if isinstance(got, str):
            return None, got
        if by_bytes:
            return got["bytes"] / 1e6, None
        note = ("openssl speed signs with PKCS#1 v1.5 (it has no PSS)"
                if algorithm.startswith("rsa-pss") else None)
        return got[op], note

    def _run(self, cmd: list[str], algorithm: str, by_bytes: bool) -> dict[str, float] | str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  timeout=self.seconds * 4 + 30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {' '.join(cmd[1:])}: {e}"
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode != 0:
            return f"unavailable: {' '.join(cmd[1:])} exited {proc.returncode}: {tail}"
        try:
            if by_bytes:
                return {"bytes": parse_openssl_bytes(proc.stdout,
                                                     algorithm.removeprefix("hmac-"))}
            return parse_openssl_signatures(proc.stdout)
        except ValueError as e:
            return f"unavailable: cannot parse {' '.join(cmd[1:])}: {e}"


def system_openssl() -> str | None:
    exe = shutil.which("openssl")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out or None
