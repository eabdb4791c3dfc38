"""``python -m sqlalchemy_pgque install|uninstall|version|sql``: manage the engine."""

from __future__ import annotations

from .schema import main

raise SystemExit(main())
