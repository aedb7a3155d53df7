"""The real fabric server, in this process on its own thread and event loop (for the
client's integration tests), over a SQLite keystore in a temporary folder."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from cryptoplane.fabric.keystore.master import MasterKey
from cryptoplane.fabric.server import Server
from cryptoplane.fabric.service import Service, open_service


class RealServer:
    def __init__(self, folder: Path, *, master: MasterKey | None = None,
                 port: int = 0, unix: str | None = None, **server_kw: Any) -> None:
        self.store_url = f"sqlite:///{folder / 'keys.db'}"
        self.master = master or MasterKey.generate()
        self.port = port
        self.unix = unix  # also listen on this Unix socket (self.unix_url)
        self.server_kw = server_kw
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service: Service | None = None
        self.server: Server | None = None
        self.url = ""

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RealServer:
        if not self.thread.is_alive():
            self.thread.start()
        self.service = open_service(self.store_url, master=self.master)
        listen = [f"tcp://127.0.0.1:{self.port}"]
        if self.unix:
            listen.append(f"unix://{self.unix}")
        self.server = Server(self.service, listen=listen, **self.server_kw)
        self._run(self.server.start())
        self.url = self.server.addresses[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def token(self, tenant: str = "acme", **kw: Any) -> str:
        assert self.service is not None and self.service.store is not None
        return self.service.store.create_token(tenant, **kw)

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            self._run(self.server.shutdown(grace))
            self.server = None
        if self.service is not None:
            self.service.close()
            self.service = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    def __enter__(self) -> RealServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
