"""PyKMIP's server as a peer to measure against: ``cryptoplane remote-speed`` runs it on
loopback and times the same operations through ``kmip.pie.client.ProxyKmipClient``.

PyKMIP's server and client run as subprocesses (this module run as a script), so nothing
of PyKMIP is imported into cryptoplane's process and the client does not share its core's
GIL with the command. The interpreter: ``$CRYPTOPLANE_KMIP_PYTHON``, else ``.venv-kmip``
where ``scripts/setup.sh`` had to make one (PyKMIP needing another ``cryptography``),
else this one (setup.sh installs PyKMIP 0.11 into ``.venv`` with ``cryptography`` held at
48.x, which it works with).

PyKMIP requires TLS with client certificates (its session refuses a client certificate
without the clientAuth extended key usage): a CA, a server and a client certificate are
made in a temporary directory, with the server's SQLite database and its log, and all of
it is removed afterwards, the server stopped (SIGTERM, then SIGKILL) whatever happened.

The measured operations are what FABRIC.md's earlier figures counted: AES-256-GCM
encrypts of 64 bytes (a 16-byte tag) and RSA-2048 signs (PSS, SHA-256), one request at a
time on one connection, for a fixed duration each.

This file imports only the standard library at its top, because the same file is the
script run under PyKMIP's interpreter (``python kmip_peer.py server|client ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_PYTHON = "CRYPTOPLANE_KMIP_PYTHON"
READY_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class KmipFigures:
    """What one run of PyKMIP's server measured, per operation: ops/s and the seconds
    each took (mean) and the p50/p99 of single calls."""

    encrypt_ops_s: float
    encrypt_count: int
    encrypt_p50_ms: float
    encrypt_p99_ms: float
    sign_ops_s: float
    sign_count: int
    sign_p50_ms: float
    sign_p99_ms: float
    python: str
    pykmip: str
    cryptography: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class KmipUnavailable(RuntimeError):
    """No interpreter that can import PyKMIP was found (or its server did not start)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def kmip_python() -> str:
    """The interpreter that runs PyKMIP: ``$CRYPTOPLANE_KMIP_PYTHON``, the checkout's
    ``.venv-kmip``, or this one if it imports ``kmip``; ``KmipUnavailable`` otherwise."""
    named = os.environ.get(ENV_PYTHON)
    candidates = [named] if named else []
    candidates.append(str(repo_root() / ".venv-kmip" / "bin" / "python"))
    candidates.append(sys.executable)
    for python in candidates:
        if python and os.access(python, os.X_OK) and subprocess.run(
                [python, "-c", "import kmip.pie.client"], capture_output=True,
                timeout=60, check=False).returncode == 0:
            return python
    raise KmipUnavailable("PyKMIP is not installed: run scripts/setup.sh (it makes "
                          ".venv-kmip) or set CRYPTOPLANE_KMIP_PYTHON")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_certificates(folder: Path, client_cn: str = "cryptoplane-bench") -> dict[str, Path]:
    """A CA and, signed by it, a server certificate for 127.0.0.1 (serverAuth) and a
    client certificate (clientAuth), as PEM files in ``folder``: ``ca``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("cryptoplane bench CA"))
          .issuer_name(name("cryptoplane bench CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier,
             ip: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if ip:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, True)
    client, client_key = leaf(client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, False)
    files = {"ca": folder / "ca.pem", "server_cert": folder / "server.pem",
             "server_key": folder / "server.key", "client_cert": folder / "client.pem",
             "client_key": folder / "client.key"}
    pem = serialization.Encoding.PEM
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["server_cert"].write_bytes(server.public_bytes(pem))
    files["client_cert"].write_bytes(client.public_bytes(pem))
    for path, key in ((files["server_key"], server_key), (files["client_key"], client_key)):
        path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return files


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM, a grace period, then SIGKILL, for ``proc`` and its process group."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def kmip_server(python: str | None = None, cpu: int | None = None) -> Iterator[dict[str, Any]]:
    """PyKMIP's server on loopback, started in a temporary directory and stopped on exit.
    Yields what a client needs: ``python``, ``port``, the certificate paths and ``dir``.
    ``cpu`` pins the server to one core (``taskset``), where ``taskset`` exists."""
    python = python or kmip_python()
    folder = Path(tempfile.mkdtemp(prefix="cryptoplane-kmip-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        certs = make_certificates(folder)
        port = free_port()
        config = folder / "server.conf"
        config.write_text(
            "[server]\nhostname=127.0.0.1\n"
            f"port={port}\ncertificate_path={certs['server_cert']}\n"
            f"key_path={certs['server_key']}\nca_path={certs['ca']}\n"
            "auth_suite=TLS1.2\nenable_tls_client_auth=True\nlogging_level=WARNING\n"
            f"database_path={folder / 'pykmip.db'}\n")
        ready = folder / "ready"
        argv = [python, str(Path(__file__).resolve()), "server", str(config),
                str(folder / "server.log"), str(ready)]
        if cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu), *argv]
        with (folder / "server.out").open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=folder)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (folder / "server.out").read_text(errors="replace")[-2000:]
                raise KmipUnavailable(f"PyKMIP's server did not start: {tail}")
            time.sleep(0.05)
        yield {"python": python, "port": port, "dir": str(folder),
               **{k: str(v) for k, v in certs.items()}}
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def measure(duration: float = 2.0, python: str | None = None, cpu: int | None = None,
            client_cpu: int | None = None, samples: int = 200) -> KmipFigures:
    """PyKMIP's server on loopback: AES-256-GCM encrypts of 64 B and RSA-2048 signs per
    second, each for ``duration`` seconds, one request at a time (its client has no
    pipelining), plus the p50/p99 of the single calls."""
    with kmip_server(python, cpu) as server:
        argv = [server["python"], str(Path(__file__).resolve()), "client",
                json.dumps({**server, "duration": duration, "samples": samples})]
        if client_cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(client_cpu), *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=120 + 4 * duration, cwd=server["dir"])
        if done.returncode != 0:
            raise KmipUnavailable(f"PyKMIP's client failed: {done.stderr[-2000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        return KmipFigures(**got)


# -- the script side: runs under PyKMIP's interpreter ------------------------------------

def _serve(config: str, log: str, ready: str) -> None:
    import importlib

    kmip_server_class = importlib.import_module("kmip.services.server.server").KmipServer
    server = kmip_server_class(config_path=config, log_path=log, live_policies=False)
    with server:  # start() binds and listens; serve() loops until SIGTERM
        Path(ready).write_text(str(os.getpid()))
        server.serve()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _client(spec_json: str) -> None:
    import importlib

    import cryptography

    # by name: PyKMIP ships no type information
    kmip: Any = importlib.import_module("kmip")
    enums: Any = importlib.import_module("kmip.core.enums")
    proxy_client: Any = importlib.import_module("kmip.pie.client").ProxyKmipClient

    spec = json.loads(spec_json)
    duration, samples = float(spec["duration"]), int(spec["samples"])
    client = proxy_client(hostname="127.0.0.1", port=spec["port"], cert=spec["client_cert"],
                             key=spec["client_key"], ca=spec["ca"],
                             ssl_version="PROTOCOL_TLS", config_file=os.devnull)
    out: dict[str, Any] = {"python": sys.executable, "pykmip": kmip.__version__,
                           "cryptography": cryptography.__version__}
    with client:
        aes = client.create(enums.CryptographicAlgorithm.AES, 256,
                            cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                                      enums.CryptographicUsageMask.DECRYPT])
        client.activate(aes)
        _, private = client.create_key_pair(
            enums.CryptographicAlgorithm.RSA, 2048,
            private_usage_mask=[enums.CryptographicUsageMask.SIGN],
            public_usage_mask=[enums.CryptographicUsageMask.VERIFY])
        client.activate(private)
        gcm = {"cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
               "block_cipher_mode": enums.BlockCipherMode.GCM, "tag_length": 16}
        pss = {"cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
               "hashing_algorithm": enums.HashingAlgorithm.SHA_256,
               "padding_method": enums.PaddingMethod.PSS}
        message = bytes(64)

        def encrypt() -> None:
            client.encrypt(message, uid=aes, cryptographic_parameters=gcm)

        def sign() -> None:
            client.sign(message, uid=private, cryptographic_parameters=pss)

        for name, call in (("encrypt", encrypt), ("sign", sign)):
            call()  # the first call of each (and its checks) is not timed
            times: list[float] = []
            count = 0
            clock = time.perf_counter
            start = clock()
            end = start + duration
            now = start
            while now < end or count == 0:
                call()
                after = clock()
                if len(times) < samples * 50:
                    times.append(after - now)
                now = after
                count += 1
            out[f"{name}_ops_s"] = count / (now - start)
            out[f"{name}_count"] = count
            out[f"{name}_p50_ms"] = _percentile(times, 0.5) * 1e3
            out[f"{name}_p99_ms"] = _percentile(times, 0.99) * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "server":
        _serve(*sys.argv[2:5])
    elif len(sys.argv) >= 2 and sys.argv[1] == "client":
        _client(sys.argv[2])
    else:
        sys.exit("usage: kmip_peer.py server CONFIG LOG READY | client SPEC_JSON")
