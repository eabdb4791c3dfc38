"""``python -m sqlalchemy_pgque``: the command line of :mod:`sqlalchemy_pgque.cli`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
