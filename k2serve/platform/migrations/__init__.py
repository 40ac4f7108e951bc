"""Alembic migrations for the platform database; run by `k2serve.platform.db.upgrade`."""
