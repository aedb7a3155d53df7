"""Client authentication for NBD exports (issue 14): X.509 client certificates checked
against a CA, TLS-PSK, private Unix sockets, and a warning when a disk is exposed.

The oracle is independent clients: libnbd's ``nbdinfo`` and ``nbdcopy`` (gnutls) and
``qemu-io`` with qemu's ``tls-creds-x509`` / ``tls-creds-psk`` objects. A refused client
must fail for the TLS reason (its error says so) and must get none of the disk's bytes.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from nbdtools import make_image, tool

from cryptoplane.cli.serve import serve
from cryptoplane.nbd import tls as T
from cryptoplane.nbd.blockdev import FileDevice
from cryptoplane.nbd.runner import ServerThread, bind_unix

SERVE = [sys.executable, "-c", "from cryptoplane.cli.serve import serve; serve()"]
SIZE = 4 << 20
# what a client refused for TLS reasons says (gnutls via libnbd, qemu's crypto layer)
TLS_FAILURE = re.compile(r"TLS|tls|handshake|certificate|alert|gnutls", re.I)


# ---- a throwaway PKI ------------------------------------------------------------------------


@dataclass
class Issuer:
    cert: Any
    key: Any
    pem: bytes


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(obj: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return bytes(obj.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return bytes(obj.public_bytes(serialization.Encoding.PEM))


def make_ca(cn: str) -> Issuer:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issuer(cert, key, _pem(cert))


def issue(ca: Issuer, cn: str, *, server: bool) -> tuple[bytes, bytes]:
    """A leaf certificate and its key (PEM), for a server or a client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return _pem(cert), _pem(key)


@dataclass
class PKI:
    server_cert: Path
    server_key: Path
    ca: Path  # the CA that signs the server and the good clients
    good: Path  # gnutls/qemu client directories: ca-cert.pem, client-cert.pem, client-key.pem
    nocert: Path  # trusts the server, has no certificate of its own
    otherca: Path  # a client certificate from another CA


def client_dir(path: Path, cas: list[Issuer], cert: tuple[bytes, bytes] | None) -> Path:
    path.mkdir()
    (path / "ca-cert.pem").write_bytes(b"".join(ca.pem for ca in cas))
    if cert is not None:
        (path / "client-cert.pem").write_bytes(cert[0])
        (path / "client-key.pem").write_bytes(cert[1])
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca("cryptoplane test CA"), make_ca("another CA")
    cert, key = issue(ca, "localhost", server=True)
    (d / "server-cert.pem").write_bytes(cert)
    (d / "server-key.pem").write_bytes(key)
    (d / "ca.pem").write_bytes(ca.pem)
    return PKI(d / "server-cert.pem", d / "server-key.pem", d / "ca.pem",
               client_dir(d / "good", [ca], issue(ca, "client", server=False)),
               client_dir(d / "nocert", [ca], None),
               # trusting both CAs: qemu checks its own certificate against them first
               client_dir(d / "otherca", [ca, rogue], issue(rogue, "client", server=False)))


# ---- running the server and the clients ----------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen[str]
    sock: str
    url: str
    data: bytes


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    data = make_image(path, SIZE, seed=14)
    return path, data


