"""The API tests run on both database backends: `[sqlite]`, the embedded default, and `[postgres]`, a fresh
database on the session's real PostgreSQL with pgvector. `-m sqlite` or `-m postgres` runs one of them;
`@pytest.mark.sqlite_only("why")` keeps a test to SQLite (it reads the SQLite file itself)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import BACKENDS, database_for


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from database_for(request, request.param)
