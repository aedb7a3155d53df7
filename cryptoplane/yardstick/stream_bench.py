"""``cryptoplane stream bench``: age-format file encryption beside ``age`` and ``openssl``.

One run makes a random file in a RAM-backed directory (so the disk is not measured),
then times, interleaved round by round after one untimed warm-up round: cryptoplane
encrypt and decrypt with one worker and with every core, the ``age`` CLI (the target:
ratios against it), and ``openssl enc -aes-256-ctr`` (an unauthenticated baseline: how
fast a bare cipher moves the same file through the same page cache). Each figure is the
median over the rounds; the spread (slowest / fastest) says how noisy the machine was.
Every output is checked once: each tool's encryption decrypts back to the input, and age
decrypts cryptoplane's file.
Beside the wall-clock figures it reports the CPU time (user + system) of each run: on a
machine shared with other work, the ratio of CPU times says how much work per byte each
tool does, which the load distorts far less than it distorts throughput.

cryptoplane goes through ``cryptoplane.stream.encrypt``/``decrypt`` when that API exists;
otherwise it writes the same age file itself (header from ``recipients.build_header``,
16-byte nonce, ``payload.seal_payload``) and the row says "(payload)".
"""

from __future__ import annotations

import filecmp
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cryptoplane.exceptions import CryptoplaneError
from cryptoplane.stream import payload as pl
from cryptoplane.stream import recipients as rc
from cryptoplane.stream.header import decode_header

__all__ = ["BenchError", "BenchReport", "BenchRow", "run_bench"]

_NONCE = 16


class BenchError(CryptoplaneError):
    """The bench cannot run: a tool is missing or a run failed."""


@dataclass
class BenchRow:
    op: str                  # "encrypt" or "decrypt"
    tool: str                # "cryptoplane", "age", "openssl aes-256-ctr"
    workers: int | None      # cryptoplane's threads; None for the external tools
    mb_s: float              # median throughput, 10**6 bytes/s
    spread: float            # slowest / fastest round
    vs_age: float | None     # mb_s / age's mb_s for the same op
    command: str
    seconds: list[float] = field(default_factory=list)
    cpu_s: float = 0.0             # median CPU seconds (user + system) per run
    cpu_vs_age: float | None = None  # age's CPU seconds / these: work per byte vs age

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Case:
    op: str
    tool: str
    workers: int | None
    command: str
    run: Callable[[], None]
    output: Path
    in_process: bool = False
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (Debian: apt-get install {name})")
    return path


def _shell(argv: Sequence[str]) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run(list(argv), capture_output=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed: "
                             f"{done.stderr.decode(errors='replace').strip()}")
    return run


def _random_file(path: Path, size: int) -> None:
    block = 1 << 20
    with path.open("wb") as f:
        left = size
        while left:
            f.write(os.urandom(min(block, left)))
            left -= min(block, left)


class _Cryptoplane:
    """Encrypt to / decrypt from an age file, through the stream API where it exists."""

    def __init__(self, recipient: str, identity_text: str) -> None:
        import cryptoplane.stream as stream  # the package's API may not exist yet

        self.recipient = rc.X25519Recipient.parse(recipient)
        self.identities = rc.parse_identities(identity_text)
        self._api_encrypt = getattr(stream, "encrypt", None)
        self._api_decrypt = getattr(stream, "decrypt", None)
        self.via_api = self._api_encrypt is not None and self._api_decrypt is not None

    def encrypt(self, src: Path, dst: Path, workers: int) -> None:
        if self.via_api and self._api_encrypt is not None:
            self._api_encrypt(src, dst, recipients=[self.recipient], workers=workers)
            return
        file_key = os.urandom(16)
        nonce = os.urandom(_NONCE)
        header = rc.build_header([self.recipient], file_key)
        with src.open("rb", buffering=0) as s, dst.open("wb", buffering=0) as d:
            d.write(header.encode() + nonce)
            pl.seal_payload(rc.payload_key(file_key, nonce), s, d, workers=workers)

    def decrypt(self, src: Path, dst: Path, workers: int) -> None:
        if self.via_api and self._api_decrypt is not None:
            self._api_decrypt(src, dst, identities=self.identities, workers=workers)
            return
        with src.open("rb", buffering=0) as s, dst.open("wb", buffering=0) as d:
            head = s.read(64 << 10)
            header, rest = decode_header(head)
            file_key = rc.unwrap_file_key(header, self.identities)
            if file_key is None:
                raise BenchError("the bench identity does not open its own file")
            s.seek(len(head) - len(rest) + _NONCE)
            key = rc.payload_key(file_key, rest[:_NONCE])
            pl.open_payload(key, s, d, workers=workers)


