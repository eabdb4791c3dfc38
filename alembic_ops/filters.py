"""Autogenerate filters that keep the PgQue engine's own objects out of table comparison."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.runtime.environment import NameFilterParentNames, NameFilterType
    from sqlalchemy.schema import SchemaItem

__all__ = ["ENGINE_SCHEMA", "include_name", "include_object"]

ENGINE_SCHEMA = "pgque"


def include_name(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """An ``include_name`` filter that leaves out the ``pgque`` schema and its tables.

    The comparator already removes the schema from reflection; pass this to
    ``context.configure(include_name=...)`` as well if your own filters or metadata
    look at schemas before it runs.
    """
    if type_ == "schema":
        return name != ENGINE_SCHEMA
    return parent_names.get("schema_name") != ENGINE_SCHEMA


def include_object(
    obj: SchemaItem,
    name: str | None,
    type_: NameFilterType,
    reflected: bool,
    compare_to: SchemaItem | None,
) -> bool:
    """An ``include_object`` filter that leaves out tables of the ``pgque`` schema.

    Needed only when the application's metadata maps PgQue's tables (for example to
    read ``pgque.queue``): without it autogenerate would try to create them.
    """
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return getattr(table, "schema", None) != ENGINE_SCHEMA
