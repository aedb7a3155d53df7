"""DirectDecoder: big DATA frames read in place give the frames FrameDecoder gives,
whatever the split of the bytes and whichever way they come in."""

from __future__ import annotations

import random

import pytest

from cryptoplane.fabric import codec as C
from cryptoplane.fabric.errors import ProtocolError
from cryptoplane.fabric.framebuf import DirectDecoder


def _wire(rng: random.Random) -> bytes:
    parts = []
    for i in range(40):
        if rng.random() < 0.4:
            payload = rng.randbytes(rng.choice([64 * 1024, 100_000, 1 << 20]))
            parts.append(C.encode_frame(C.FrameType.DATA, i + 1, op=C.Op.ENCRYPT_STREAM,
                                        payload=payload, flags=C.Flag.END if i % 7 else 0))
        else:
            parts.append(C.encode_frame(C.FrameType.REQUEST, i + 1, op=C.Op.ENCRYPT,
                                        key=b"k", payload=rng.randbytes(rng.randrange(200))))
    return b"".join(parts)


def _shape(frames: list[C.Frame]) -> list[tuple[int, int, int, int, bytes, bytes]]:
    return [(f.type, f.flags, f.id, f.op, bytes(f.key), bytes(f.payload)) for f in frames]


@pytest.mark.parametrize("seed", range(6))
def test_same_frames_as_frame_decoder(seed: int) -> None:
    rng = random.Random(seed)
    wire = _wire(rng)
    expected = _shape(C.FrameDecoder().feed(wire))
    d = DirectDecoder(big_min=64 * 1024, big_max=(1 << 20) + 4096)
    got: list[C.Frame] = []
    scratch = memoryview(bytearray(256 * 1024))
    pos = 0
    while pos < len(wire):
        want = d.want()
        n = rng.choice([1, 7, 24, 1000, 65536, 300_000])
        if want is not None and rng.random() < 0.8:  # as get_buffer/buffer_updated
            n = min(n, len(want), len(wire) - pos)
            want[:n] = wire[pos:pos + n]
            got += d.filled(n)
        elif rng.random() < 0.5:
            n = min(n, len(scratch), len(wire) - pos)
            scratch[:n] = wire[pos:pos + n]
            got += d.feed_view(scratch[:n])
            scratch[:n] = b"\xee" * n  # the caller reuses it: nothing may point into it
        else:
            got += d.feed(wire[pos:pos + n])
            n = min(n, len(wire) - pos)
        pos += n
        assert d.buffered >= 0
    assert d.buffered == 0
    assert _shape(got) == expected
    assert any(isinstance(f.payload, memoryview) for f in got)


def test_big_frame_is_charged_whole_and_checked() -> None:
    d = DirectDecoder(big_min=1024, big_max=1 << 20)
    frame = C.encode_frame(C.FrameType.DATA, 3, op=C.Op.ENCRYPT_STREAM, payload=b"x" * 5000)
    assert d.feed(frame[:30]) == []
    assert d.buffered == len(frame)
    assert d.want() is not None
    bad = bytearray(frame[:24])
    bad[4] = 99  # version
    with pytest.raises(ProtocolError):
        DirectDecoder(big_min=1024).feed_view(memoryview(bytes(bad) + b"x" * 100))


def test_pool_recycles_only_unreferenced_buffers() -> None:
    from cryptoplane.fabric.bufpool import BufferPool

    pool = BufferPool(keep=2, least=16, spare=2)
    a = pool.take(100)
    view = memoryview(a)[10:]
    del a
    b = pool.take(100)  # ``a`` is still seen through ``view``: a fresh one
    assert b is not view.obj
    first = id(view.obj)  # not a reference: that would keep it in use
    del view
    c = pool.take(100)
    assert id(c) == first  # nothing refers to it any more
    del b, c
    assert len(pool.take(8)) == 8  # small ones are not pooled
    d, e, f = pool.take(100), pool.take(100), pool.take(100)
    assert len({id(d), id(e), id(f)}) == 3  # past ``keep`` in use: fresh, not shared
    del d, e, f
    pool.spare = 1
    pool.trim()  # free ones past ``spare`` go
    assert len(pool._bufs) == 1
