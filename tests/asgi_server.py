"""An ASGI application served by uvicorn in a thread of this process, on a port the
system picks: for the dashboard's tests, its benchmark and its screenshots."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class Served:
    """``app`` on ``http://127.0.0.1:<port>`` once :meth:`start` returns."""

    def __init__(self, app: Any, *, lifespan: str = "auto") -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)
        self.base = ""

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn stopped before it served")
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 20 s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@contextmanager
def served(app: Any, *, lifespan: str = "auto") -> Iterator[str]:
    """``app`` served while the block runs; yields its base URL."""
    running = Served(app, lifespan=lifespan).start()
    try:
        yield running.base
    finally:
        running.stop()