def _cases(work: Path, plain: Path, all_cores: int) -> list[_Case]:
    age, keygen, openssl = _tool("age"), _tool("age-keygen"), _tool("openssl")
    key_file = work / "bench.key"
    subprocess.run([keygen, "-o", str(key_file)], capture_output=True, check=True)
    recipient = subprocess.run([keygen, "-y", str(key_file)], capture_output=True,
                               check=True, text=True).stdout.strip()
    ours = _Cryptoplane(recipient, key_file.read_text())
    how = "" if ours.via_api else " (payload)"
    key_hex, iv_hex = os.urandom(32).hex(), os.urandom(16).hex()
    cases: list[_Case] = []
    workers = sorted({1, all_cores})
    for w in workers:
        out = work / f"cp{w}.age"
        cases.append(_Case("encrypt", f"cryptoplane{how}", w,
                           f"cryptoplane encrypt -r {recipient} -o {out} {plain} "
                           f"(workers={w})", partial(ours.encrypt, plain, out, w), out,
                           in_process=True))
    age_out = work / "age.age"
    age_enc = [age, "-r", recipient, "-o", str(age_out), str(plain)]
    cases.append(_Case("encrypt", "age", None, shlex.join(age_enc), _shell(age_enc),
                       age_out))
    ossl_out = work / "openssl.ctr"
    ossl_enc = [openssl, "enc", "-aes-256-ctr", "-K", key_hex, "-iv", iv_hex, "-in",
                str(plain), "-out", str(ossl_out)]
    cases.append(_Case("encrypt", "openssl aes-256-ctr", None, shlex.join(ossl_enc),
                       _shell(ossl_enc), ossl_out))
    for w in workers:
        src, out = work / f"cp{w}.age", work / f"cp{w}.dec"
        cases.append(_Case("decrypt", f"cryptoplane{how}", w,
                           f"cryptoplane decrypt -i {key_file} -o {out} {src} "
                           f"(workers={w})",
                           partial(ours.decrypt, src, out, w), out, in_process=True))
    age_dec_out = work / "age.dec"
    age_dec = [age, "-d", "-i", str(key_file), "-o", str(age_dec_out), str(age_out)]
    cases.append(_Case("decrypt", "age", None, shlex.join(age_dec), _shell(age_dec),
                       age_dec_out))
    ossl_dec_out = work / "openssl.dec"
    ossl_dec = [openssl, "enc", "-d", "-aes-256-ctr", "-K", key_hex, "-iv", iv_hex, "-in",
                str(ossl_out), "-out", str(ossl_dec_out)]
    cases.append(_Case("decrypt", "openssl aes-256-ctr", None, shlex.join(ossl_dec),
                       _shell(ossl_dec), ossl_dec_out))
    return cases


def _interop(work: Path, plain: Path, workers: int) -> None:
    """age decrypts cryptoplane's file back to the input."""
    out = work / "interop.dec"
    _shell([_tool("age"), "-d", "-i", str(work / "bench.key"), "-o", str(out),
            str(work / f"cp{workers}.age")])()
    if not filecmp.cmp(plain, out, shallow=False):
        raise BenchError("age did not decrypt cryptoplane's file back to the input")
    out.unlink()


def _rows(cases: list[_Case], size: int) -> list[BenchRow]:
    rows = []
    age_rate = {c.op: size / 1e6 / statistics.median(c.seconds) for c in cases
                if c.tool == "age"}
    age_cpu = {c.op: statistics.median(c.cpu) for c in cases if c.tool == "age"}
    for c in cases:
        rate = size / 1e6 / statistics.median(c.seconds)
        cpu = statistics.median(c.cpu)
        rows.append(BenchRow(c.op, c.tool, c.workers, round(rate, 1),
                             round(max(c.seconds) / min(c.seconds), 2),
                             round(rate / age_rate[c.op], 2) if c.op in age_rate else None,
                             c.command, [round(s, 4) for s in c.seconds], round(cpu, 3),
                             round(age_cpu[c.op] / cpu, 2) if c.op in age_cpu and cpu
                             else None))
    return rows


def _cpu(in_process: bool) -> float:
    """CPU seconds (user + system) so far of this process, or of its waited children."""
    r = resource.getrusage(resource.RUSAGE_SELF if in_process else resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class BenchReport:
    """What a run measured, for the CLI to render: the rows, and the conditions."""

    rows: list[BenchRow]
    size: int
    workdir: str
    rounds: int
    load: tuple[float, float]  # load average before and after


def run_bench(size_bytes: int, workdir: str = "/dev/shm", rounds: int = 3) -> BenchReport:
    """Measure and return the rows (nothing is printed: ``cli/stream_bench`` renders)."""
    if rounds < 1:
        raise BenchError("rounds must be at least 1")
    all_cores = max(1, len(os.sched_getaffinity(0)))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cryptoplane-stream-bench-",
                                     dir=workdir) as tmp:
        work = Path(tmp)
        plain = work / "plain.bin"
        _random_file(plain, size_bytes)
        cases = _cases(work, plain, all_cores)
        # round 0 is a warm-up, not counted: the first writes to fresh memory cost several
        # times more here (the VM's memory is touched for the first time)
        for warm_up in [True] + [False] * rounds:
            for case in cases:
                case.output.unlink(missing_ok=True)  # every tool writes a new file
                cpu = _cpu(case.in_process)
                start = time.perf_counter()
                case.run()
                if not warm_up:
                    case.seconds.append(time.perf_counter() - start)
                    case.cpu.append(_cpu(case.in_process) - cpu)
        for case in cases:
            if case.op == "decrypt" and not filecmp.cmp(plain, case.output, shallow=False):
                raise BenchError(f"{case.tool} did not decrypt back to the input")
        _interop(work, plain, all_cores)
    return BenchReport(_rows(cases, size_bytes), size_bytes, workdir, rounds,
                       (load_before, os.getloadavg()[0]))