def start(args: list[str], *, umask: int = 0o022) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, umask=umask)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("nbd"):
        proc.kill()
        _, err = proc.communicate(timeout=20)
        pytest.fail(f"serve did not start: {line} {err}")
    return proc, line


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def serving(disk: tuple[Path, bytes], sockdir: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def run(*args: str, umask: int = 0o022) -> Served:
        sock = f"{sockdir}/s{len(procs)}"
        proc, url = start([str(disk[0]), "--raw", "--name", "disk", "--socket", sock, *args],
                          umask=umask)
        procs.append(proc)
        return Served(proc, sock, url, disk[1])

    yield run
    for proc in procs:
        stop(proc)


@dataclass
class Outcome:
    ok: bool
    out: bytes
    err: str

    def __str__(self) -> str:
        return f"ok={self.ok} stdout={self.out[:200]!r} stderr={self.err[-600:]}"


def run(cmd: list[str]) -> Outcome:
    res = subprocess.run(cmd, capture_output=True, timeout=60)
    return Outcome(res.returncode == 0, res.stdout, res.stderr.decode(errors="replace"))


def nbdinfo_list(url: str) -> Outcome:
    return run([tool("nbdinfo"), "--list", url])


def nbdcopy_read(url: str) -> Outcome:
    return run([tool("nbdcopy"), url, "-"])


def qemu_read(sock: str, obj: str, extra: str = "") -> Outcome:
    """qemu-io dumps the disk's first 512 bytes (``read -v``)."""
    return run([tool("qemu-io"), "--object", obj, "--image-opts",
                f"driver=nbd,server.type=unix,server.path={sock},export=disk,"
                f"tls-creds=tls0{extra}", "-c", "read -v 0 512"])


def qemu_dump_matches(out: bytes, data: bytes) -> bool:
    """Whether qemu-io's ``read -v`` hex dump of offset 0 shows ``data``'s first bytes."""
    text = out.decode(errors="replace")
    first = " ".join(f"{b:02x}" for b in data[:16])
    return f"00000000:  {first}" in text and "read 512/512 bytes" in text


def refused(o: Outcome, data: bytes) -> None:
    """The client failed for a TLS reason, and none of the disk came back."""
    assert not o.ok, o
    # the reason, not the URL or a file name that the message repeats
    reason = " ".join(w for w in o.err.split() if "/" not in w)
    assert TLS_FAILURE.search(reason), o
    assert "Our own certificate" not in o.err, o  # qemu refused itself, not the server
    assert b"disk" not in o.out or b"export=" not in o.out, o  # nothing listed
    for i in range(0, len(data), 512 * 1024):  # no sector of the disk in what it printed
        assert data[i:i + 32] not in o.out, o
        assert data[i:i + 16].hex(" ") not in o.out.decode(errors="replace"), o


# ---- X.509 client certificates --------------------------------------------------------------


def x509_url(s: Served, client: Path) -> str:
    return f"{s.url}&tls-certificates={client}&tls-verify-peer=true"


def test_client_certificates_verified_against_the_ca(serving: Any, pki: PKI) -> None:
    s = serving("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                "--tls-verify-peer", "--tls-ca", str(pki.ca))
    assert s.url.startswith("nbds+unix://")
    assert stat.S_IMODE(os.stat(s.sock).st_mode) == 0o600
    # a client with a certificate from the CA lists and reads
    listed = nbdinfo_list(x509_url(s, pki.good))
    assert listed.ok and b"export=\"disk\"" in listed.out, listed
    copied = nbdcopy_read(x509_url(s, pki.good))
    assert copied.ok and copied.out == s.data, copied.err
    # no client certificate, or one from another CA: the handshake fails
    for client in (pki.nocert, pki.otherca):
        refused(nbdinfo_list(x509_url(s, client)), s.data)
        refused(nbdcopy_read(x509_url(s, client)), s.data)
    # and without TLS the server lists and serves nothing
    plain = s.url.replace("nbds+unix", "nbd+unix")
    for o in (nbdinfo_list(plain), nbdcopy_read(plain)):
        assert not o.ok and b"export=" not in o.out and s.data[:32] not in o.out, o


def test_qemu_client_certificates(serving: Any, pki: PKI) -> None:
    s = serving("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                "--tls-verify-peer", "--tls-ca", str(pki.ca))

    def creds(d: Path) -> str:
        return f"tls-creds-x509,id=tls0,endpoint=client,dir={d},verify-peer=on"

    # a Unix socket has no host name to check the server's certificate against
    good = qemu_read(s.sock, creds(pki.good), ",tls-hostname=localhost")
    assert good.ok and qemu_dump_matches(good.out, s.data), good
    for client in (pki.nocert, pki.otherca):
        o = qemu_read(s.sock, creds(client), ",tls-hostname=localhost")
        refused(o, s.data)
        assert b"read 512/512" not in o.out


def test_server_says_why_it_refused(disk: tuple[Path, bytes], pki: PKI, sockdir: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """The refusals above are the server's certificate check, as its log says."""
    caplog.set_level(logging.INFO, logger="cryptoplane")
    ctx = T.certificate_context(pki.server_cert, pki.server_key, ca=pki.ca, verify_peer=True)
    path, data = disk
    with FileDevice(str(path)) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s",
                                                    tls=ctx) as s:
        served = Served(None, f"{sockdir}/s", s.url, data)  # type: ignore[arg-type]
        refused(nbdinfo_list(x509_url(served, pki.nocert)), data)
        assert re.search(r"TLS handshake failed: .*CERTIFICATE", caplog.text), caplog.text
        caplog.clear()
        refused(nbdinfo_list(x509_url(served, pki.otherca)), data)
        assert re.search(r"TLS handshake failed: .*certificate verify failed", caplog.text), \
            caplog.text
        caplog.clear()
        assert nbdinfo_list(x509_url(served, pki.good)).ok
        assert "handshake failed" not in caplog.text


def test_without_verify_peer_any_client_gets_in(serving: Any, pki: PKI) -> None:
    """The defect this fixes, kept visible: --tls-cert alone encrypts but does not
    authenticate (and on loopback no warning is due)."""
    s = serving("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    o = nbdcopy_read(x509_url(s, pki.nocert))
    assert o.ok and o.out == s.data, o.err


# ---- TLS-PSK ------------------------------------------------------------------------------


def psk_file(path: Path, **users: bytes) -> Path:
    path.write_text("".join(f"{u}:{k.hex()}\n" for u, k in users.items()))
    return path


def psk_url(s: Served, user: str, keys: Path) -> str:
    return s.url.replace("nbds+unix://", f"nbds+unix://{user}@") + f"&tls-psk-file={keys}"


def test_psk_clients(serving: Any, tmp_path: Path) -> None:
    alice, bob = os.urandom(32), os.urandom(16)
    server_keys = psk_file(tmp_path / "server.psk", alice=alice, bob=bob)
    s = serving("--tls-psk", str(server_keys))
    assert s.url.startswith("nbds+unix://")
    mine = psk_file(tmp_path / "alice.psk", alice=alice)
    listed = nbdinfo_list(psk_url(s, "alice", mine))
    assert listed.ok and b"export=\"disk\"" in listed.out, listed
    copied = nbdcopy_read(psk_url(s, "alice", mine))
    assert copied.ok and copied.out == s.data, copied.err
    bobs = psk_file(tmp_path / "bob.psk", bob=bob)
    assert nbdcopy_read(psk_url(s, "bob", bobs)).out == s.data
    # a wrong key, someone else's key, an unknown user
    wrong = psk_file(tmp_path / "wrong.psk", alice=os.urandom(32))
    swapped = psk_file(tmp_path / "swapped.psk", alice=bob)
    mallory = psk_file(tmp_path / "mallory.psk", mallory=alice)
    for url in (psk_url(s, "alice", wrong), psk_url(s, "alice", swapped),
                psk_url(s, "mallory", mallory)):
        refused(nbdinfo_list(url), s.data)
        refused(nbdcopy_read(url), s.data)


def test_qemu_psk_reads_and_writes(serving: Any, tmp_path: Path) -> None:
    key = os.urandom(32)
    s = serving("--tls-psk", str(psk_file(tmp_path / "server.psk", alice=key)))
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    psk_file(good / "keys.psk", alice=key)
    psk_file(bad / "keys.psk", alice=os.urandom(32))

    def creds(d: Path) -> str:
        return f"tls-creds-psk,id=tls0,endpoint=client,dir={d},username=alice"

    o = qemu_read(s.sock, creds(good))
    assert o.ok and qemu_dump_matches(o.out, s.data), o
    # writes and reads of several sizes through the PSK transport, checked by qemu-io
    w = run([tool("qemu-io"), "--object", creds(good), "--image-opts",
             f"driver=nbd,server.type=unix,server.path={s.sock},export=disk,tls-creds=tls0",
             "-c", "write -P 0xa5 1M 1M", "-c", "write -P 0x3c 4096 512",
             "-c", "read -P 0xa5 1M 1M", "-c", "read -P 0x3c 4096 512", "-c", "flush"])
    assert w.ok and b"fail" not in w.out.lower(), w
    o = qemu_read(s.sock, creds(bad))
    refused(o, s.data)


def test_psk_in_process_logs_no_key(disk: tuple[Path, bytes], tmp_path: Path, sockdir: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """The server's own log of accepted and refused handshakes holds no key."""
    key = os.urandom(32)
    table = T.load_psk_file(psk_file(tmp_path / "k.psk", alice=key))
    ctx = T.PSKContext(table)
    assert key.hex() not in repr(ctx) and key.hex() not in repr(table)
    caplog.set_level(logging.DEBUG, logger="cryptoplane")
    path, data = disk
    with FileDevice(str(path)) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s",
                                                    tls=ctx) as s:
        served = Served(None, f"{sockdir}/s", s.url, data)  # type: ignore[arg-type]
        ok = nbdcopy_read(psk_url(served, "alice", tmp_path / "k.psk"))
        assert ok.ok and ok.out == data, ok.err
        bad = psk_file(tmp_path / "bad.psk", alice=os.urandom(32))
        refused(nbdinfo_list(psk_url(served, "alice", bad)), data)
        refused(nbdinfo_list(psk_url(served, "eve", psk_file(tmp_path / "e.psk", eve=key))),
                data)
    assert "handshake failed" in caplog.text  # the refusals were logged...
    for secret in (key.hex(), key.hex().upper(), repr(key)):
        assert secret not in caplog.text  # ...without the key


# ---- PSK files ------------------------------------------------------------------------------


def test_psk_file_format() -> None:
    t = T.parse_psk("# made by psktool\nalice:00ff10\n\nbob:" + "ab" * 64 + "\n")
    assert t.users == ["alice", "bob"]
    assert t.key("alice") == b"\x00\xff\x10" and t.key("carol") is None
    assert "00ff10" not in repr(t)
    with pytest.raises(TypeError):
        pickle.dumps(t)


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no username:hexkey"),
    ("alice 5ecre7\n", "line 1: expected username:hexkey"),
    ("alice:5ecre7\n", "line 1: the key of 'alice' is not"),
    ("# c\nalice:5ec\n", "line 2: the key of 'alice' is not"),
    ("alice:\n", "line 1: the key of 'alice' must be 1 to 512 bytes"),
    ("alice:" + "5e" * 513 + "\n", "must be 1 to 512 bytes"),
    (":5e5e\n", "line 1: an empty PSK user name"),
    ("al ice:5e5e\n", "spaces or control characters"),
    ("alice:5e5e\nalice:5e5f\n", "line 2: PSK user 'alice' appears twice"),
])
def test_malformed_psk_files_say_where_not_what(text: str, message: str) -> None:
    with pytest.raises(T.TLSConfigError) as err:
        T.parse_psk(text, source="keys.psk")
    assert message in str(err.value)
    shown = "".join(traceback.format_exception(err.value))  # what a crash would print
    for key in re.findall(r":([^\n]+)", text):
        assert key not in shown


def test_psk_file_errors_from_the_cli(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    make_image(img, 65536)
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:c0ffee\nbob:notHEXc0ffee\n")
    res = CliRunner().invoke(serve, [str(img), "--raw", "--socket", str(tmp_path / "s"),
                                     "--tls-psk", str(bad)])
    assert res.exit_code == 1
    assert "line 2" in res.output and "c0ffee" not in res.output


# ---- option rules and certificate contexts ---------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--tls-verify-peer"],  # no certificate
    ["--tls-cert", "__CERT__", "--tls-key", "__KEY__", "--tls-verify-peer"],  # no CA
    ["--tls-cert", "__CERT__", "--tls-key", "__KEY__", "--tls-ca", "__CA__"],  # CA unused
    ["--tls-psk", "__CA__", "--tls-cert", "__CERT__", "--tls-key", "__KEY__"],
    ["--socket-mode", "999"], ["--socket-mode", "rw"], ["--socket-mode", "01777"],
])
def test_option_rules(tmp_path: Path, pki: PKI, args: list[str]) -> None:
    img = tmp_path / "x.img"
    make_image(img, 4096)
    subst = {"__CERT__": str(pki.server_cert), "__KEY__": str(pki.server_key),
             "__CA__": str(pki.ca)}
    res = CliRunner().invoke(serve, [str(img), "--raw", "--socket", str(tmp_path / "s"),
                                     *[subst.get(a, a) for a in args]])
    assert res.exit_code == 2, res.output


def test_certificate_context(pki: PKI, tmp_path: Path) -> None:
    import ssl

    ctx = T.certificate_context(pki.server_cert, pki.server_key, ca=pki.ca, verify_peer=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # only the given CA: not the system's store
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName",
                                                            "cryptoplane test CA"),),)]
    assert T.certificate_context(pki.server_cert, pki.server_key).verify_mode == ssl.CERT_NONE
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(T.TLSConfigError, match="CA certificates"):
        T.certificate_context(pki.server_cert, pki.server_key, ca=junk, verify_peer=True)
    with pytest.raises(T.TLSConfigError, match="server certificate"):
        T.certificate_context(pki.server_cert, junk)
    key_pem = pki.server_key.read_text()
    with pytest.raises(T.TLSConfigError) as err:
        T.certificate_context(pki.server_key, pki.server_cert)  # swapped
    assert key_pem.splitlines()[1] not in str(err.value)


