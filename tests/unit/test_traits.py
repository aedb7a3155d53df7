"""Engines are told apart by their declared ``Traits``, never by name: the engine that
runs work in the caller's thread is the fast path's whatever it is called, and an engine
merely named "inline" is not. Lanes are the scheduler's jobs, not requests."""

from __future__ import annotations

import os

import pytest

import cryptoplane as cp
from cryptoplane import requests as rq
from cryptoplane.engines.base import Traits
from cryptoplane.engines.inline import InlineEngine
from cryptoplane.engines.threads import ThreadsEngine
from cryptoplane.scheduler.lanes import Run


class Here(InlineEngine):
    name = "here"


class NamedInline(ThreadsEngine):
    """Worker threads that happen to be called "inline"."""

    name = "inline"


def test_the_caller_thread_engine_is_found_by_its_trait_not_its_name() -> None:
    assert Here.traits.caller_thread and not ThreadsEngine.traits.caller_thread
    key = cp.Key.generate("aes-256-gcm")
    nonce = os.urandom(12)
    with cp.Plane(engines=[Here(), "threads"]) as plane:
        ct = plane.encrypt(key, b"x" * 100, nonce=nonce)
        assert key.session_hint.fast_plane is plane  # the fast path serves it
        assert plane.decrypt(key, ct, nonce=nonce) == b"x" * 100
        fut = plane.submit(rq.Encrypt(key, b"y", nonce=nonce))
        assert fut.done()  # small work ran at once, in this thread
        bound = cp.Key.generate("aes-256-gcm")
        plane.session(bound, engine="here")  # bound to it: still the fast path
        plane.encrypt(bound, b"z", nonce=nonce)
        assert bound.session_hint.fast_plane is plane
        st = plane.stats()
        assert st["engines"]["here"]["requests"] == 4
        assert st["engines"]["threads"]["requests"] == 0
        assert st["scheduler"]["submitted"] == 0


def test_an_engine_named_inline_without_the_trait_is_not_the_fast_path() -> None:
    key = cp.Key.generate("aes-256-gcm")
    nonce = os.urandom(12)
    with cp.Plane(engines=[NamedInline(workers=1)]) as plane:
        ct = plane.encrypt(key, b"x" * 100, nonce=nonce)
        assert key.session_hint.fast_plane is None  # no fast path: there is no such engine
        assert plane.decrypt(key, ct, nonce=nonce) == b"x" * 100
        st = plane.stats()
        assert st["scheduler"]["submitted"] == 2 and st["scheduler"]["completed"] == 2
        assert st["engines"]["inline"]["requests"] == 2


def test_lanes_run_only_where_the_traits_say_so() -> None:
    key = cp.Key.generate("ecdsa-p256-sha256")
    lane = Run([rq.Sign(key, b"a"), rq.Sign(key, b"bb")]).lanes(1)[0]
    assert not isinstance(lane, rq.Request)
    assert lane.count == 2 and lane.largest == 2 and lane.nbytes == 3
    with cp.Plane(engines=["inline", "threads"]) as plane:
        threads = plane.engines["threads"]
        assert threads.can_serve(lane)
        threads.traits = Traits(in_process=True, pulls=True)  # no takes_lanes
        assert not threads.can_serve(lane)
        assert threads.can_serve(rq.Sign(key, b"a"))
        with pytest.raises(cp.InvalidRequest):
            plane.submit(lane)  # type: ignore[arg-type]  # a lane is no caller's request


def test_engines_describe_their_traits() -> None:
    with cp.Plane(engines=["inline", "threads"], self_test=False) as plane:
        inline = plane.engines["inline"].describe()["traits"]
        threads = plane.engines["threads"].describe()["traits"]
    assert inline["caller_thread"] and not inline["pulls"] and inline["takes_lanes"]
    assert not threads["caller_thread"] and threads["pulls"] and threads["in_process"]


def test_a_request_holds_only_what_its_caller_set() -> None:
    for name in ("burst", "count", "failed", "elapsed", "largest"):
        assert not hasattr(rq.Request, name), name
