"""Alembic migrations for SQLite and PostgreSQL (`controlplane db upgrade`)."""
