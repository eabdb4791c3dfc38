"""How autogenerate writes the PgQue operations into a revision file.

By default an operation renders as ``op.pgque_create_queue('orders')`` and the revision
imports ``alembic_ops`` (which registers ``op.pgque_*``). With
``context.configure(..., pgque_render_functions=True)`` it renders the typed helper
functions instead, ``pgque_ops.create_queue('orders')`` with ``import alembic_ops as
pgque_ops``, for projects that type-check their migrations. (Not ``as pgque``: that
would shadow the ``pgque`` module of the pgque-py client in the revision.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alembic.autogenerate.render import renderers

from .ops import OPERATIONS, PgqueOperation

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["render_operation"]

_OP_IMPORT = "import alembic_ops  # noqa: F401"
_FUNCTIONS_ALIAS = "pgque_ops"
_FUNCTIONS_IMPORT = f"import alembic_ops as {_FUNCTIONS_ALIAS}"


def render_operation(autogen_context: AutogenContext, operation: PgqueOperation) -> str:
    """The Python source of ``operation``, adding the import it needs to the revision."""
    if autogen_context.opts.get("pgque_render_functions", False):
        autogen_context.imports.add(_FUNCTIONS_IMPORT)
        name = operation.op_name.removeprefix("pgque_")
        return operation.source(prefix=f"{_FUNCTIONS_ALIAS}.", name=name)
    autogen_context.imports.add(_OP_IMPORT)
    prefix = autogen_context.opts.get("alembic_module_prefix") or "op."
    return operation.source(prefix=prefix)


for _op_class in OPERATIONS:
    renderers.dispatch_for(_op_class)(render_operation)
