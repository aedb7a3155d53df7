"""The server at its edges: authentication, scopes, tenants, limits, malformed input,
slow clients, rate limits, shutdown."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverwire import Running, Tokens, Wire, make_service, message, running

from cryptoplane.fabric import codec as C
from cryptoplane.fabric.codec import Field, FrameType, Op, Status
from cryptoplane.fabric.service import Service

ENC = {Field.DATA: b"x" * 64}


def _alive(port: int, token: str) -> None:
    with Wire(port, token) as w:
        st_, _f = w.call(Op.ENCRYPT, b"aes", ENC)
        assert st_ == 0


# -- handshake and authentication ---------------------------------------------------------


def test_bad_and_expired_tokens_are_refused(server: Running, tokens: Tokens) -> None:
    for token in ("cpt_nope", tokens.add("acme", expires_at=time.time() - 1), 42):
        w = Wire(server.port, hello=False)
        w.send(C.encode_json_frame(FrameType.HELLO, {"versions": [1], "token": token}))
        f = w.recv()
        assert (f.type, f.status) == (FrameType.WELCOME, Status.UNAUTHORIZED)
        assert w.closed()
        w.close()


def test_token_expiring_mid_connection(server: Running, tokens: Tokens) -> None:
    token = tokens.add("acme", expires_at=time.time() + 0.5)
    with Wire(server.port, token) as w:
        assert w.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        time.sleep(0.6)
        w.request(Op.ENCRYPT, b"aes", ENC)
        f = w.recv()
        assert f.status == Status.UNAUTHORIZED
        assert w.closed()


def test_token_revoked_mid_connection(server: Running, tokens: Tokens) -> None:
    token = tokens.add("acme")
    assert server.server is not None
    server.server.recheck_period = 0.2
    with Wire(server.port, token) as w:
        assert w.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        del tokens.grants[token]  # revoked; the authenticator trusts its cache for 1 s
        deadline = time.monotonic() + 5
        while not w.closed() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [f.status for f in w.frames] == [Status.UNAUTHORIZED]


def test_first_frame_must_be_hello(server: Running, token: str) -> None:
    w = Wire(server.port, hello=False)
    w.request(Op.ENCRYPT, b"aes", ENC)
    f = w.recv()
    assert f.status == Status.PROTOCOL_ERROR
    assert w.closed()
    # an unsupported version, a HELLO without credentials
    for hello in ({"versions": [7], "token": token}, {"versions": [1]}):
        w = Wire(server.port, hello=False)
        w.send(C.encode_json_frame(FrameType.HELLO, hello))
        f = w.recv()
        assert f.type == FrameType.WELCOME and f.status in (Status.PROTOCOL_ERROR,
                                                            Status.UNAUTHORIZED)
        assert w.closed()


def test_oversized_frames_refused_by_header(server: Running, token: str) -> None:
    # before the handshake: 16 KiB; the header alone is enough to refuse it
    w = Wire(server.port, hello=False)
    w.send(C.HEADER.pack(C.MAX_UNAUTHENTICATED_FRAME, 1, FrameType.HELLO, 0, 0, 0, 0, 0, 0))
    assert w.closed()
    # after: 32 MiB + a header is fine, 4 GiB is refused with nothing allocated
    with Wire(server.port, token) as w:
        w.send(C.HEADER.pack(0xFFFFFFF0, 1, FrameType.REQUEST, 0, 5, Op.ENCRYPT, 0, 0, 0))
        f = w.recv()
        assert f.status == Status.PROTOCOL_ERROR
        assert w.closed()
    _alive(server.port, token)


def test_scopes_and_tenant_isolation(server: Running, tokens: Tokens) -> None:
    narrow = tokens.add("acme", keys=("ae*",), ops=("encrypt",))
    with Wire(server.port, narrow) as w:
        assert w.welcome is not None and w.welcome["ops"] == ["encrypt"]
        assert w.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: b"x"})[0] == Status.FORBIDDEN
        assert w.call(Op.ENCRYPT, b"chacha", ENC)[0] == Status.FORBIDDEN
        assert w.json(Op.KEY_CREATE, b"aex", {"type": "hmac"})[0] == Status.FORBIDDEN
        assert w.call(Op.SESSION_OPEN, b"", {})[0] == Status.FORBIDDEN
        st_, _d = w.json(Op.TENANT_LIMITS, b"", {"tenant": "acme", "ops_per_s": 1})
        assert st_ == Status.FORBIDDEN
    other = tokens.add("other")
    with Wire(server.port, other) as w:
        st_, f = w.call(Op.ENCRYPT, b"aes", ENC)  # acme's key
        st2, f2 = w.call(Op.ENCRYPT, b"never-made", ENC)
        assert st_ == st2 == Status.KEY_NOT_FOUND
        assert message(f) == message(f2).replace("never-made", "aes")
        assert w.call(Op.ENCRYPT, b"secret", ENC)[0] == 0


def test_mutual_tls(service: Service, tmp_path: object, tokens: Tokens) -> None:
    from certs import make_pki

    from cryptoplane.fabric.auth import client_ssl_context, server_ssl_context

    pki = make_pki(tmp_path)  # type: ignore[arg-type]
    service.transit.create_key("tenant-a", "k", "aes256-gcm96")
    tls = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                             require_client_cert=False)
    with running(service, tls=tls) as srv:
        ctx = client_ssl_context(pki.ca_cert, certfile=pki.client_a_cert,
                                 keyfile=pki.client_a_key)
        with Wire(srv.port, None, tls=ctx) as w:  # no token: the certificate names it
            assert w.welcome is not None and w.welcome["tenant"] == "tenant-a"
            assert w.call(Op.ENCRYPT, b"k", ENC)[0] == 0
        # a token over TLS without a certificate
        plain = client_ssl_context(pki.ca_cert)
        with Wire(srv.port, tokens.add("acme"), tls=plain) as w:
            assert w.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        with Wire(srv.port, None, tls=plain, hello=False) as w:
            f = w.hello(None)
            assert f.status == Status.UNAUTHORIZED
        # a certificate from an untrusted CA: the TLS handshake fails
        bad = client_ssl_context(pki.ca_cert, certfile=pki.untrusted_client_cert,
                                 keyfile=pki.untrusted_client_key)
        with pytest.raises((OSError, ConnectionError)):
            w = Wire(srv.port, None, tls=bad)
            w.call(Op.ENCRYPT, b"k", ENC)


# -- malformed input ---------------------------------------------------------------------


def test_protocol_errors_close_only_that_connection(server: Running, token: str) -> None:
    cases = [
        C.HEADER.pack(20, 9, FrameType.REQUEST, 0, 1, 16, 0, 0, 0),  # version 9
        C.HEADER.pack(20, 1, 77, 0, 1, 16, 0, 0, 0),  # frame type 77
        C.HEADER.pack(20, 1, FrameType.REQUEST, 0, 1, 16, 0, 300, 0),  # key too long
        C.encode_frame(FrameType.WELCOME, 0),  # a server's frame
        C.encode_frame(FrameType.HELLO, 0),  # a second HELLO
    ]
    for bad in cases:
        with Wire(server.port, token) as w:
            w.send(bad)
            f = w.recv()
            assert f.status == Status.PROTOCOL_ERROR
            assert w.closed()
    # a duplicate id in flight
    with Wire(server.port, token) as w:
        sign = C.encode_frame(FrameType.REQUEST, 5, op=Op.SIGN, key=b"rsa",
                              payload=C.encode_fields({Field.DATA: b"m"}))
        w.send(sign + sign)
        assert w.closed()  # the first may be answered or not: the connection is over
        assert Status.PROTOCOL_ERROR in {f.status for f in w.frames}
    _alive(server.port, token)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=5),
       authed=st.booleans())
def test_fuzz_arbitrary_bytes_never_hurt_the_server(server: Running, token: str,
                                                    junk: bytes, cuts: list[int],
                                                    authed: bool) -> None:
    """Junk after the handshake or instead of it, in any split: the server answers or
    closes that connection, and keeps serving others."""
    w = Wire(server.port, token, timeout=2.0, hello=authed)
    try:
        pieces, last = [], 0
        for c in sorted(set(cuts)):
            pieces.append(junk[last:c])
            last = c
        pieces.append(junk[last:])
        for p in pieces:
            if p:
                w.send(p)
        w.sock.settimeout(0.05)
        w.closed()
    except OSError:
        pass
    finally:
        w.close()
    _alive(server.port, token)


def test_fuzz_valid_frames_with_junk_payloads(server: Running, token: str) -> None:
    import random
    rng = random.Random(7)
    with Wire(server.port, token) as w:
        n = 0
        for op in [*list(Op), 0, 1, 200]:
            for _ in range(5):
                payload = rng.randbytes(rng.randrange(0, 64))
                key = rng.choice([b"aes", b"rsa", b"mac", b"", b"\xff\xfe"])
                n += 1
                w.send(C.encode_frame(FrameType.REQUEST, n, op=op, key=key, payload=payload))
        seen = set()
        # streams opened by junk wait for DATA: every other request is answered
        streams = {i for i in range(1, n + 1)}
        while len(seen) < n - 12:
            f = w.recv()
            seen.add(f.id)
            assert f.id in streams
    _alive(server.port, token)


# -- slow clients ---------------------------------------------------------------------------


def test_slowloris_cut_after_frame_timeout(server: Running, token: str) -> None:
    with Wire(server.port, token) as w:
        frame = C.encode_frame(FrameType.REQUEST, 1, op=Op.ENCRYPT, key=b"aes",
                               payload=C.encode_fields(ENC))
        start = time.monotonic()
        with pytest.raises(OSError):
            for b in frame:
                w.send(bytes([b]))
                time.sleep(0.05)
        took = time.monotonic() - start
        assert 0.9 < took < 3.5  # frame_timeout is 1 s, swept every 0.25 s
    _alive(server.port, token)


def test_handshake_timeout(server: Running) -> None:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    start = time.monotonic()
    assert s.recv(100) == b""
    assert 1.5 < time.monotonic() - start < 4.5
    s.close()


def test_idle_connections_closed_and_connection_cap(service: Service, token: str) -> None:
    with running(service, idle_timeout=0.5, frame_timeout=0.4, max_connections=2) as srv:
        w = Wire(srv.port, token)
        start = time.monotonic()
        assert w.closed()  # silent and owed nothing: closed
        assert 0.4 < time.monotonic() - start < 3
        w.close()
        a, b = Wire(srv.port, token), Wire(srv.port, token)
        third = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        with contextlib.suppress(ConnectionResetError):  # over the cap: closed at once
            assert third.recv(10) == b""
        third.close()
        assert a.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        a.close()
        b.close()


def test_memory_budget_across_connections(service: Service, token: str) -> None:
    """Half-received frames of all connections together are bounded: past the budget the
    connection that grows is no longer read; others' whole requests still run, and the
    memory comes back when the stalled frame is cut (frame timeout)."""
    with running(service, max_buffered=256 * 1024, frame_timeout=1.0) as srv:
        assert srv.server is not None
        server = srv.server
        big = Wire(srv.port, token)
        frame = C.encode_frame(FrameType.REQUEST, 1, op=Op.ENCRYPT, key=b"aes",
                               payload=C.encode_fields({Field.DATA: b"z" * (4 << 20)}))
        big.sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            big.send(frame[:2 << 20])  # half of a 4 MiB frame, never finished
        time.sleep(0.3)
        held = srv.call(lambda: server.buffered)
        assert 256 * 1024 < held < 2 << 20  # reading stopped soon after the budget
        _alive(srv.port, token)
        deadline = time.monotonic() + 5
        while srv.call(lambda: server.buffered) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.call(lambda: server.buffered) == 0
        big.close()


def test_client_not_reading_pauses_the_connection(server: Running, token: str) -> None:
    """A client that sends and never reads: the server stops reading it instead of
    buffering answers without bound (3,000 requests for 1 MiB each: 3 GiB unbounded)."""
    with Wire(server.port, token) as w:
        frame = C.encode_frame(FrameType.REQUEST, 1, op=Op.RANDOM,
                               payload=C.encode_fields({Field.LENGTH: C.u32(1 << 20)}))
        w.send(frame * 3000)
        time.sleep(1.0)
        assert server.server is not None

        def state() -> tuple[int, bool, int]:
            (c,) = server.server.connections  # type: ignore[union-attr]
            assert c.transport is not None
            return c.transport.get_write_buffer_size(), c.read_paused, len(c.held)

        queued, paused, held = server.call(state)
        assert paused and queued < 64 * 1024 * 1024 and held > 0
    _alive(server.port, token)


# -- rate limits ---------------------------------------------------------------------------


def test_throttled_with_retry_after(server: Running, tokens: Tokens) -> None:
    admin = tokens.add("acme", ops=("admin", "encrypt"))
    with Wire(server.port, admin) as w:
        st_, d = w.json(Op.TENANT_LIMITS, b"", {"tenant": "acme", "ops_per_s": 20})
        assert st_ == 0 and d["ops_per_s"] == 20
        statuses = []
        retry = 0
        for _ in range(30):
            s, f = w.call(Op.ENCRYPT, b"aes", ENC)
            statuses.append(s)
            if s == Status.THROTTLED:
                retry = C.get_u32(f, Field.RETRY_AFTER)
        assert Status.THROTTLED in statuses and 0 < retry <= 100
        time.sleep(retry / 1000 + 0.05)
        assert w.call(Op.ENCRYPT, b"aes", ENC)[0] == 0
        # a batch counts its items
        f = w.batch(Op.ENCRYPT, b"aes", [ENC] * 50)
        assert (f.type, f.status) == (FrameType.RESPONSE, Status.THROTTLED)
        st_, d = w.json(Op.TENANT_LIMITS, b"", {"tenant": "acme", "ops_per_s": 0})
        assert st_ == 0
        assert [w.call(Op.ENCRYPT, b"aes", ENC)[0] for _ in range(50)] == [0] * 50


# -- shutdown ------------------------------------------------------------------------------


def test_graceful_shutdown_answers_everything(tokens: Tokens) -> None:
    svc = make_service(tokens)
    svc.transit.create_key("acme", "rsa", "rsa-2048")
    svc.transit.create_key("acme", "aes", "aes256-gcm96")
    token = tokens.add("acme")
    with running(svc) as srv:
        assert srv.server is not None
        server = srv.server
        w = Wire(srv.port, token)
        n = 200
        frames = b"".join(C.encode_frame(FrameType.REQUEST, i, op=Op.SIGN, key=b"rsa",
                                         payload=C.encode_fields({Field.DATA: b"m"}))
                          for i in range(1, n + 1))
        w.send(frames)

        def busy() -> int:
            return sum(c.inflight for c in server.connections)

        while srv.call(busy) == 0:
            time.sleep(0.001)
        # shut down while signatures are at the workers, in the same loop turn as we saw
        # them there
        stopping = srv.call(lambda: (busy(), srv.loop.create_task(server.shutdown(10.0))))
        assert stopping[0] > 0
        order: list[tuple[int, int, int]] = []
        sent_late = False
        while True:
            try:
                f = w.recv()
            except ConnectionError:
                break
            order.append((f.type, f.id, f.status))
            if f.type == FrameType.GOAWAY and not sent_late:
                sent_late = True
                with contextlib.suppress(OSError):  # refused, not run (or never read)
                    w.request(Op.ENCRYPT, b"aes", ENC, fid=10_000)
        kinds = [t for t, _, _ in order]
        assert FrameType.GOAWAY in kinds
        answers = {i: st_ for t, i, st_ in order if t == FrameType.RESPONSE and i != 10_000}
        assert answers == dict.fromkeys(range(1, n + 1), 0)
        after = kinds.index(FrameType.GOAWAY)
        assert sum(1 for t in kinds[after:] if t == FrameType.RESPONSE) >= 1
        late = [st_ for _, i, st_ in order if i == 10_000]
        assert late in ([], [Status.SHUTTING_DOWN])
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.connections
        w.close()
    svc.close()
