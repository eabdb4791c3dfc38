"""PgQue in Alembic migrations: reversible operations, offline SQL, autogenerate.

Activation
----------
Installing ``sqlalchemy-pgque`` publishes this package as the Alembic plugin ``pgque``
(entry point group ``alembic.plugins``), so Alembic >= 1.18 loads it whenever Alembic
is imported. Importing it yourself in ``env.py`` does the same and documents the
dependency::

    import alembic_ops  # registers op.pgque_* and the autogenerate comparator

Operations
----------
``op.pgque_install(sql_path=None)``, ``op.pgque_uninstall()``,
``op.pgque_create_queue(name, **config)``, ``op.pgque_drop_queue(name, force=False)``,
``op.pgque_subscribe(queue, consumer)``, ``op.pgque_unsubscribe(queue, consumer)``,
``op.pgque_subscribe_subconsumer(queue, consumer, subconsumer)``,
``op.pgque_unsubscribe_subconsumer(queue, consumer, subconsumer, batch_handling=0)``,
``op.pgque_set_queue_config(queue, param, value)``,
``op.pgque_grant(role, reader=True, writer=True)`` and ``op.pgque_revoke(...)``::

    def upgrade():
        op.pgque_install()
        op.pgque_create_queue("orders", ticker_max_lag="500 milliseconds")
        op.pgque_subscribe("orders", "order_worker")

Each runs in the migration's transaction: a failure (subscribing to a queue that does
not exist, dropping a queue that still has consumers, installing over a foreign
``pgque`` schema) raises :class:`PgqueMigrationError` or
:class:`sqlalchemy_pgque.ForeignSchemaError` and the whole migration rolls back.
``alembic upgrade --sql`` prints the same statements, the complete engine script
included, as a script for ``psql``. Every operation has a ``reverse()``, which
autogenerate uses to write ``downgrade()``; the docstrings of the classes in
:mod:`alembic_ops.ops` say exactly what each reverse restores. ``op.pgque_*`` is
unknown to type checkers; the same operations exist as typed functions
(``alembic_ops.create_queue(...)`` etc., see :mod:`alembic_ops.functions`).

Autogenerate
------------
Declare queues in a :class:`sqlalchemy_pgque.queue.QueueRegistry` and hand it over in
``env.py``::

    from myapp.queues import registry   # Queue("orders", consumers=[...], registry=registry)

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        pgque_registry=registry,
        # pgque_manage_all=True,        # also drop queues the registry does not declare
        # pgque_render_functions=True,  # render pgque.create_queue(...) instead of op.pgque_*
    )

``alembic revision --autogenerate`` then renders, with the imports they need:

* ``op.pgque_install()`` when the engine is missing and the registry declares queues;
* for each declared queue missing from the database, ``op.pgque_create_queue`` with its
  ``config`` and ``op.pgque_subscribe`` for its consumers;
* for each declared queue present: ``op.pgque_set_queue_config`` for every declared
  setting whose database value differs (the downgrade restores the database value;
  settings the declaration does not mention are left alone), ``op.pgque_subscribe``
  for declared consumers that are missing, and ``op.pgque_unsubscribe`` for
  subscribed consumers the declaration does not list (cooperative subconsumers are
  removed first; subconsumers themselves are registered at run time and not compared);
* for each cooperative consumer in a queue's ``cooperative`` mapping that has no
  subconsumers, ``op.pgque_subscribe_subconsumer(queue, consumer, subconsumer)``, with
  ``convert_normal=True`` when a normal consumer of that name exists;
* only with ``pgque_manage_all=True``: for each queue in the database that the
  registry does not declare, unsubscribe its consumers and ``op.pgque_drop_queue``.
  Off by default because dropping a queue loses its events, and queues created
  outside the registry (by other applications or by hand) would be dropped.

Without ``pgque_registry`` the comparator renders nothing. The engine's own tables
(schema ``pgque``) never take part in table autogenerate, also with
``include_schemas=True``: the comparator removes the schema before Alembic's table
comparison runs. If the application's metadata maps PgQue tables, also pass
``include_object=alembic_ops.include_object``.

The comparator is registered globally when this package is imported and is also part
of the ``pgque`` plugin (``autogenerate_plugins=["alembic.autogenerate.*", "pgque"]``);
with both it still runs once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations.ops import UpgradeOps
    from alembic.runtime.plugins import Plugin
    from alembic.util import PriorityDispatchResult


# Alembic imports this package through its entry point while Alembic itself is being
# imported. When `import alembic_ops` came first, that happens in the middle of this
# module, so setup() is defined before anything here imports Alembic, and the
# comparator it registers imports its implementation only when autogenerate runs.
def setup(plugin: Plugin) -> None:
    """Alembic >= 1.18 plugin hook (entry point ``alembic.plugins: pgque``).

    The operations are registered when this package is imported; this adds the
    autogenerate comparator to the plugin.
    """
    from alembic.util import DispatchPriority

    plugin.add_autogenerate_comparator(
        _compare_queues, "schema", qualifier="postgresql", priority=DispatchPriority.FIRST
    )
    if globals().get("_global_comparator_pending"):
        # Loaded by the entry point before Alembic's global comparator registry
        # existed: forget this module so that `import alembic_ops` in env.py runs it
        # again and registers the comparator globally (the submodules stay loaded).
        # The flag is set only once this module has run to its end, so a call made
        # from the middle of the user's own `import alembic_ops` never gets here.
        sys.modules.pop(__name__, None)


def _compare_queues(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: set[str | None]
) -> PriorityDispatchResult:
    from .compare import compare_queues

    return compare_queues(autogen_context, upgrade_ops, schemas)


from . import render  # noqa: E402
from .filters import include_name, include_object  # noqa: E402
from .functions import (  # noqa: E402
    create_queue,
    drop_queue,
    grant,
    install,
    revoke,
    set_queue_config,
    subscribe,
    subscribe_subconsumer,
    uninstall,
    unsubscribe,
    unsubscribe_subconsumer,
)
from .ops import (  # noqa: E402
    CreateQueueOp,
    DropQueueOp,
    GrantOp,
    InstallOp,
    RevokeOp,
    SetQueueConfigOp,
    SubscribeOp,
    SubscribeSubconsumerOp,
    UninstallOp,
    UnsubscribeOp,
    UnsubscribeSubconsumerOp,
)
from .toimpl import PgqueMigrationError  # noqa: E402

_global_comparator_pending = not hasattr(
    sys.modules.get("alembic.autogenerate.compare"), "comparators"
)
if not _global_comparator_pending:
    from . import compare  # noqa: F401

__all__ = [
    "CreateQueueOp",
    "DropQueueOp",
    "GrantOp",
    "InstallOp",
    "PgqueMigrationError",
    "RevokeOp",
    "SetQueueConfigOp",
    "SubscribeOp",
    "SubscribeSubconsumerOp",
    "UninstallOp",
    "UnsubscribeOp",
    "UnsubscribeSubconsumerOp",
    "create_queue",
    "drop_queue",
    "grant",
    "include_name",
    "include_object",
    "install",
    "render",
    "revoke",
    "set_queue_config",
    "setup",
    "subscribe",
    "subscribe_subconsumer",
    "uninstall",
    "unsubscribe",
    "unsubscribe_subconsumer",
]
