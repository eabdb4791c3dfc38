"""A primary and a streaming standby made from real PostgreSQL programs, and failover.

:class:`ReplicatedPair` builds two :class:`~pgcluster.PgCluster` nodes: ``node0``
starts as the primary (``wal_level = replica``, a ``replicator`` role with
REPLICATION), ``node1`` as its standby (``pg_basebackup -R`` with a replication slot,
streaming over the primary's Unix socket). With ``synchronous=True`` the primary's
``synchronous_standby_names`` names the standby, so a commit returns only once the
standby has flushed it.

:meth:`ReplicatedPair.fail_over` stops the primary in ``immediate`` mode (SIGQUIT to
the postmaster, as ``pg_ctl stop -m immediate`` sends: no shutdown checkpoint, every
connection cut at once, a crash as far as clients can tell) and promotes the
standby. :meth:`ReplicatedPair.rebuild_standby` makes the dead node a standby of the
new primary again, so failovers can go back and forth.

Clients reach the pair the way an application would, through one URL naming both
nodes, in a fixed order, with ``target_session_attrs=read-write``
(:meth:`ReplicatedPair.url`): libpq tries each in turn and keeps the one that
accepts writes.

With ``link_delay=`` the standby streams through a :class:`~delayed_link.DelayedLink`,
as from another site: each piece of WAL reaches it ``link_delay`` seconds after the
primary sent it. A failover then cuts the link an instant before it stops the
primary, as the failure of the primary's site would, and whatever WAL was in flight
never arrives: asynchronous replication's loss window at its real size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
from delayed_link import DelayedLink
from pgcluster import PgCluster
from psycopg import conninfo
from sqlalchemy.engine import URL

__all__ = ["Failover", "ReplicatedPair"]

REPLICATOR = "replicator"

_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "4",
    "max_replication_slots": "4",
    # A test can see in a standby's log who tried to connect to it.
    "log_connections": "on",
}


@dataclass(frozen=True)
class Failover:
    """What one failover took, and when it happened."""

    stop_s: float
    """The immediate stop of the primary, until it was down."""
    promote_s: float
    """``pg_ctl promote`` of the standby, until it accepted writes."""
    promote_started: float
    """``time.monotonic()`` when the promotion was asked for."""
    promote_started_wall: float
    """The same moment as ``time.time()``, to compare with the server's
    ``clock_timestamp()`` (one machine, one clock)."""
    promoted: float
    """``time.monotonic()`` when the promoted node accepted writes."""


class ReplicatedPair:
    """``node0`` and ``node1``: one primary, and a streaming standby or a dead node.

    :meth:`start` builds and starts both; leaving the ``with`` block stops and
    deletes both. ``primary`` is the node that accepts writes, ``standby`` the one
    that streams from it (``None`` after a failover, until :meth:`rebuild_standby`).
    """

    def __init__(self, bindir: Path, *, synchronous: bool = True,
                 link_delay: float | None = None) -> None:
        # Under /tmp: as root the servers run as another OS user (see pgcluster).
        self.nodes = tuple(
            PgCluster(bindir, Path(tempfile.mkdtemp(prefix=f"pgque-node{n}-")),
                      settings=_SETTINGS)
            for n in range(2)
        )
        self.synchronous = synchronous
        self.link_delay = link_delay
        self.link: DelayedLink | None = None
        self.primary = self.nodes[0]
        self.standby: PgCluster | None = self.nodes[1]

    def __enter__(self) -> ReplicatedPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.link is not None:
            self.link.cut()
        for node in self.nodes:
            node.destroy()

    def name(self, node: PgCluster) -> str:
        """The node's name, its ``application_name`` when it streams as a standby."""
        return f"node{self.nodes.index(node)}"

    def start(self) -> None:
        """Make and start the primary, then its standby; return once it streams."""
        self.primary.init()
        self.primary.start()
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {REPLICATOR} LOGIN REPLICATION")
        assert self.standby is not None
        self._attach(self.standby)

    def rebuild_standby(self) -> None:
        """Make the node left dead by :meth:`fail_over` a standby of the new primary."""
        assert self.standby is None, "there is a standby already"
        (node,) = (n for n in self.nodes if n is not self.primary)
        node.remove_data()
        self._attach(node)

    def _attach(self, node: PgCluster) -> None:
        name = self.name(node)
        # A node that was a primary kept its synchronous_standby_names; as a standby
        # it would ignore it, but promoted again it would wait for a standby that may
        # not be there.
        node.settings.pop("synchronous_standby_names", None)
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            # A slot keeps the primary's WAL until this standby has it, however far
            # behind it falls, from the copy on. (A promoted standby has no slots:
            # they are not replicated, and pg_basebackup copies none.)
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))
        via = None
        if self.link_delay is not None:
            self.link = DelayedLink(self.primary.port, self.link_delay)
            via = ("127.0.0.1", self.link.port)
        node.init_standby(self.primary, name, REPLICATOR, slot=name, via=via)
        node.start()
        self.standby = node
        # Synchronous only once the standby streams: before that, every commit on the
        # primary would wait for it.
        self.wait_streaming("async")
        if self.synchronous:
            self.primary.configure(synchronous_standby_names=name)
            self.wait_streaming("sync")

    def wait_streaming(self, sync_state: str, timeout: float = 60) -> None:
        """Until the primary shows the standby streaming with ``sync_state``."""
        assert self.standby is not None
        name = self.name(self.standby)
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT sync_state FROM pg_stat_replication "
                    "WHERE application_name = %s AND state = 'streaming'", (name,),
                ).fetchone()
                if row is not None and row[0] == sync_state:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name} not streaming ({sync_state}) after {timeout} s: {row}\n"
                        f"{self.standby.log_text()[-3000:]}"
                    )
                time.sleep(0.05)

    def wait_replayed(self, timeout: float = 60) -> None:
        """Until the standby has replayed all WAL the primary has written so far: a
        synchronous standby confirms commits once their WAL is flushed, before it is
        applied, so what the primary just created may not be visible there yet."""
        standby = self.standby
        assert standby is not None
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert target is not None
        deadline = time.monotonic() + timeout
        with psycopg.connect(standby.dsn(), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target[0],)
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby has not replayed up to {target[0]} "
                                       f"after {timeout} s")
                time.sleep(0.02)

    def fail_over(self, before_promote: Callable[[], object] | None = None) -> Failover:
        """Stop the primary at once (``immediate``), call ``before_promote`` (the
        standby is still read-only then), then promote the standby."""
        standby = self.standby
        assert standby is not None, "no standby to promote"
        started = time.monotonic()
        if self.link is not None:
            self.link.cut()
        self.primary.quit_immediately()
        stopped = time.monotonic()
        if before_promote is not None:
            before_promote()
        promote_started, wall = time.monotonic(), time.time()
        standby.promote()
        promoted = time.monotonic()
        self.primary, self.standby = standby, None
        return Failover(stop_s=stopped - started, promote_s=promoted - promote_started,
                        promote_started=promote_started, promote_started_wall=wall,
                        promoted=promoted)

    def dsn(self, dbname: str = "postgres") -> str:
        """The current primary's libpq string (its Unix socket), for the test's checks."""
        return self.primary.dsn(dbname)

    def url(self, dbname: str = "postgres") -> URL:
        """The application's URL: both nodes over TCP, node0 first, writable only.

        SQLAlchemy's psycopg dialect turns each ``host=h:p`` of the query into libpq's
        ``host=h,h port=p,p``.
        """
        return URL.create(
            "postgresql+psycopg", username="postgres", database=dbname,
            query={"host": tuple(f"127.0.0.1:{node.port}" for node in self.nodes),
                   "target_session_attrs": "read-write"},
        )

    def multi_host_dsn(self, dbname: str = "postgres") -> str:
        """:meth:`url` as a libpq string."""
        return conninfo.make_conninfo(
            host=",".join("127.0.0.1" for _ in self.nodes),
            port=",".join(str(node.port) for node in self.nodes),
            user="postgres", dbname=dbname, target_session_attrs="read-write",
        )
