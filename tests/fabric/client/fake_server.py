"""A minimal in-test server speaking the wire protocol through the codec: just enough
to exercise the client's connection logic (pipelining, throttling, deadlines, GOAWAY,
lost connections) without the real server. Behaviour is chosen by key name:

    "throttle"  the first ``throttle_first`` requests answer THROTTLED (RETRY_AFTER 20 ms)
    "silent"    never answered
    "drop"      the connection is closed on receipt (nothing answered)
    anything    ENCRYPT prefixes b"ct:", DECRYPT strips it, DIGEST is SHA-256, SIGN
                answers b"sig:" + data; answers to one receive go out in reverse order
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from typing import Any

from cryptoplane.fabric import codec
from cryptoplane.fabric.codec import Field, FrameType, Op, Status


class FakeServer:
    def __init__(self, *, token: str = "t", throttle_first: int = 0,
                 max_frame: int = codec.MAX_FRAME) -> None:
        self.token = token
        self.max_frame = max_frame
        self.frozen = False  # a stopped process: reads nothing, answers nothing
        self.throttle_first = throttle_first
        self.throttled = 0
        self.received: list[tuple[int, int]] = []  # (op, id) in arrival order
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.sessions = itertools.count(1)

    async def start(self, port: int = 0) -> str:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Proto(self), "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"tcp://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.transports:
            t.abort()
        await self.server.wait_closed()

    def goaway(self) -> None:
        for t in self.transports:
            if not t.is_closing():
                t.write(codec.encode_frame(FrameType.GOAWAY, 0))

    def answer(self, f: codec.Frame) -> bytes | None:
        key = f.key.decode()
        self.received.append((f.op, f.id))
        if key == "silent":
            return None
        if key == "throttle" and self.throttled < self.throttle_first:
            self.throttled += 1
            return codec.encode_frame(FrameType.RESPONSE, f.id, op=f.op,
                                      status=Status.THROTTLED,
                                      payload=codec.error_fields("slow down", 0.02))
        if f.type == FrameType.BATCH:
            items = codec.decode_batch(f.payload)
            results = [(0, codec.encode_fields({Field.CIPHERTEXT: b"ct:" + codec.decode_fields(
                i)[Field.DATA]})) if codec.decode_fields(i).get(Field.DATA) != b"bad" else (
                Status.INVALID_REQUEST, codec.error_fields("bad item")) for i in items]
            return codec.encode_frame(FrameType.BATCH_RESPONSE, f.id, op=f.op,
                                      payload=codec.encode_batch_response(results))
        fields = codec.decode_fields(f.payload)
        out: dict[int, bytes]
        if f.op == Op.ENCRYPT:
            out = {Field.CIPHERTEXT: b"ct:" + fields[Field.DATA], Field.VERSION: codec.u32(1)}
        elif f.op == Op.DECRYPT:
            ct = fields[Field.CIPHERTEXT]
            if not ct.startswith(b"ct:"):
                return codec.encode_frame(FrameType.RESPONSE, f.id, op=f.op,
                                          status=Status.AUTHENTICATION_FAILED,
                                          payload=codec.error_fields("bad tag"))
            out = {Field.DATA: ct[3:]}
        elif f.op == Op.DIGEST:
            out = {Field.DATA: hashlib.sha256(fields[Field.DATA]).digest()}
        elif f.op == Op.SIGN:
            out = {Field.SIGNATURE: b"sig:" + fields[Field.DATA]}
        elif f.op == Op.SESSION_OPEN:
            out = {Field.SESSION: codec.u32(next(self.sessions))}
        elif f.op == Op.RAW_ENCRYPT:
            out = {Field.DATA: b"raw%d:" % codec.get_u32(fields, Field.SESSION)
                   + fields[Field.DATA]}
        elif f.op == Op.KEY_LIST:
            out = {Field.JSON: b'{"keys":["a","b"]}'}
        else:
            return codec.encode_frame(FrameType.RESPONSE, f.id, op=f.op,
                                      status=Status.NOT_SUPPORTED,
                                      payload=codec.error_fields("not in the fake"))
        return codec.encode_frame(FrameType.RESPONSE, f.id, op=f.op,
                                  payload=codec.encode_fields(out))


class _Proto(asyncio.Protocol):
    def __init__(self, server: FakeServer) -> None:
        self.s = server
        self.dec = codec.FrameDecoder()
        self.hello = False
        self.t: Any = None

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.s.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        if self.s.frozen:
            return
        out: list[bytes] = []
        for f in self.dec.feed(data):
            if not self.hello:
                obj = codec.decode_json_payload(f.payload)
                if obj.get("token") != self.s.token:
                    self.t.write(codec.encode_frame(
                        FrameType.WELCOME, 0, status=Status.UNAUTHORIZED,
                        payload=codec.error_fields("bad token")))
                    self.t.close()
                    return
                self.hello = True
                self.t.write(codec.encode_json_frame(FrameType.WELCOME, {
                    "version": 1, "server": "fake", "tenant": "t", "ops": ["encrypt"],
                    "limits": {"max_in_flight": 4096, "stream_piece": 1 << 20,
                               "max_frame": self.s.max_frame}}))
                continue
            if f.key == b"drop":
                self.t.abort()
                return
            ans = self.s.answer(f)
            if ans is not None:
                out.append(ans)
        if out:
            self.t.writelines(reversed(out))
