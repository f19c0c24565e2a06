"""Async engines (SQLite + aiosqlite in WAL mode, or PostgreSQL + asyncpg), sessions and schema setup.

The schema is Alembic's revisions in backend/migrations/versions, one history for both engines. `init_schema`
brings a database to the newest revision at startup: on PostgreSQL under an advisory lock, so of several
replicas starting together exactly one migrates and the others wait for it and find nothing left to do. A
database made by the hand-written schema versions before Alembic (a `schema_version` table) is stamped with
the revision of its version first, then upgraded in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.dbtypes import decode_vector, encode_vector

MIGRATIONS = Path(__file__).parent / "migrations"
# The revision each hand-written schema version corresponds to.
HAND_WRITTEN_VERSIONS = {1: "0001", 2: "0002"}
# pg_advisory_xact_lock key of schema setup: any number the service uses for nothing else.
MIGRATION_LOCK = 0x1A6E_0001


class DatabaseUrlError(ValueError):
    """DATABASE_URL names an engine or driver this service does not run on."""


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL of a DATABASE_URL: `postgresql://` and `postgres://` (with a host, or the socket form
    `postgresql://user@/db?host=/run/postgresql`) take the asyncpg driver; `sqlite://` takes aiosqlite."""
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "asyncpg"):
            raise DatabaseUrlError(f"DATABASE_URL: PostgreSQL runs through asyncpg here, not {driver!r}")
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise DatabaseUrlError(f"DATABASE_URL: SQLite runs through aiosqlite here, not {driver!r}")
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    raise DatabaseUrlError(f"DATABASE_URL: {backend!r} is not supported; use sqlite:// or postgresql://")


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() in ("postgresql", "postgres")


def create_engine(url: str, *, schema: str | None = None, pool_size: int = 5) -> AsyncEngine:
    """An engine for `url`; on PostgreSQL every connection works in `schema` (a collection's), then `public`,
    where the pgvector extension lives."""
    url = normalize_url(url)
    if not is_postgres(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

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
    settings = {"search_path": f'"{schema}", public' if schema else "public"}
    engine = create_async_engine(
        url,
        connect_args={"server_settings": settings},
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _vector_codec(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.run_async(_register_vector_codec)

    return engine


async def _register_vector_codec(connection: Any) -> None:  # an asyncpg connection
    """pgvector's `vector` in its binary format, as the float32 blob (see backend/dbtypes.py). The schema
    setup (init_schema) runs before the extension may exist, on connections of its own without the codec."""
    schema = await connection.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
    )
    if schema is None:
        raise RuntimeError("the pgvector extension is missing from the database: CREATE EXTENSION vector")
    await connection.set_type_codec(
        "vector", schema=schema, encoder=encode_vector, decoder=decode_vector, format="binary"
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _stamp_hand_written(connection: Connection, options: dict[str, Any]) -> None:
    """A database of the schema before Alembic: record the revision its version corresponds to."""
    inspector = inspect(connection)
    tables = set(inspector.get_table_names(schema=inspector.default_schema_name))
    if "alembic_version" in tables or "image" not in tables:
        return
    version = 1
    if "schema_version" in tables:
        version = connection.execute(text("SELECT version FROM schema_version")).scalar_one()
    if version not in HAND_WRITTEN_VERSIONS:
        raise RuntimeError(f"the database has schema version {version}, which this code does not know")
    MigrationContext.configure(connection, opts=options).stamp(
        ScriptDirectory.from_config(_config()), HAND_WRITTEN_VERSIONS[version]
    )


def _migrate(connection: Connection, schema: str | None) -> None:
    if connection.dialect.name == "postgresql":
        # Held to the end of this transaction, which holds the whole upgrade (PostgreSQL's DDL is transactional).
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    # The version table of a collection's schema is its own: unqualified, `alembic_version` would resolve
    # through the search path to public's, and a new collection would look migrated already.
    version_schema = (schema or "public") if connection.dialect.name == "postgresql" else None
    options = {"version_table_schema": version_schema}
    _stamp_hand_written(connection, options)
    config = _config()
    script = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(connection, opts=options).get_current_revision()
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise RuntimeError(f"the database is at schema revision {current}, newer than this code knows")

    def upgrade(revision: Any, _context: Any) -> Any:
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(config, script, fn=upgrade, destination_rev="head") as env:
        env.configure(connection=connection, render_as_batch=True, version_table_schema=version_schema)
        with env.begin_transaction():
            env.run_migrations()


async def init_schema(engine: AsyncEngine, *, schema: str | None = None) -> None:
    """Bring the database (the collection's schema on PostgreSQL) to the newest revision."""
    if engine.dialect.name != "postgresql":
        async with engine.begin() as connection:
            await connection.run_sync(_migrate, schema)
        return
    # Connections of their own: the serving engine's register the vector codec, which needs the extension.
    if schema:
        creator = create_async_engine(engine.url, poolclass=NullPool)
        try:
            async with creator.begin() as connection:
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        finally:
            await creator.dispose()
    # The schema exists before the migrator's first connection: SQLAlchemy takes the default schema, in which
    # the revisions inspect and create tables, from that connection's current_schema().
    search_path = {"search_path": f'"{schema}", public' if schema else "public"}
    migrator = create_async_engine(engine.url, poolclass=NullPool, connect_args={"server_settings": search_path})
    try:
        async with migrator.begin() as connection:
            await connection.run_sync(_migrate, schema)
    finally:
        await migrator.dispose()
