"""Async engine (SQLite + aiosqlite in WAL mode), sessions and schema setup."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.models import SchemaVersion

SCHEMA_VERSION = 2
# Migrations from version N to N+1, as SQL statements. New tables need none: create_all makes them.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "ALTER TABLE image ADD COLUMN caption VARCHAR",
        "ALTER TABLE image ADD COLUMN caption_model VARCHAR",
    ],
}


def create_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # the driver's connection
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit that was acknowledged survives a power loss too, not only a process crash.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def init_schema(engine: AsyncEngine) -> None:
    """Create missing tables, then run any migrations the stored schema version still needs."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    async with AsyncSession(engine, expire_on_commit=False) as session:
        row = (await session.exec(select(SchemaVersion))).first()
        if row is None:
            session.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
            await session.commit()
            return
        if row.version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {row.version}, newer than this code's {SCHEMA_VERSION}"
            )
        while row.version < SCHEMA_VERSION:
            for statement in MIGRATIONS[row.version]:
                await (await session.connection()).execute(text(statement))
            row.version += 1
            session.add(row)
            await session.commit()
