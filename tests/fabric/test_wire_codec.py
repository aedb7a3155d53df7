"""The wire codec alone (docs/wire-protocol.md): round trips, limits, and fuzzing —
arbitrary bytes and arbitrary splits never crash (only ProtocolError), never hang, and
never hold more than one frame's worth of bytes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoplane import exceptions as base
from cryptoplane.fabric import codec as c
from cryptoplane.fabric import errors as fe


def frame(i: int, payload: bytes = b"", key: bytes = b"k") -> bytes:
    return c.encode_frame(c.FrameType.REQUEST, i, op=c.Op.ENCRYPT, key=key, payload=payload)


def test_header_layout_is_the_documented_one() -> None:
    raw = c.encode_frame(c.FrameType.RESPONSE, 0x0102030405060708, op=c.Op.SIGN,
                         status=c.Status.THROTTLED, key=b"ab", payload=b"xyz", flags=1)
    assert raw[:4] == (20 + 2 + 3).to_bytes(4, "big")
    assert raw[4] == 1 and raw[5] == 4
    assert raw[6:8] == b"\x00\x01"
    assert raw[8:16] == bytes(range(1, 9))
    assert raw[16:18] == (20).to_bytes(2, "big")
    assert raw[18:20] == (10).to_bytes(2, "big")
    assert raw[20:22] == b"\x00\x02" and raw[22:24] == b"\x00\x00"
    assert raw[24:] == b"abxyz"


def test_round_trip_and_any_split() -> None:
    frames = [frame(i, bytes([i]) * i, key=b"key-%d" % i) for i in range(40)]
    stream = b"".join(frames)
    for cut in (1, 3, 23, 24, 25, 100, len(stream) - 1):
        d = c.FrameDecoder()
        got = d.feed(stream[:cut]) + d.feed(stream[cut:])
        assert [(f.id, f.key, f.payload) for f in got] == [
            (i, b"key-%d" % i, bytes([i]) * i) for i in range(40)]
        assert d.buffered == 0


def test_byte_by_byte() -> None:
    raw = frame(9, b"p" * 300)
    d = c.FrameDecoder()
    got = [f for b in raw for f in d.feed(bytes([b]))]
    assert len(got) == 1 and got[0].payload == b"p" * 300


def test_oversized_header_refused_before_its_payload() -> None:
    d = c.FrameDecoder(max_frame=c.MAX_UNAUTHENTICATED_FRAME)
    huge = c.HEADER.pack(c.MAX_FRAME, 1, 3, 0, 1, 16, 0, 0, 0)
    with pytest.raises(fe.ProtocolError, match="exceeds"):
        d.feed(huge[:4])  # the length alone is enough to refuse
    assert d.buffered == 0


@pytest.mark.parametrize("bad", [
    c.HEADER.pack(20, 2, 3, 0, 1, 16, 0, 0, 0),          # version
    c.HEADER.pack(20, 1, 0, 0, 1, 16, 0, 0, 0),          # type
    c.HEADER.pack(20, 1, 99, 0, 1, 16, 0, 0, 0),         # type
    c.HEADER.pack(20, 1, 3, 0, 1, 16, 0, 5, 0),          # key past the end
    c.HEADER.pack(20 + 300, 1, 3, 0, 1, 16, 0, 300, 0) + b"k" * 300,  # key too long
    (3).to_bytes(4, "big") + b"\x01\x03\x00",            # length shorter than a header
])
def test_bad_headers_raise_protocol_error(bad: bytes) -> None:
    with pytest.raises(fe.ProtocolError):
        c.FrameDecoder().feed(bad)


def test_fields_round_trip_and_refusals() -> None:
    fields = {c.Field.DATA: b"abc", c.Field.AAD: b"", c.Field.VERSION: c.u32(7)}
    raw = c.encode_fields(fields)
    back = c.decode_fields(raw)
    assert back == fields and c.get_u32(back, c.Field.VERSION) == 7
    with pytest.raises(base.InvalidRequest, match="twice"):
        c.decode_fields(raw + c.encode_fields({c.Field.DATA: b"x"}))
    with pytest.raises(base.InvalidRequest, match="unknown field"):
        c.decode_fields(b"\xee\x00\x00\x00\x00")
    with pytest.raises(base.InvalidRequest, match="past the end"):
        c.decode_fields(b"\x01\x00\x00\x00\x09abc")
    with pytest.raises(base.InvalidRequest, match="truncated"):
        c.decode_fields(b"\x01\x00")


def test_batches_round_trip_and_impossible_counts() -> None:
    items = [c.encode_fields({c.Field.DATA: bytes([i]) * i}) for i in range(50)]
    assert c.decode_batch(c.encode_batch(items)) == items
    results = [(i % 3, c.encode_fields({c.Field.DATA: b"r"})) for i in range(50)]
    assert c.decode_batch_response(c.encode_batch_response(results)) == results
    with pytest.raises(fe.ProtocolError):
        c.decode_batch((c.MAX_BATCH + 1).to_bytes(4, "big"))
    with pytest.raises(fe.ProtocolError):  # a count no payload of this size can hold
        c.decode_batch((1000).to_bytes(4, "big") + b"\x00" * 16)
    with pytest.raises(fe.ProtocolError):
        c.decode_batch(c.encode_batch(items) + b"!")
    with pytest.raises(base.InvalidRequest):
        c.encode_batch([b""] * (c.MAX_BATCH + 1))


def test_every_status_maps_to_one_class_both_ways() -> None:
    seen = set()
    for status in c.Status:
        if status is c.Status.OK:
            continue
        exc = c.error_for(status, "m", retry_after=0.5)
        assert c.status_for(exc) is status, status
        seen.add(type(exc))
    assert len(seen) == len(c.Status) - 1
    throttled = c.error_from(c.Status.THROTTLED, c.error_fields("slow", 0.25))
    assert isinstance(throttled, fe.Throttled) and isinstance(throttled, base.QuotaExceeded)
    assert abs(throttled.retry_after - 0.25) < 0.01
    # local exceptions the plane raises map onto their statuses
    assert c.status_for(base.ChunkAuthenticationFailed(3)) is c.Status.AUTHENTICATION_FAILED
    assert c.status_for(RuntimeError("boom")) is c.Status.INTERNAL


def test_frame_repr_never_shows_payload() -> None:
    f = c.FrameDecoder().feed(frame(1, b"TOP-SECRET-PLAINTEXT"))[0]
    assert "SECRET" not in repr(f)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_arbitrary_bytes_and_splits(data: bytes, cuts: list[int]) -> None:
    d = c.FrameDecoder(max_frame=2048)
    points = sorted({min(x, len(data)) for x in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    try:
        for p in pieces:
            for f in d.feed(p):
                assert len(f.key) <= c.MAX_KEY_REF
                assert c.HEADER_SIZE + len(f.key) + len(f.payload) <= 2048
                with contextlib.suppress(base.InvalidRequest):
                    c.decode_fields(f.payload)
            assert d.buffered <= 2048 + len(p)
    except fe.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=64),
                          st.binary(max_size=300)), min_size=1, max_size=20),
       st.integers(1, 50))
def test_fuzz_valid_streams_survive_any_chunking(items: list[tuple[int, bytes, bytes]],
                                                 step: int) -> None:
    raw = b"".join(c.encode_frame(c.FrameType.BATCH, i, key=k, payload=p) for i, k, p in items)
    d = c.FrameDecoder()
    got = [f for pos in range(0, len(raw), step) for f in d.feed(raw[pos:pos + step])]
    assert [(f.id, f.key, f.payload) for f in got] == items


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_batch_and_fields_decoders(data: bytes) -> None:
    for fn in (c.decode_batch, c.decode_batch_response):
        with contextlib.suppress(fe.ProtocolError):
            fn(data)
    with contextlib.suppress(base.InvalidRequest):
        c.decode_fields(data)
    with contextlib.suppress(fe.ProtocolError):
        c.decode_json_payload(data)
