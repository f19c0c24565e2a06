"""Alembic revisions of the schema: one history for SQLite and PostgreSQL (see backend/db.py)."""
