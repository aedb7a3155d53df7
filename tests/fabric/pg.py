"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temporary
directory, reachable only through a Unix socket there.

PostgreSQL refuses to run as root, and CI runs tests as root: then the server runs as
``nobody`` (``subprocess``'s ``user``/``group``, no extra groups) in a directory owned
by it; as anyone else it runs as the current user. Authentication is ``trust`` (the
socket's directory is the boundary), superuser ``postgres``; fsync and friends are off
because a test cluster's durability is worth nothing and startup/commit speed is.

    with PostgresCluster() as pg:
        dsn = pg.create_database("t1")   # postgresql://postgres@/t1?host=...&port=...
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

PORT = 5432  # the socket lives in our own directory, so the default port is free


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are (``PG_BIN`` overrides), newest version first."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def available() -> str | None:
    """Why a cluster cannot start here, or None if it can."""
    d = bin_dir()
    if d is None or not (d / "initdb").exists() or not (d / "pg_ctl").exists():
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt install postgresql"
    return None


class PostgresCluster:
    def __init__(self, *, options: dict[str, str] | None = None) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        found = bin_dir()
        assert found is not None
        self.bin: Path = found
        self.options = {"listen_addresses": "''", "fsync": "off",
                        "synchronous_commit": "off", "full_page_writes": "off",
                        "max_connections": "200", **(options or {})}
        self.dir: Path | None = None
        self.running = False
        self._run_as: dict[str, Any] = {}

    # -- paths ------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir

    @property
    def data_dir(self) -> Path:
        return self.socket_dir / "data"

    def _as_server(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[
            bytes]:
        return subprocess.run([str(a) for a in args], capture_output=True, check=check,
                              cwd=self.socket_dir, env={**os.environ, "HOME": str(self.dir),
                                                        "LC_ALL": "C"},
                              **self._run_as)

    # -- life -------------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        """Makes the cluster on first call, then starts the server (waits until ready)."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="cp-pg-"))
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
                self._run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid,
                                "extra_groups": []}
            os.chmod(self.dir, 0o700)
            self._as_server(self.bin / "initdb", "-D", self.data_dir, "-U", "postgres",
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        opts = " ".join(f"-c {k}={v}" for k, v in self.options.items())
        opts += f" -c unix_socket_directories={self.socket_dir} -p {PORT}"
        try:
            self._as_server(self.bin / "pg_ctl", "-D", self.data_dir, "-l",
                            self.socket_dir / "server.log", "-w", "-t", "60", "-o", opts,
                            "start")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"pg_ctl start failed: {e.stderr.decode(errors='replace')}"
                               f"\n{self.log()}") from None
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect clients, shut down cleanly; ``immediate``: like a
        crash (recovery at the next start)."""
        if self.running:
            self._as_server(self.bin / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w",
                            "stop", check=False)
            self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log(self) -> str:
        p = self.socket_dir / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    # -- databases ----------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URI (also a keystore url) for ``dbname`` as the superuser."""
        return (f"postgresql://postgres@/{quote(dbname)}?host={quote(str(self.socket_dir))}"
                f"&port={PORT}")

    def create_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # ~30 ms: a fresh one per test is fine
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_dump(self, dbname: str = "postgres") -> bytes:
        """The database as plain SQL (what an operator's backup would hold)."""
        out = subprocess.run([str(self.bin / "pg_dump"), "--no-owner", "-d",
                              self.dsn(dbname)], capture_output=True, check=True)
        return out.stdout

    def wait_ready(self, timeout: float = 10.0) -> None:
        import psycopg
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
