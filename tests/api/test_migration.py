"""A database made by the first schema version opens with the current code, its images intact."""

from __future__ import annotations

import sqlite3

from tests.conftest import AppRunner
from tests.helpers import upload_many


async def test_a_version_1_database_is_migrated(run_app: AppRunner, settings) -> None:
    async with run_app() as client:
        images = await upload_many(client, 2)
    # Turn the file back into what version 1 made: no caption columns, none of the new tables.
    db = sqlite3.connect(settings.storage_root / "organizer.db")
    with db:
        db.execute("PRAGMA foreign_keys=OFF")
        for table in ("image_tag", "cluster_member", "cluster", "cluster_run", "job"):
            db.execute(f"DROP TABLE {table}")
        db.execute("ALTER TABLE image DROP COLUMN caption")
        db.execute("ALTER TABLE image DROP COLUMN caption_model")
        db.execute("UPDATE schema_version SET version = 1")
    db.close()

    async with run_app() as client:
        listed = (await client.get("/images")).json()
        assert listed["count"] == 2
        assert all(image["caption"] is None and image["tags"] == [] for image in listed["data"])
        captioned = await client.post(f"/images/{images[0]['id']}/caption")
        assert captioned.status_code == 200 and captioned.json()["caption"] is not None
    db = sqlite3.connect(settings.storage_root / "organizer.db")
    assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 2
    db.close()
