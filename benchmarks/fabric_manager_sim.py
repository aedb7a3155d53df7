"""Issue 17, acceptance 6: the manager's admission and lease handling for a pool of
1,000 servers and 100,000 clients on one PostgreSQL, simulated.

    .venv/bin/python benchmarks/fabric_manager_sim.py [--servers 1000] [--clients 100000]
        [--duration 120] [--dead 10] [--dsn postgresql://... | --sqlite PATH] [--json]

No sockets: the simulation drives ``FabricState`` (the manager's state, which is all a
manager does besides framing and signing) directly, as two managers would. This process
is manager 1: client threads request grants (a fraction of them later renew or release
one), and a reaper calls ``expire()`` every lease/4. A second process is manager 2: its
threads send every server's heartbeat each lease/3 and it calls ``expire()`` too (the
advisory lock makes one of them do the work). Partway through, ``--dead`` servers stop
heartbeating; once their lease lapses, ``expire()`` moves their grants.

Printed: grants/s admitted, heartbeats/s sustained against the rate needed, p50/p99 of
admit, renew and heartbeat, how long the ``expire()`` that removed the dead servers took
and how many grants it moved, and the final checks read from the database: no class
granted past capacity x overcommit, every live grant placed on live servers only, every
server's placed rates equal to the shares on it. Bounded: clients stop at ``--duration``
(the run reports how many of them got through), heartbeats and the reaper a few
seconds after. Exit status 1 if a check fails.

Without ``--dsn``/``--sqlite`` it starts its own PostgreSQL with the tests' helper
(``tests/fabric/pg.py``: initdb in a temporary folder, Unix socket, fsync off).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptoplane.fabric.errors import KeyNotFound, QuotaRefused
from cryptoplane.fabric.keystore import backend
from cryptoplane.fabric.manager.protocol import Heartbeat, QuotaRequest, Registration
from cryptoplane.fabric.manager.state import FabricState

ROOT = Path(__file__).resolve().parent.parent


def _capacity(i: int) -> dict[str, dict[str, float]]:
    """A server's measured capacity: a mix of machine sizes (1-4 cores' worth)."""
    cores = 1 + i % 4
    return {"rsa2048": {"ops": 1600.0 * cores, "bytes": 0.0},
            "ecdsa-p256": {"ops": 20_000.0 * cores, "bytes": 0.0},
            "aead": {"ops": 400_000.0 * cores, "bytes": 1e9 * cores}}


def _quota(rng: random.Random, scale: float) -> QuotaRequest:
    """A client's ask: mostly RSA for TLS handshakes, some ECDSA, some AEAD traffic;
    ``scale`` sets the mean so that all clients together ask about the pool's capacity."""
    kind = rng.random()
    if kind < 0.6:
        quota = {"rsa2048": {"ops": round(rng.uniform(0.5, 1.5) * 40 * scale, 1),
                             "bytes": 0.0}}
    elif kind < 0.85:
        quota = {"ecdsa-p256": {"ops": round(rng.uniform(0.5, 1.5) * 500 * scale, 1),
                                "bytes": 0.0}}
    else:
        quota = {"aead": {"ops": round(rng.uniform(0.5, 1.5) * 1e4 * scale),
                          "bytes": round(rng.uniform(0.5, 1.5) * 2.5e7 * scale)}}
    mode = "fail-over" if rng.random() < 0.1 else "spread"
    return QuotaRequest(quota=quota, ttl=3600.0, spread=rng.choice((1, 2, 2, 3)), mode=mode)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(values: list[float]) -> str:
    return f"p50 {_pct(values, 0.5) * 1e3:.2f} ms, p99 {_pct(values, 0.99) * 1e3:.2f} ms"


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[str]:
    if args.dsn:
        yield args.dsn
        return
    if args.sqlite:
        yield f"sqlite://{Path(args.sqlite).resolve()}"
        return
    sys.path.insert(0, str(ROOT / "tests" / "fabric"))
    try:
        from pg import PostgresCluster, available  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("no --dsn or --sqlite given, and tests/fabric/pg.py (which starts a "
                 "throwaway PostgreSQL) is not importable: run from a source checkout "
                 "or pass --dsn")
    reason = available()
    if reason:
        sys.exit(f"no --dsn given and no PostgreSQL to start here: {reason}")
    with PostgresCluster() as cluster:
        yield cluster.create_database("fabricsim")


