"""The pool's events between managers: ``{"event": "moved"|"revoked", "grant_id"}``,
``{"event": "servers"}``, and ``{"event": "resync"}`` from a listener that lost its
connection (events meanwhile are lost: NOTIFY has no replay).

On PostgreSQL, ``state.py`` sends them with ``NOTIFY cryptoplane_fabric`` inside the
changing transaction (delivered at commit to every listening manager, the sender
included); ``listen`` is one subscription's listener thread, on its own connection,
reconnecting with backoff.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "cryptoplane_fabric"
LISTEN_WAIT = 5.0  # how long subscribe() waits for its LISTEN to be on

Event = dict[str, Any]
EventCallback = Callable[[Event], None]


def call(cb: EventCallback, event: Event) -> None:
    """A subscriber's failure is its own: logged, and the others still hear."""
    try:
        cb(event)
    except Exception:
        log.exception("fabric event subscriber failed")


def listen(connect: Callable[[], Any], on_event: EventCallback, stop: threading.Event,
           ready: threading.Event) -> None:
    """LISTENs on a connection from ``connect`` (psycopg, autocommit) until ``stop``,
    calling ``on_event`` per notification; sets ``ready`` once listening; after a lost
    connection, reconnects and says "resync"."""
    import psycopg

    backoff = 0.1
    first = True
    while not stop.is_set():
        try:
            with connect() as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                ready.set()
                if not first:
                    call(on_event, {"event": "resync"})
                first, backoff = False, 0.1
                while not stop.is_set():
                    for n in conn.notifies(timeout=0.2):
                        try:
                            event = json.loads(n.payload)
                        except ValueError:
                            continue
                        if isinstance(event, dict):
                            call(on_event, event)
        except psycopg.Error:
            if stop.is_set():
                return
            log.warning("fabric listener lost its connection; reconnecting")
            first = False
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)


def retryable(e: BaseException) -> bool:
    """A PostgreSQL deadlock or serialisation failure: the transaction was rolled back
    and can run again."""
    return type(e).__name__ in ("DeadlockDetected", "SerializationFailure")