# ---- Unix socket permissions ----------------------------------------------------------------


def test_socket_is_private_whatever_the_umask(disk: tuple[Path, bytes], sockdir: str) -> None:
    old = os.umask(0)
    try:
        with FileDevice(str(disk[0])) as dev, \
                ServerThread({"disk": dev}, socket_path=f"{sockdir}/a"), \
                ServerThread({"disk": dev}, socket_path=f"{sockdir}/b", socket_mode=0o660):
            assert stat.S_IMODE(os.stat(f"{sockdir}/a").st_mode) == 0o600
            assert stat.S_IMODE(os.stat(f"{sockdir}/b").st_mode) == 0o660
            assert stat.S_ISSOCK(os.stat(f"{sockdir}/a").st_mode)
    finally:
        os.umask(old)
    assert sorted(os.listdir(sockdir)) == []  # no staging directory left behind


def test_cli_socket_mode_under_umask_000(serving: Any) -> None:
    s = serving(umask=0)
    assert stat.S_IMODE(os.stat(s.sock).st_mode) == 0o600
    g = serving("--socket-mode", "0660", umask=0)
    assert stat.S_IMODE(os.stat(g.sock).st_mode) == 0o660
    o = nbdcopy_read(g.url)  # the owner still connects
    assert o.ok and o.out == g.data, o.err


