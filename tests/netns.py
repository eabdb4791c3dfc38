"""A second host on this machine: a network namespace joined to ours by a veth pair.

Processes started with :attr:`NetworkNamespace.exec_prefix` run "on" the other host
and reach this one at :attr:`host_address`. :meth:`partition` makes the link drop every
packet in both directions without closing anything (a token bucket too small for any
packet), the way a failed switch or a firewall does; :meth:`heal` restores it. Needs
root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType

__all__ = ["NetworkNamespace", "unavailable_reason"]


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or ``None`` if they can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network namespaces need iproute2 (ip, tc)"
    probe = f"pgqprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


class NetworkNamespace:
    """A namespace ``pgq<pid>`` with the guest side of a veth pair; this namespace
    keeps the host side. Addresses come from 10.231.<n>.0/24, one /24 per process."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"pgq{pid}"
        self._host_link = f"pqh{pid % 100_000}"
        self._guest_link = f"pqg{pid % 100_000}"
        subnet = f"10.231.{pid % 250}"
        self.host_address = f"{subnet}.1"
        self.guest_address = f"{subnet}.2"
        self.exec_prefix: tuple[str, ...] = ("ip", "netns", "exec", self.name)
        self.partitioned = False

    def __enter__(self) -> NetworkNamespace:
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self._host_link, "type", "veth", "peer", "name",
                     self._guest_link)
            self._ip("link", "set", self._guest_link, "netns", self.name)
            self._ip("addr", "add", f"{self.host_address}/24", "dev", self._host_link)
            self._ip("link", "set", self._host_link, "up")
            self._guest("ip", "addr", "add", f"{self.guest_address}/24", "dev",
                        self._guest_link)
            self._guest("ip", "link", "set", self._guest_link, "up")
            self._guest("ip", "link", "set", "lo", "up")
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def partition(self) -> None:
        """Drop every packet between the two hosts from now on, in both directions."""
        # Packets larger than the bucket can never be sent, so tbf drops them all.
        drop = ("root", "tbf", "rate", "1kbit", "burst", "1", "latency", "1ms")
        subprocess.run(["tc", "qdisc", "add", "dev", self._host_link, *drop], check=True)
        self._guest("tc", "qdisc", "add", "dev", self._guest_link, *drop)
        self.partitioned = True

    def heal(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self._host_link, "root"], check=True)
        self._guest("tc", "qdisc", "del", "dev", self._guest_link, "root")
        self.partitioned = False

    def _remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        # The host side goes with its peer, but not always at once.
        subprocess.run(["ip", "link", "del", self._host_link], check=False, capture_output=True)

    def _guest(self, *command: str) -> None:
        subprocess.run([*self.exec_prefix, *command], check=True, capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)
