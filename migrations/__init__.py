"""Alembic revisions of the gateway store. Run them with ``gateway db upgrade``."""
