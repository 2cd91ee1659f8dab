"""The ``leanauth`` command: one module per group of verbs. Every command takes ``--json``."""

from __future__ import annotations

from leanauth.cli import apps, audit, customers, db, keys, serve, token
from leanauth.cli.common import main

__all__ = ["main"]

for module in (serve, db, apps, customers, keys, token, audit):
    module.register(main)
