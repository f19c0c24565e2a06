"""The schema is Alembic's revisions: they make what the models declare, and a library made by the hand-written
schema versions before them upgrades in place without losing a row."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from backend import models  # noqa: F401 - the tables the metadata holds
from backend.db import create_engine, head_revision, init_schema
from tests.conftest import AppRunner
from tests.helpers import upload_many, wait_job


async def test_the_revisions_make_what_the_models_declare(settings) -> None:
    settings.storage_root.mkdir(parents=True)
    engine = create_engine(settings.effective_database_url)
    await init_schema(engine)
    await init_schema(engine)  # a second start finds nothing to do
    async with engine.connect() as connection:
        diff = await connection.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
        )
        revision = await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    await engine.dispose()
    assert diff == []
    assert revision == head_revision()


def _rows(path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(path)
    try:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("image", "image_tag", "job", "cluster_run", "cluster", "cluster_member")
        }
    finally:
        db.close()


def _as_hand_written(path, version: int) -> None:
    """Turn the file into what the hand-written schema made: a `schema_version` table, no Alembic."""
    db = sqlite3.connect(path)
    with db:
        db.execute("DROP TABLE alembic_version")
        db.execute("CREATE TABLE schema_version (id INTEGER NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id))")
        db.execute("INSERT INTO schema_version VALUES (1, ?)", (version,))
        # Added by the revisions after the hand-written versions.
        db.execute("ALTER TABLE job DROP COLUMN owner")
        db.execute("ALTER TABLE job DROP COLUMN lease_until")
        db.execute("DROP TABLE library_dismissed")
        db.execute("DROP TABLE duplicate_pair")
        db.execute("DROP TABLE duplicate_decision")
        db.execute("DROP INDEX ix_image_trashed_at")
        for column in ("phash", "trashed_at"):
            db.execute(f"ALTER TABLE image DROP COLUMN {column}")
        db.execute("DROP TABLE library_file")
        db.execute("DROP TABLE library")
        db.execute("DROP INDEX ix_image_library_id")
        for column in ("library_id", "path", "offline"):
            db.execute(f"ALTER TABLE image DROP COLUMN {column}")
        db.execute("DROP INDEX ix_image_taken_at")
        db.execute("DROP INDEX ix_image_latitude")
        for column in ("taken_at_offset", "latitude", "longitude", "altitude", "camera_make", "camera_model", "lens"):
            db.execute(f"ALTER TABLE image DROP COLUMN {column}")
    db.close()


@pytest.mark.sqlite_only("the hand-written schema versions were SQLite's")
async def test_a_hand_written_version_2_library_upgrades_without_losing_a_row(run_app: AppRunner, settings) -> None:
    async with run_app() as client:
        images = await upload_many(client, 3)
        job = (await client.post("/clusters", json={"k": 2, "captions": False})).json()
        assert (await wait_job(client, job["id"]))["status"] == "succeeded"
        await client.post(f"/images/{images[0]['id']}/caption")
    path = settings.storage_root / "organizer.db"
    _as_hand_written(path, 2)
    before = _rows(path)
    assert len(before["image"]) == 3 and before["cluster_member"] and before["job"]

    async with run_app() as client:
        listed = (await client.get("/images")).json()
        assert listed["count"] == 3
        assert (await client.get("/search", params={"q": "a photo"})).json()["count"] == 3
    # Every row is as it was (the new columns come after the old ones, empty).
    after = {table: [row[: len(rows[0])] for row in _rows(path)[table]] for table, rows in before.items() if rows}
    assert after == {table: rows for table, rows in before.items() if rows}
    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()
    db.close()
    assert "schema_version" not in tables


@pytest.mark.sqlite_only("the hand-written schema versions were SQLite's")
async def test_a_version_1_database_is_migrated(run_app: AppRunner, settings) -> None:
    async with run_app() as client:
        images = await upload_many(client, 2)
    # Turn the file back into what version 1 made: no caption columns, none of the new tables.
    path = settings.storage_root / "organizer.db"
    _as_hand_written(path, 1)
    db = sqlite3.connect(path)
    with db:
        db.execute("PRAGMA foreign_keys=OFF")
        for table in ("image_tag", "cluster_member", "cluster", "cluster_run", "job"):
            db.execute(f"DROP TABLE {table}")
        db.execute("ALTER TABLE image DROP COLUMN caption")
        db.execute("ALTER TABLE image DROP COLUMN caption_model")
    db.close()

    async with run_app() as client:
        listed = (await client.get("/images")).json()
        assert listed["count"] == 2
        assert all(image["caption"] is None and image["tags"] == [] for image in listed["data"])
        captioned = await client.post(f"/images/{images[0]['id']}/caption")
        assert captioned.status_code == 200 and captioned.json()["caption"] is not None
    db = sqlite3.connect(path)
    assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()
    db.close()
