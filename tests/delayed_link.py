"""A slow network link between two processes of this machine, in user space.

:class:`DelayedLink` relays TCP connections from a port of its own to a target port,
holding each piece of data for ``delay`` seconds in each direction, as a link to
another site would (a round trip takes twice the delay; throughput is not limited,
the data in flight is). :meth:`DelayedLink.cut` drops the link and whatever is in
flight on it, as a failing site does: the two ends see their connection closed.

The relay runs in a process of its own (this module as a script), so that the threads
of the test's process (producers, say) do not hold it up, and so that a cut is as
abrupt as a site's failure: the relay is killed. A kernel qdisc (``netem``) would do
the same, but needs root and a kernel module that containers often lack.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from types import TracebackType

__all__ = ["DelayedLink"]

_CHUNK = 65536


class DelayedLink:
    """Relays ``127.0.0.1:port`` to ``127.0.0.1:target_port``, ``delay`` s each way."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(target_port), str(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(10)
            raise RuntimeError(f"the relay exited with {self._process.returncode}")
        self.port = int(line)

    def __enter__(self) -> DelayedLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cut()

    def cut(self) -> None:
        """Drop every relayed connection and the data in flight; accept no more."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._process.wait(10)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()


def _exit_with_parent() -> None:
    # The parent holds our stdin open: its end, however it came, is ours.
    sys.stdin.read()
    os._exit(0)


def _relay(target_port: int, delay: float) -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        near, _ = listener.accept()
        try:
            far = socket.create_connection(("127.0.0.1", target_port), timeout=5)
        except OSError:
            near.close()  # the target is down: so is the link's far end
            continue
        far.settimeout(None)
        for sock in (near, far):
            # As PostgreSQL's own sockets: small messages (a standby's replies) must
            # not wait for Nagle's algorithm, 40 ms at times.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for source, sink in ((near, far), (far, near)):
            in_flight: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
            threading.Thread(target=_receive, args=(source, in_flight, delay),
                             daemon=True).start()
            threading.Thread(target=_deliver, args=(in_flight, sink), daemon=True).start()


def _receive(source: socket.socket, in_flight: queue.SimpleQueue[tuple[float, bytes]],
             delay: float) -> None:
    while True:
        try:
            data = source.recv(_CHUNK)
        except OSError:
            data = b""
        # Empty data: the end of the stream, delivered as late as the data was.
        in_flight.put((time.monotonic() + delay, data))
        if not data:
            return


def _deliver(in_flight: queue.SimpleQueue[tuple[float, bytes]], sink: socket.socket) -> None:
    while True:
        due, data = in_flight.get()
        # The link's latency itself, not a wait for another thread.
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        try:
            if not data:
                sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(data)
        except OSError:
            return


if __name__ == "__main__":
    _relay(int(sys.argv[1]), float(sys.argv[2]))
