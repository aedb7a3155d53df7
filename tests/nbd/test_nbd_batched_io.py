"""Batched volume I/O (the small requests of one NBD receive in one native call): the
same bytes as one request at a time, errors per request, and fio's verify through the
server at queue depth 32."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbdclient as nc
import pytest
import wire as P
from nbdtools import tool

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd.runner import ServerThread
from cryptoplane.plane import Plane
from cryptoplane.volume.device import Volume
from cryptoplane.volume.layout import DataLayout

SIZE = 4 << 20
OFFSET = 2 * 4096  # a header's worth before the data, as LUKS has
# LUKS1: 512-byte sectors; LUKS2 4 KiB sectors with dm-crypt's 512-byte IV units
LAYOUTS = {"luks1": (512, 7), "luks2-4k": (4096, 16)}


def layout(kind: str) -> DataLayout:
    ss, iv0 = LAYOUTS[kind]
    key = bytes(range(1, 65))
    return DataLayout(cipher="aes-xts-plain64", volume_key=key, offset=OFFSET, size=SIZE,
                      sector_size=ss, iv_offset=iv0)


@pytest.fixture
def plane() -> Iterator[Plane]:
    p = Plane()
    yield p
    p.close()


def images(tmp_path: Path, n: int) -> list[Path]:
    start = random.Random(1).randbytes(OFFSET + SIZE)
    paths = [tmp_path / f"img{i}" for i in range(n)]
    for p in paths:
        p.write_bytes(start)
    return paths


def requests(rng: random.Random, ss: int, count: int) -> list[tuple[int, int]]:
    """(offset, length): mostly whole sectors, some unaligned, some across a region
    boundary (1 MiB), many overlapping each other (a small area)."""
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.6:
            n = ss * rng.randint(1, 8)
            off = ss * rng.randrange(0, 64)
        elif r < 0.8:
            n = rng.randint(1, 3 * ss)
            off = rng.randrange(0, 64 * ss)
        else:
            n = ss * rng.randint(1, 8)
            off = (1 << 20) - ss * rng.randint(0, 4)
        out.append((off, n))
    return out


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_batches_equal_one_request_at_a_time(kind: str, tmp_path: Path, plane: Plane) -> None:
    ss = LAYOUTS[kind][0]
    a, b = images(tmp_path, 2)
    rng = random.Random(ss)
    with Volume(a, layout(kind), plane) as batched, Volume(b, layout(kind), plane) as single:
        single.read(0, ss)  # binds the key to the plane's fast path: batches from now on
        batched.read(0, ss)
        assert single._cipher.batch() is not None  # the native batch path is the one tested
        for _ in range(30):
            writes = [(off, rng.randbytes(n)) for off, n in requests(rng, ss, 32)]
            assert batched.pwrite_many(writes) == [None] * len(writes)
            for off, data in writes:
                single.pwrite(off, data)
            reads = requests(rng, ss, 32)
            bufs = [bytearray(n) for _, n in reads]
            assert batched.preadinto_many(
                [(off, buf) for (off, _), buf in zip(reads, bufs, strict=True)]
            ) == [None] * len(reads)
            for (off, n), buf in zip(reads, bufs, strict=True):
                assert bytes(buf) == single.read(off, n)
    assert a.read_bytes() == b.read_bytes()  # the ciphertext too


def test_a_bad_request_fails_alone(tmp_path: Path, plane: Plane) -> None:
    [path] = images(tmp_path, 1)
    with Volume(path, layout("luks1"), plane) as vol:
        vol.read(0, 512)
        errors = vol.pwrite_many([(0, b"a" * 512), (SIZE, b"b" * 512), (512, b"c" * 512)])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], InvalidRequest)
        bufs = [bytearray(512), bytearray(512), bytearray(512)]
        errors = vol.preadinto_many([(0, bufs[0]), (SIZE - 256, bufs[1]), (512, bufs[2])])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], InvalidRequest)
        assert bufs[0] == b"a" * 512 and bufs[2] == b"c" * 512
        # a read-only buffer: the kernel refuses the whole batch before running any item,
        # then each is read alone, for its own error
        bufs = [bytearray(512), bytearray(512)]
        errors = vol.preadinto_many([(0, bufs[0]), (512, bytes(512)), (512, bufs[1])])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], InvalidRequest)
        assert bufs == [bytearray(b"a" * 512), bytearray(b"c" * 512)]


def test_pipelined_requests_over_the_wire(tmp_path: Path, plane: Plane,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One send of interleaved writes (overlapping) and reads, small (batched) and big
    (offloaded): every read sees the writes sent before it, and every request is
    answered."""
    ss = 512
    [path] = images(tmp_path, 1)
    rng = random.Random(7)
    sizes: list[int] = []
    with Volume(path, layout("luks1"), plane) as vol, \
            ServerThread({"disk": vol}, socket_path=str(tmp_path / "s")) as server:
        many_reads, many_writes = vol.preadinto_many, vol.pwrite_many

        def reads_seen(reqs: list[tuple[int, Any]]) -> list[BaseException | None]:
            sizes.append(len(reqs))
            return many_reads(reqs)

        def writes_seen(reqs: list[tuple[int, Any]],
                        fua: bool = False) -> list[BaseException | None]:
            sizes.append(len(reqs))
            return many_writes(reqs, fua=fua)

        monkeypatch.setattr(vol, "preadinto_many", reads_seen)
        monkeypatch.setattr(vol, "pwrite_many", writes_seen)
        client = nc.Client(server.url.split("socket=")[1])
        try:
            client.go("disk")
            area = 2 << 20
            expect = bytearray(vol.read(0, area))
            wire = bytearray()
            reads: dict[int, bytes] = {}
            slots = list(range(1 << 20, area, 128 << 10))
            for cookie in range(1, 200):
                if slots and rng.random() < 0.1:
                    # big: written on a worker thread, between batches, to its own place
                    # (NBD orders no requests in flight together: only the batches keep
                    # the order they arrived in)
                    off, n = slots.pop(), 128 << 10
                    data = rng.randbytes(n)
                    wire += nc.request(P.CMD_WRITE, cookie, off, n, payload=data)
                    expect[off:off + n] = data
                    continue
                off, n = ss * rng.randrange(0, 64), ss * rng.randint(1, 4)
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    wire += nc.request(P.CMD_WRITE, cookie, off, n, payload=data)
                    expect[off:off + n] = data
                else:
                    wire += nc.request(P.CMD_READ, cookie, off, n)
                    reads[cookie] = bytes(expect[off:off + n])
            client.sock.sendall(bytes(wire))
            for _ in range(199):
                _, error, cookie = P.SIMPLE_REPLY.unpack(client.recv_exact(16))
                assert error == 0
                if cookie in reads:
                    assert client.recv_exact(len(reads[cookie])) == reads[cookie]
        finally:
            client.close()
        assert vol.read(0, area) == expect
    assert max(sizes) > 1  # the small ones in batches, some of several


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_fio_verify_through_the_server(kind: str, tmp_path: Path, plane: Plane) -> None:
    """fio writes random 4 KiB blocks at queue depth 32 with crc32c, then reads each
    back and checks it."""
    fio = tool("fio")
    [path] = images(tmp_path, 1)
    size = SIZE
    with Volume(path, layout(kind), plane) as vol, \
            ServerThread({"disk": vol}, socket_path=str(tmp_path / "s")) as server:
        out = subprocess.run(
            [fio, "--name=v", "--ioengine=nbd", f"--uri={server.url}", "--rw=randwrite",
             "--bs=4k", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1", f"--size={size}", "--verify_state_save=0",
             "--output-format=json"],
            capture_output=True, text=True, timeout=90, cwd=tmp_path, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size