def test_bind_unix_never_clobbers(sockdir: str) -> None:
    target = Path(sockdir) / "taken"
    target.write_text("someone's file")
    with pytest.raises(FileExistsError):
        bind_unix(str(target))
    assert target.read_text() == "someone's file"
    assert sorted(os.listdir(sockdir)) == ["taken"]
    sock = bind_unix(f"{sockdir}/new", 0o640)
    try:
        assert stat.S_IMODE(os.stat(f"{sockdir}/new").st_mode) == 0o640
    finally:
        sock.close()


# ---- the exposure warning --------------------------------------------------------------------


@pytest.mark.parametrize(("args", "warned"), [
    (["--port", "0", "--bind", "0.0.0.0"], "0.0.0.0 (not loopback)"),
    (["--port", "0", "--bind", "::"], ":: (not loopback)"),
    (["--port", "0", "--bind", ""], "every address"),
    (["--port", "0", "--bind", "192.0.2.7"], "192.0.2.7 (not loopback)"),
    (["--port", "0", "--bind", "0.0.0.0", "--tls-cert", "__CERT__", "--tls-key", "__KEY__"],
     "without client authentication"),  # encryption alone is no authentication
    (["--socket", "__SOCK__", "--socket-mode", "0666"], "open to every local user"),
    (["--port", "0"], None),  # 127.0.0.1
    (["--port", "0", "--bind", "::1"], None),
    (["--port", "0", "--bind", "localhost"], None),
    (["--socket", "__SOCK__"], None),
    (["--socket", "__SOCK__", "--socket-mode", "0660"], None),
    (["--port", "0", "--bind", "0.0.0.0", "--tls-cert", "__CERT__", "--tls-key", "__KEY__",
      "--tls-verify-peer", "--tls-ca", "__CA__"], None),
    (["--port", "0", "--bind", "0.0.0.0", "--tls-psk", "__PSK__"], None),
])
def test_exposure_warning(tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch,
                          args: list[str], warned: str | None) -> None:
    """The warning is checked on the command line with the server itself stubbed out,
    so nothing listens on a non-loopback address."""
    import cryptoplane.nbd.runner as runner

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(runner, "serve", lambda devices, **kw: calls.append(kw))
    img = tmp_path / "x.img"
    make_image(img, 4096)
    subst = {"__CERT__": str(pki.server_cert), "__KEY__": str(pki.server_key),
             "__CA__": str(pki.ca), "__SOCK__": str(tmp_path / "s"),
             "__PSK__": str(psk_file(tmp_path / "k.psk", alice=b"k" * 32))}
    res = CliRunner().invoke(serve, [str(img), "--raw", *[subst.get(a, a) for a in args]])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    if warned is None:
        assert "warning" not in res.stderr, res.stderr
    else:
        assert "warning" in res.stderr and warned in res.stderr, res.stderr
        assert "warning" not in res.stdout


def test_is_loopback() -> None:
    assert T.is_loopback("127.0.0.1") and T.is_loopback("127.8.9.1")
    assert T.is_loopback("::1") and T.is_loopback("[::1]")
    assert not T.is_loopback("0.0.0.0") and not T.is_loopback("::")
    assert not T.is_loopback("") and not T.is_loopback("10.1.2.3")

    def fake(host: str, port: Any) -> list[Any]:
        return {"lo": [(0, 0, 0, "", ("127.0.0.1", 0)), (0, 0, 0, "", ("::1", 0, 0, 0))],
                "mixed": [(0, 0, 0, "", ("127.0.0.1", 0)), (0, 0, 0, "", ("10.0.0.1", 0))],
                }[host]

    assert T.is_loopback("lo", resolve=fake)
    assert not T.is_loopback("mixed", resolve=fake)

    def fails(host: str, port: Any) -> list[Any]:
        raise OSError("no such host")

    assert not T.is_loopback("nowhere.invalid", resolve=fails)
