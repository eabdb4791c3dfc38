"""Every test gets a fresh database with the app's schema: the template database is
migrated once per session with the app's own Alembic migrations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "orders" / "alembic.ini"


@pytest.fixture(scope="session")
def pgque_template_setup() -> Callable[[URL], None]:
    def migrate(url: URL) -> None:
        config = Config(str(ALEMBIC_INI))
        # ConfigParser interpolates %, and a socket path in the URL may be %-escaped.
        url_text = url.render_as_string(hide_password=False).replace("%", "%%")
        config.set_main_option("sqlalchemy.url", url_text)
        command.upgrade(config, "head")  # the engine, the queue, the subscription, the tables

    return migrate
