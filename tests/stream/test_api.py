"""The stream API: round trips at chunk boundaries through every entry point, keys,
the seekable reader and the asyncio variants."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from cryptoplane.exceptions import InvalidRequest, KeyRejected
from cryptoplane.stream import (
    Decryptor,
    Encryptor,
    NoIdentityMatched,
    SeekableReader,
    Truncated,
    UnsupportedRecipient,
    X25519Identity,
    X25519Recipient,
    adecrypt,
    aencrypt,
    decrypt,
    encrypt,
    parse_identities,
    parse_recipients,
)

C = 65536
SIZES = [0, 1, C - 1, C, C + 1, 3 * C]
# the test kit's X25519 identity and the recipient age-keygen -y prints for it
KIT_IDENTITY = "AGE-SECRET-KEY-1EGTZVFFV20835NWYV6270LXYVK2VKNX2MMDKWYKLMGR48UAWX40Q2P2LM0"
KIT_RECIPIENT = "age1xmwwc06ly3ee5rytxm9mflaz2u56jjj36s0mypdrwsvlul66mv4q47ryef"


def data(n: int) -> bytes:
    return os.urandom(n)


def test_identity_strings_round_trip() -> None:
    ident = X25519Identity.parse(KIT_IDENTITY)
    assert ident.to_string() == KIT_IDENTITY
    rec = ident.recipient
    assert str(rec) == KIT_RECIPIENT  # as age-keygen -y prints it
    assert str(rec).startswith("age1") and X25519Recipient.parse(str(rec)) == rec
    assert KIT_IDENTITY not in repr(ident) and "SECRET" not in repr(ident)
    new = X25519Identity.generate()
    assert X25519Identity.parse(new.to_string()).recipient == new.recipient


@pytest.mark.parametrize("bad", [
    "age1", "AGE-SECRET-KEY-1", KIT_IDENTITY.lower(), KIT_IDENTITY[:-1] + "Q",
    "Age-Secret-Key-1QQQQ", "",
])
def test_bad_identity_strings(bad: str) -> None:
    with pytest.raises(KeyRejected):
        X25519Identity.parse(bad)


def test_identity_is_not_a_recipient() -> None:
    with pytest.raises(KeyRejected):
        X25519Recipient.parse(KIT_IDENTITY)
    with pytest.raises(KeyRejected):
        X25519Recipient.parse(str(X25519Identity.generate().recipient).upper())


def test_hybrid_keys_are_unsupported() -> None:
    with pytest.raises(UnsupportedRecipient):
        X25519Identity.parse(
            "AGE-SECRET-KEY-PQ-1HZLGZUPT4ETPKDEV8HSGFDCYZ4E522W0A7PU2LHT8EH9W6YLNC3SW78XKG")


def test_key_files() -> None:
    a, b = X25519Identity.generate(), X25519Identity.generate()
    text = f"# created: now\n# public key: {a.recipient}\n{a.to_string()}\n\n{b.to_string()}\n"
    assert [i.recipient for i in parse_identities(text)] == [a.recipient, b.recipient]
    assert parse_recipients(f"# me\n{a.recipient}\n\n{b.recipient}\n") == [
        a.recipient, b.recipient]
    with pytest.raises(KeyRejected, match="line 2"):
        parse_identities("# c\nnot a key\n")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("armor", [False, True])
def test_round_trip_file_objects(size: int, armor: bool) -> None:
    ident = X25519Identity.generate()
    plain = data(size)
    enc = io.BytesIO()
    assert encrypt(io.BytesIO(plain), enc, [ident.recipient], armor=armor) == size
    if armor:
        assert enc.getvalue().startswith(b"-----BEGIN AGE ENCRYPTED FILE-----\n")
    out = io.BytesIO()
    assert decrypt(io.BytesIO(enc.getvalue()), out, [ident]) == size
    assert out.getvalue() == plain


def test_round_trip_paths_and_strings(tmp_path: Path) -> None:
    ident = X25519Identity.generate()
    plain = data(2 * C + 5)
    (tmp_path / "p").write_bytes(plain)
    encrypt(tmp_path / "p", tmp_path / "c", [str(ident.recipient)])
    decrypt(tmp_path / "c", tmp_path / "o", [ident.to_string()])
    assert (tmp_path / "o").read_bytes() == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o", "p"]  # no temp left


def test_several_recipients_and_passphrase() -> None:
    a, b = X25519Identity.generate(), X25519Identity.generate()
    plain = data(C + 3)
    enc = io.BytesIO()
    encrypt(io.BytesIO(plain), enc, [a.recipient, b.recipient])
    for ident in (a, b):
        out = io.BytesIO()
        decrypt(io.BytesIO(enc.getvalue()), out, [X25519Identity.generate(), ident])
        assert out.getvalue() == plain
    enc = io.BytesIO()
    encrypt(io.BytesIO(plain), enc, passphrase="correct horse", work_factor=4)
    out = io.BytesIO()
    decrypt(io.BytesIO(enc.getvalue()), out, passphrase="correct horse")
    assert out.getvalue() == plain
    with pytest.raises(NoIdentityMatched):
        decrypt(io.BytesIO(enc.getvalue()), io.BytesIO(), passphrase="wrong")


def test_passphrase_is_alone() -> None:
    with pytest.raises(InvalidRequest):
        encrypt(io.BytesIO(b"x"), io.BytesIO(), [X25519Identity.generate().recipient],
                passphrase="p", work_factor=4)
    with pytest.raises(InvalidRequest):
        encrypt(io.BytesIO(b"x"), io.BytesIO(), [])


def test_work_factor_limit() -> None:
    enc = io.BytesIO()
    encrypt(io.BytesIO(b"x"), enc, passphrase="p", work_factor=12)
    from cryptoplane.stream import HeaderError
    with pytest.raises(HeaderError, match="work factor"):
        decrypt(io.BytesIO(enc.getvalue()), io.BytesIO(), passphrase="p", max_work_factor=11)


@pytest.mark.parametrize("piece", [1, 1000, C + 1])
@pytest.mark.parametrize("armor", [False, True])
def test_incremental_objects(piece: int, armor: bool) -> None:
    ident = X25519Identity.generate()
    plain = data(2 * C + 17 if piece > 1 else 3000)
    enc = Encryptor([ident.recipient], armor=armor)
    ct = b"".join(enc.update(plain[i : i + piece]) for i in range(0, len(plain), piece))
    ct += enc.finish()
    whole = io.BytesIO()
    decrypt(io.BytesIO(ct), whole, [ident])
    assert whole.getvalue() == plain
    dec = Decryptor([ident])
    out = b"".join(dec.update(ct[i : i + piece]) for i in range(0, len(ct), piece))
    assert out + dec.finish() == plain


def test_decryptor_refuses_a_truncated_file() -> None:
    ident = X25519Identity.generate()
    enc = io.BytesIO()
    encrypt(io.BytesIO(data(2 * C)), enc, [ident.recipient])
    dec = Decryptor([ident])
    dec.update(enc.getvalue()[: -(C + 16)])
    with pytest.raises(Truncated):
        dec.finish()


@pytest.mark.parametrize("size", SIZES)
def test_seekable_reader(tmp_path: Path, size: int) -> None:
    ident = X25519Identity.generate()
    plain = data(size)
    (tmp_path / "p").write_bytes(plain)
    encrypt(tmp_path / "p", tmp_path / "c", [ident.recipient])
    with SeekableReader(tmp_path / "c", [ident]) as r:
        assert r.size == size
        assert r.read() == plain
        for pos in {0, 1, C - 1, C, C + 1, size // 2, max(0, size - 1)}:
            r.seek(pos)
            want = plain[pos : pos + C + 2]
            assert r.read(C + 2) == want
            assert r.tell() == pos + len(want)
        r.seek(-min(size, 1), os.SEEK_END)
        assert r.read() == plain[-1:]
        buffered = io.BufferedReader(r)
        buffered.seek(0)
        assert buffered.read(5) == plain[:5]


def test_seekable_reader_catches_truncation(tmp_path: Path) -> None:
    ident = X25519Identity.generate()
    encrypt(io.BytesIO(data(3 * C)), tmp_path / "c", [ident.recipient])
    whole = (tmp_path / "c").read_bytes()
    (tmp_path / "t").write_bytes(whole[: -(C + 16)])  # drop the final chunk exactly
    from cryptoplane.stream import PayloadError
    with pytest.raises(PayloadError):
        SeekableReader(tmp_path / "t", [ident])


def test_async_round_trip() -> None:
    ident = X25519Identity.generate()
    plain = data(C * 2 + 9)

    async def main() -> bytes:
        done = asyncio.Event()
        received = bytearray()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.extend(await reader.read())
            writer.close()
            done.set()

        async def pipe(payload: bytes, job: object) -> bytes:
            done.clear()
            received.clear()
            server = await asyncio.start_server(sink, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            reader = asyncio.StreamReader()
            reader.feed_data(payload)
            reader.feed_eof()
            await job(reader, writer)  # type: ignore[operator]
            writer.close()
            await asyncio.wait_for(done.wait(), 10)
            server.close()
            return bytes(received)

        ct = await pipe(plain, lambda r, w: aencrypt(r, w, [ident.recipient]))
        return await pipe(ct, lambda r, w: adecrypt(r, w, [ident]))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == plain


def test_whitespace_before_armor_is_not_held() -> None:
    ident = X25519Identity.generate()
    enc = io.BytesIO()
    with pytest.raises(InvalidRequest, match="recipient"):
        encrypt(io.BytesIO(b"spaced"), enc, [ident], armor=True)  # type: ignore[list-item]
    encrypt(io.BytesIO(b"spaced"), enc, [ident.recipient], armor=True)
    blob = b" \r\n\t" * 50_000 + enc.getvalue() + b"\n  \n"
    out = io.BytesIO()
    decrypt(io.BytesIO(blob), out, [ident])
    assert out.getvalue() == b"spaced"
    dec = Decryptor([ident])
    got = b"".join(dec.update(blob[i : i + 4096]) for i in range(0, len(blob), 4096))
    assert got + dec.finish() == b"spaced"


def test_seekable_reader_file_object_and_armor(tmp_path: Path) -> None:
    ident = X25519Identity.generate()
    plain = data(C + 10)
    enc = io.BytesIO()
    encrypt(io.BytesIO(plain), enc, [ident.recipient])
    with SeekableReader(io.BytesIO(enc.getvalue()), [ident]) as r:
        r.seek(C)
        assert r.read() == plain[C:]
    armored = io.BytesIO()
    encrypt(io.BytesIO(plain), armored, [ident.recipient], armor=True)
    with pytest.raises(InvalidRequest, match="armored"):
        SeekableReader(io.BytesIO(armored.getvalue()), [ident])