# -- manager 2: the servers' heartbeats ------------------------------------------------


def _heartbeats(url: str, args: argparse.Namespace, dead: list[str], go: Any, die: Any,
                stop: Any, out: Any) -> None:
    """Once ``go`` is set (the servers registered), every server heartbeats each lease/3
    (``dead`` ones stop once ``die`` is set); this process's FabricState also reaps,
    until ``stop``. Sends its figures to ``out``; None first, when it is ready."""
    store = backend(url, **({"pool_size": args.hb_threads + 2} if "postgres" in url else {}))
    state = FabricState(store, lease_seconds=args.lease, overcommit=args.overcommit,
                        manager_id="m2")
    out.put(None)
    go.wait()
    servers = [f"srv-{i:04d}" for i in range(args.servers)]
    dead_set = set(dead)
    period = args.lease / 3
    lat: list[float] = []
    late: list[float] = []
    lost: list[str] = []
    last_beat: dict[str, float] = {}  # wall clock of each dead server's last heartbeat
    expiries: list[dict[str, Any]] = []
    lock = threading.Lock()

    def beat(mine: list[str], offset: float) -> None:
        rng = random.Random(offset)
        my_lat, my_late = [], []
        # each server's beats evenly spread over the period, as real servers drift
        due = {s: time.monotonic() + offset + period * k / len(mine)
               for k, s in enumerate(mine)}
        while due and not stop.is_set():
            sid, when = min(due.items(), key=lambda kv: kv[1])
            now = time.monotonic()
            if when > now:
                stop.wait(min(when - now, 0.5))
                continue
            if sid in dead_set and die.is_set():
                del due[sid]
                continue
            load = {"rsa2048": {"ops": rng.uniform(0, 1000), "bytes": 0.0}}
            t0 = time.perf_counter()
            ok = state.heartbeat(Heartbeat(sid, load, rng.randrange(64)))
            my_lat.append(time.perf_counter() - t0)
            my_late.append(max(0.0, now - when))
            if sid in dead_set:
                last_beat[sid] = time.time()
            if not ok:
                with lock:
                    lost.append(sid)
            due[sid] = when + period
        with lock:
            lat.extend(my_lat)
            late.extend(my_late)

    def reap() -> None:
        while not stop.wait(args.lease / 4):
            t0 = time.perf_counter()
            report = state.expire()
            if report.removed_servers:
                expiries.append({"manager": "m2", "wall": time.time(),
                                 "took_s": time.perf_counter() - t0,
                                 "removed": len(report.removed_servers),
                                 "moved": len(report.moved)})

    threads = [threading.Thread(target=beat, args=(servers[k::args.hb_threads],
                                                   period * k / args.hb_threads))
               for k in range(args.hb_threads)]
    threads.append(threading.Thread(target=reap))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    state.close()
    store.close()
    out.put({"heartbeats": len(lat), "elapsed": elapsed, "lat": lat,
             "late_p99": _pct(late, 0.99), "late_max": max(late, default=0.0),
             "lost": sorted(set(lost)), "expiries": expiries,
             "dead_lapsed_at": max(last_beat.values(), default=0.0) + args.lease})


