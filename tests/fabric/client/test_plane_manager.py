"""``cp.Plane(remote="manager://...", quota=...)``: a plane whose remote engine runs on
the servers a real manager grants the quota on. RSA-2048 signatures made there verify
locally; the work is paced to the grant; closing the plane releases the grant."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from grantedkit import CAPACITY, managed_pool, manager_call, start_manager
from modekit import Cluster

import cryptoplane as cp
from cryptoplane.engines.base import Health
from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.errors import QuotaRefused


def test_plane_signs_on_granted_servers(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with managed_pool(tmp_path, 2) as (cluster, m):
        monkeypatch.setenv("CRYPTOPLANE_TOKEN", cluster.token)  # the token from the env
        local = cp.Plane(engines=["inline"])
        plane = cp.Plane(engines=["inline"], remote=m.manager_url,
                         quota={"rsa2048": {"ops": 100}})
        try:
            remote = plane.engines["remote"]
            info = remote.describe()
            grant = info["pool"]["grant"]
            assert grant is not None and len(grant["servers"]) == 2
            key = cp.Key.generate("rsa-pss-sha256")
            pub = key.public_key()
            plane.session(key, engine="remote")
            msgs = [b"message %d" % i for i in range(60)]
            start = time.monotonic()
            sigs = plane.map([cp.Sign(key, x) for x in msgs])
            took = time.monotonic() - start
            for x, sig in zip(msgs, sigs, strict=True):
                local.verify(pub, x, sig)
            counters = remote.counters()  # type: ignore[attr-defined]
            assert counters["sent"] >= 60
            # paced to 100/s (a burst of a few at first): 60 take about 0.6 s
            assert took >= 0.4, took
            sent = {u: v["sent"] for u, v in remote.describe()["pool"]["servers"].items()}
            assert set(sent) == set(grant["servers"]) and all(sent.values()), sent
            grant_id = grant["grant_id"]
        finally:
            plane.close()
            local.close()
        left = manager_call(m, cluster.token, "list_grants")
        assert grant_id not in {g["grant_id"] for g in left}


def test_plane_remote_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        cp.Plane(engines=["inline"], remote="manager://127.0.0.1:1")  # no quota
    with pytest.raises(InvalidRequest):
        cp.Plane(engines=["inline"], quota={"rsa2048": {"ops": 1}})  # no remote
    with managed_pool(tmp_path, 1) as (cluster, m):
        with pytest.raises(QuotaRefused):
            cp.Plane(engines=["inline"], remote=m.manager_url, token=cluster.token,
                     quota={"rsa2048": {"ops": 1e6}})
        # a plain server list works too
        with cp.Plane(engines=["inline"], remote=cluster.urls[0],
                      token=cluster.token) as plane:
            assert "remote" in plane.engines


def test_a_manager_not_there_yet_leaves_the_remote_engine_broken_then_heals(
        tmp_path: Path) -> None:
    """The plane starts on its local engines; the grant is asked for in the background
    and the remote engine serves once a manager answers."""
    with socket.socket() as sock:  # a free port nobody listens on yet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = Cluster(tmp_path, 1, start=False)
    with cp.Plane(engines=["inline"], remote=f"manager://127.0.0.1:{port}",
                  quota={"rsa2048": {"ops": 100}}, token=cluster.token) as plane:
        remote = plane.engines["remote"]
        assert remote.health is Health.BROKEN
        key = cp.Key.generate("rsa-pss-sha256")
        sig = plane.run(cp.Sign(key, b"local"))  # the inline engine serves meanwhile
        plane.verify(key.public_key(), b"local", sig)
        m = start_manager(cluster.store_url, tmp_path, listen=f"tcp://127.0.0.1:{port}")
        try:
            cluster.extra = ["--manager", m.manager_url, "--manager-token", cluster.token,
                             "--capacity", CAPACITY]
            cluster.start(0)
            deadline = time.monotonic() + 15
            while remote.health is not Health.OK:
                assert time.monotonic() < deadline, "the remote engine did not heal"
                time.sleep(0.1)
            plane.session(key, engine="remote")
            plane.verify(key.public_key(), b"remote", plane.run(cp.Sign(key, b"remote")))
            assert remote.counters()["sent"] > 0  # type: ignore[attr-defined]
        finally:
            cluster.close()
            m.stop()