# -- manager 1: clients and the reaper -------------------------------------------------


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    pg = "postgres" in url
    store = backend(url, **({"pool_size": args.threads + 4} if pg else {}))
    state = FabricState(store, lease_seconds=args.lease, overcommit=args.overcommit,
                        manager_id="m1")
    rng = random.Random(7)
    dead = sorted(rng.sample([f"srv-{i:04d}" for i in range(args.servers)], args.dead))
    ctx = mp.get_context("spawn")
    hb_out = ctx.Queue()
    go, die, stop = ctx.Event(), ctx.Event(), ctx.Event()
    hb = ctx.Process(target=_heartbeats, args=(url, args, dead, go, die, stop, hb_out))
    hb.start()
    hb_out.get(timeout=60)  # manager 2 is up: the leases start now
    t_setup = time.perf_counter()
    for i in range(args.servers):
        state.register(Registration(f"srv-{i:04d}", f"tcp://10.0.{i // 250}.{i % 250}:7070",
                                    _capacity(i)))
    setup_s = time.perf_counter() - t_setup
    go.set()
    # asks sized so that all clients together ask ~1.3x the pool (some are refused)
    pool_rsa = sum(_capacity(i)["rsa2048"]["ops"] for i in range(args.servers))
    scale = 1.3 * pool_rsa * args.overcommit / (0.6 * 40 * args.clients)
    start = time.monotonic()
    stop_clients = start + args.duration

    counter = iter(range(args.clients))
    counter_lock = threading.Lock()
    lat = {"admit": [], "renew": [], "release": []}  # type: dict[str, list[float]]
    counts = {"admitted": 0, "refused": 0, "renewed": 0, "released": 0, "moved_seen": 0}
    merge = threading.Lock()
    errors: list[str] = []
    ended: list[float] = []

    def client(k: int) -> None:
        r = random.Random(k)
        mine: list[tuple[str, str]] = []
        my = {"admit": [], "renew": [], "release": []}  # type: dict[str, list[float]]
        c = dict.fromkeys(counts, 0)
        try:
            while time.monotonic() < stop_clients:
                with counter_lock:
                    n = next(counter, None)
                if n is None:
                    break
                tenant = f"tenant-{n % 500}"
                t0 = time.perf_counter()
                try:
                    g = state.admit(tenant, _quota(r, scale))
                    mine.append((tenant, g.grant_id))
                    c["admitted"] += 1
                except QuotaRefused:
                    c["refused"] += 1
                my["admit"].append(time.perf_counter() - t0)
                if mine and r.random() < args.renew:
                    tenant, gid = r.choice(mine)
                    t0 = time.perf_counter()
                    try:
                        state.renew(tenant, gid)
                        c["renewed"] += 1
                    except (QuotaRefused, KeyNotFound):
                        pass
                    my["renew"].append(time.perf_counter() - t0)
                if mine and r.random() < args.release:
                    tenant, gid = mine.pop(r.randrange(len(mine)))
                    t0 = time.perf_counter()
                    state.release(tenant, gid)
                    c["released"] += 1
                    my["release"].append(time.perf_counter() - t0)
        except Exception as e:  # reported, and the run fails
            errors.append(f"{type(e).__name__}: {e}")
        with merge:
            for key, v in my.items():
                lat[key].extend(v)
            for key, n in c.items():
                counts[key] += n
            ended.append(time.monotonic())

    expiries: list[dict[str, Any]] = []
    stop_reaper = threading.Event()

    def reaper() -> None:
        while not stop_reaper.wait(args.lease / 4):
            t0 = time.perf_counter()
            report = state.expire()
            if report.removed_servers:
                expiries.append({"manager": "m1", "wall": time.time(),
                                 "took_s": time.perf_counter() - t0,
                                 "removed": len(report.removed_servers),
                                 "moved": len(report.moved)})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.threads)]
    reap = threading.Thread(target=reaper)
    reap.start()
    for t in threads:
        t.start()
    # the dead servers stop at --die-after of the duration, or when the clients are done
    die_at = start + args.duration * args.die_after
    while time.monotonic() < die_at and any(t.is_alive() for t in threads):
        time.sleep(0.05)
    die_wall = time.time()
    die.set()
    # then wait until they are reaped (bounded: two leases and a bit)
    gone_by = time.monotonic() + 2 * args.lease + 2
    dead_set = set(dead)
    while dead_set and time.monotonic() < gone_by:
        time.sleep(0.25)
        if not dead_set & {s.server_id for s in state.servers()}:
            break
    for t in threads:
        t.join()
    clients_s = max(ended, default=time.monotonic()) - start
    stop.set()
    stop_reaper.set()
    hb_result = hb_out.get(timeout=60)
    hb.join(timeout=30)
    reap.join()
    state.expire()  # whatever lapsed last is reaped before the checks
    checks = _checks(state, hb_result["dead_lapsed_at"])
    status = state.status()
    state.close()
    store.close()
    return {
        "servers": args.servers, "clients_asked": args.clients,
        "clients_done": counts["admitted"] + counts["refused"], "threads": args.threads,
        "backend": "postgresql" if pg else "sqlite", "lease_s": args.lease,
        "register_s": round(setup_s, 2), "client_phase_s": round(clients_s, 2),
        **counts,
        "grants_per_s": round(counts["admitted"] / clients_s, 1),
        "requests_per_s": round((counts["admitted"] + counts["refused"]) / clients_s, 1),
        "admit_p50_ms": round(_pct(lat["admit"], 0.5) * 1e3, 2),
        "admit_p99_ms": round(_pct(lat["admit"], 0.99) * 1e3, 2),
        "renew_p50_ms": round(_pct(lat["renew"], 0.5) * 1e3, 2),
        "renew_p99_ms": round(_pct(lat["renew"], 0.99) * 1e3, 2),
        "heartbeats": hb_result["heartbeats"],
        "heartbeats_per_s": round(hb_result["heartbeats"] / hb_result["elapsed"], 1),
        "heartbeats_needed_per_s": round(args.servers / (args.lease / 3), 1),
        "heartbeat_p50_ms": round(_pct(hb_result["lat"], 0.5) * 1e3, 2),
        "heartbeat_p99_ms": round(_pct(hb_result["lat"], 0.99) * 1e3, 2),
        "heartbeat_late_p99_s": round(hb_result["late_p99"], 3),
        "leases_lost_alive": [s for s in hb_result["lost"] if s not in dead],
        "dead": len(dead),
        "expiries": [{**e, "at": e.pop("wall") - die_wall} for e in sorted(
            expiries + hb_result["expiries"], key=lambda e: float(e["wall"]))],
        "capacity": status["capacity"], "granted": status["granted"],
        "live_grants": len(status["grants"]), "checks": checks, "errors": errors,
    }


def _checks(state: FabricState, dead_lapsed_at: float) -> dict[str, Any]:
    """What the database says at the end. The dead servers took their capacity with
    them, so a class may now be granted past what the live servers have; that is no
    over-admission only if no grant of the class came after their leases lapsed (each
    admission checks against the live servers, and only admissions add to the total)."""
    from cryptoplane.fabric.manager.placement import MEASURES
    st = state.status()
    live = {s["server_id"] for s in st["servers"] if s["lease_expires_in"] >= 0}
    over = []
    oversubscribed = []
    for cls, got in st["granted"].items():
        cap = st["capacity"].get(cls, {"ops": 0.0, "bytes": 0.0})
        for m in MEASURES:
            if got[m] <= cap[m] * state.overcommit * (1 + 1e-9):
                continue
            last = max((g["issued_at"] for g in st["grants"] if cls in g["quota"]),
                       default=0.0)
            what = f"{cls} {m}: {got[m]:.0f} > {cap[m] * state.overcommit:.0f}"
            if last > dead_lapsed_at:
                over.append(f"{what}, last granted {last - dead_lapsed_at:.2f} s after "
                            "the dead servers' leases lapsed")
            else:
                oversubscribed.append(what)
    # the granted total, recomputed from the rows, against the same capacity
    recount: dict[str, dict[str, float]] = {}
    for g in st["grants"]:
        for cls, r in g["quota"].items():
            t = recount.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
            for m in MEASURES:
                t[m] += r[m]
    for cls, got in recount.items():
        for m in MEASURES:
            if abs(got[m] - st["granted"].get(cls, {}).get(m, 0.0)) > 1e-3 * max(1, got[m]):
                over.append(f"{cls} {m}: rows sum {got[m]:.0f}, pool total "
                            f"{st['granted'].get(cls, {}).get(m, 0.0):.0f}")
    off = [g["grant_id"] for g in st["grants"]
           if not g["servers"] or any(s["server_id"] not in live for s in g["servers"])]
    shares: dict[tuple[str, str, str], float] = {}
    for g in st["grants"]:
        for s in g["servers"]:
            for cls, r in s["rates"].items():
                for m in MEASURES:
                    key = (s["server_id"], cls, m)
                    shares[key] = shares.get(key, 0.0) + r[m]
    placed_ok = all(
        abs(shares.get((s["server_id"], cls, m), 0.0) - s["granted"].get(cls, {}).get(m, 0.0))
        < 1e-3 * max(1.0, shares.get((s["server_id"], cls, m), 0.0))
        for s in st["servers"] for cls in s["capacity"] for m in MEASURES)
    return {"over_admitted": over, "oversubscribed_by_deaths": oversubscribed,
            "grants_off_live_servers": off,
            "placed_matches_shares": placed_ok,
            "ok": not over and not off and placed_ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=1000)
    p.add_argument("--clients", type=int, default=100_000)
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds the clients may take (the run stops them there)")
    p.add_argument("--dead", type=int, default=10, help="servers that stop heartbeating")
    p.add_argument("--die-after", type=float, default=0.4,
                   help="when they stop, as a fraction of --duration (or once the "
                   "clients are done)")
    p.add_argument("--lease", type=float, default=10.0)
    p.add_argument("--overcommit", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=8, help="client threads")
    p.add_argument("--hb-threads", type=int, default=4, help="heartbeat threads")
    p.add_argument("--renew", type=float, default=0.2,
                   help="chance a client then renews one of its grants")
    p.add_argument("--release", type=float, default=0.1,
                   help="chance a client then releases one of its grants")
    p.add_argument("--dsn", help="a PostgreSQL libpq URI (default: start a throwaway one)")
    p.add_argument("--sqlite", help="an SQLite file instead of PostgreSQL")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    if args.dead > args.servers:
        p.error("--dead must be at most --servers")
    with _database(args) as url:
        result = run(args, url)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    sys.exit(0 if result["checks"]["ok"] and not result["errors"] else 1)


def _print(r: dict[str, Any]) -> None:
    print(f"{r['servers']} servers, {r['clients_done']} of {r['clients_asked']} clients in "
          f"{r['client_phase_s']} s ({r['threads']} threads, {r['backend']}, lease "
          f"{r['lease_s']} s; registering took {r['register_s']} s)")
    print(f"grants: {r['admitted']} admitted, {r['refused']} refused, {r['renewed']} "
          f"renewed, {r['released']} released; {r['grants_per_s']} grants/s "
          f"({r['requests_per_s']} requests/s)")
    print(f"admit p50 {r['admit_p50_ms']} ms, p99 {r['admit_p99_ms']} ms; renew p50 "
          f"{r['renew_p50_ms']} ms, p99 {r['renew_p99_ms']} ms")
    print(f"heartbeats: {r['heartbeats']} at {r['heartbeats_per_s']}/s (needed "
          f"{r['heartbeats_needed_per_s']}/s), p50 {r['heartbeat_p50_ms']} ms, p99 "
          f"{r['heartbeat_p99_ms']} ms, late p99 {r['heartbeat_late_p99_s']} s; live "
          f"servers that lost their lease: {len(r['leases_lost_alive'])}")
    for e in r["expiries"]:
        print(f"expire() on {e['manager']}: {e['removed']} dead servers removed "
              f"{e['at']:.1f} s after they stopped, {e['moved']} grants moved in "
              f"{e['took_s'] * 1e3:.0f} ms")
    print(f"capacity {json.dumps(r['capacity'])}")
    print(f"granted  {json.dumps(r['granted'])} ({r['live_grants']} live grants)")
    c = r["checks"]
    if c["oversubscribed_by_deaths"]:
        print("granted past the live servers since the dead ones left (no grant of the "
              "class since): " + "; ".join(c["oversubscribed_by_deaths"]))
    print(f"checks: over-admitted {c['over_admitted'] or 'none'}; grants off live servers "
          f"{len(c['grants_off_live_servers'])}; placed = shares: "
          f"{c['placed_matches_shares']} -> {'OK' if c['ok'] else 'FAILED'}")
    for e in r["errors"]:
        print("error:", e)


if __name__ == "__main__":
    main()
