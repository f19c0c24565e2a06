"""A Hypothesis state machine: random sequences of uploads (new and repeated bytes, one file or a batch),
deletes, text and look-alike searches and clustering runs, against a fresh app per sequence. After every
step the three stores agree with each other and with what the client was told:

- the image ids in SQLite == the ids in the FAISS index == the ids GET /images lists (paged) == the ids
  the machine expects (every upload it was answered 201 for, minus what it deleted), and /health counts them;
- every row's original and thumbnail exist, named by the SHA-256 of the bytes that were sent, and the
  original holds exactly those bytes; no file under originals/ or thumbnails/ without a row, nothing left
  in tmp/;
- a deleted id answers 404 on every route that takes an image id, and ids are never handed out again;
- search results only hold existing ids, once each, best first, as many as the index can give;
- each kept clustering run holds exactly the images it clustered that still exist, and runs beyond
  CLUSTER_RUNS_KEPT are gone;
- all of this also holds after a restart on the same storage (the index saved at shutdown, read back).

The app runs with its lifespan on an event loop in a background thread (as a server would: background
jobs, the orphan sweep and caption-on-upload jobs go on between steps); the test thread drives it through
`asyncio.run_coroutine_threadsafe`. Nothing here depends on what the random models say: only ids, counts,
statuses and files.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import threading
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import select

from backend.context import AppContext
from backend.models import Image
from tests.conftest import AppRunner, app_context
from tests.helpers import make_image_bytes, wait_job

pytestmark = pytest.mark.slow

T = TypeVar("T")
SEEDS = st.integers(min_value=0, max_value=7)  # few distinct images, so the same bytes come back often
RUNS_KEPT = 2
CALL_TIMEOUT = 180  # only guards against a hang
QUERIES = ["a dog on a beach", "red", "x" * 300]


class AppThread:
    """An app (the `run_app` context manager) entered and left by one task on a loop in its own thread."""

    def __init__(self, app: AbstractAsyncContextManager[httpx.AsyncClient]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="app-loop", daemon=True)
        self.thread.start()
        self._stop: asyncio.Event | None = None
        self._host: asyncio.Task[None] | None = None
        try:
            self.client = self.call(self._open(app))
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    async def _open(self, app: AbstractAsyncContextManager[httpx.AsyncClient]) -> httpx.AsyncClient:
        self._stop = stop = asyncio.Event()
        ready: asyncio.Future[httpx.AsyncClient] = asyncio.get_running_loop().create_future()

        async def host() -> None:
            try:
                async with app as client:
                    ready.set_result(client)
                    await stop.wait()
            except BaseException as exc:
                if ready.done():
                    raise
                ready.set_exception(exc)

        self._host = asyncio.create_task(host(), name="app-host")
        return await ready

    async def _close(self) -> None:
        assert self._stop is not None and self._host is not None
        self._stop.set()
        await self._host

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self._close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()


class StoresAgree(RuleBasedStateMachine):
    run_app: ClassVar[AppRunner]
    root: ClassVar[Path]
    numbers: ClassVar[itertools.count[int]]

    def __init__(self) -> None:
        super().__init__()
        self.storage = self.root / f"run-{next(self.numbers)}"
        self.start()
        self.restarts = 0
        self.live: dict[int, int] = {}  # image id -> seed of its bytes
        self.deleted: set[int] = set()
        self.handed_out: set[int] = set()  # every id an upload ever answered with
        self.runs: dict[int, set[int]] = {}  # clustering run id -> the ids it clustered

    def start(self) -> None:
        self.app = AppThread(
            type(self).run_app(storage_root=self.storage, cluster_runs_kept=RUNS_KEPT, caption_on_upload=True)
        )
        self.client = self.app.client
        self.ctx: AppContext = app_context(self.client)

    def teardown(self) -> None:
        try:
            self.app.close()
        finally:
            shutil.rmtree(self.storage, ignore_errors=True)

    def id_of(self, seed: int) -> int | None:
        return next((image_id for image_id, s in self.live.items() if s == seed), None)

    # ----- rules ---------------------------------------------------------------------------------------

    @rule(seed=SEEDS)
    def upload_one(self, seed: int) -> None:
        known = self.id_of(seed)
        response = self.app.call(
            self.client.post("/images", files={"file": (f"one{seed}.jpg", make_image_bytes(seed), "image/jpeg")})
        )
        assert response.status_code == (201 if known is None else 200), response.text
        image = response.json()
        assert image["duplicate"] is (known is not None)
        self._record(seed, image["id"], created=known is None)

    @initialize(seeds=st.lists(SEEDS, min_size=1, max_size=5))
    def start_with_some(self, seeds: list[int]) -> None:
        self.upload_batch(seeds)

    @rule(seeds=st.lists(SEEDS, min_size=1, max_size=4))
    def upload_batch(self, seeds: list[int]) -> None:
        files = [("files", (f"b{n}-{s}.jpg", make_image_bytes(s), "image/jpeg")) for n, s in enumerate(seeds)]
        expected_created = len({s for s in seeds if self.id_of(s) is None})
        response = self.app.call(self.client.post("/images", files=files))
        assert response.status_code == (201 if expected_created else 200), response.text
        batch = response.json()
        assert (batch["created"], batch["duplicates"], batch["failed"]) == (
            expected_created,
            len(seeds) - expected_created,
            0,
        ), batch
        for seed, item in zip(seeds, batch["items"], strict=True):
            known = self.id_of(seed)
            assert item["status"] == ("created" if known is None else "duplicate"), (seed, item)
            self._record(seed, item["image"]["id"], created=known is None)

    def _record(self, seed: int, image_id: int, *, created: bool) -> None:
        if created:
            assert image_id not in self.handed_out, f"id {image_id} was handed out before"
            self.live[image_id] = seed
            self.handed_out.add(image_id)
        else:
            assert image_id == self.id_of(seed), f"the duplicate of seed {seed} answered with id {image_id}"

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        image_id = data.draw(st.sampled_from(sorted(self.live)), label="image_id")
        response = self.app.call(self.client.delete(f"/images/{image_id}", params={"purge": "true"}))
        assert response.status_code == 204, response.text
        del self.live[image_id]
        self.deleted.add(image_id)

    @precondition(lambda self: self.deleted)
    @rule(data=st.data())
    def delete_again(self, data: st.DataObject) -> None:
        image_id = data.draw(st.sampled_from(sorted(self.deleted)), label="image_id")
        response = self.app.call(self.client.delete(f"/images/{image_id}", params={"purge": "true"}))
        assert response.status_code == 404, response.text

    @rule(query=st.sampled_from(QUERIES), top_k=st.integers(min_value=1, max_value=10))
    def search_text(self, query: str, top_k: int) -> None:
        response = self.app.call(self.client.get("/search", params={"q": query, "top_k": top_k}))
        assert response.status_code == 200, response.text
        self._check_hits(response.json(), expected=min(top_k, len(self.live)), allowed=set(self.live))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), top_k=st.integers(min_value=1, max_value=10))
    def search_similar(self, data: st.DataObject, top_k: int) -> None:
        image_id = data.draw(st.sampled_from(sorted(self.live)), label="image_id")
        response = self.app.call(self.client.get(f"/images/{image_id}/similar", params={"top_k": top_k}))
        assert response.status_code == 200, response.text
        others = set(self.live) - {image_id}
        self._check_hits(response.json(), expected=min(top_k, len(others)), allowed=others)

    @staticmethod
    def _check_hits(answer: dict, *, expected: int, allowed: set[int]) -> None:
        ids = [hit["image"]["id"] for hit in answer["results"]]
        assert set(ids) <= allowed, f"results hold ids that do not exist (or the query image): {ids}, live {allowed}"
        assert len(ids) == len(set(ids)) == answer["count"] == expected, (ids, answer["count"], expected)
        scores = [hit["score"] for hit in answer["results"]]
        assert scores == sorted(scores, reverse=True), scores

    @rule(k=st.integers(min_value=1, max_value=3), captions=st.booleans(), through_get=st.booleans())
    def cluster(self, k: int, captions: bool, through_get: bool) -> None:
        clustered = set(self.live)
        if through_get:
            params = {"refresh": "true", "k": str(k), "captions": str(captions).lower()}
            response = self.app.call(self.client.get("/clusters", params=params))
            assert response.status_code == 200, response.text
            run_id = response.json()["id"]
        else:
            response = self.app.call(self.client.post("/clusters", json={"k": k, "captions": captions}))
            assert response.status_code == 202, response.text
            job = self.app.call(wait_job(self.client, response.json()["id"]))
            assert job["status"] == "succeeded", job
            run_id = job["result"]["run_id"]
        assert run_id not in self.runs
        self.runs[run_id] = clustered

    @precondition(lambda self: self.restarts < 1)  # one per sequence: a start costs a second
    @rule()
    def restart(self) -> None:
        """Shut the app down and start it again on the same storage: the index is saved and read back."""
        self.app.close()
        self.start()
        self.restarts += 1

    # ----- the invariant -------------------------------------------------------------------------------

    @invariant()
    def stores_agree(self) -> None:
        self.app.call(self._stores_agree())

    async def _stores_agree(self) -> None:
        client, ctx = self.client, self.ctx
        expected = set(self.live)

        async with ctx.sessions() as session:
            rows = (await session.exec(select(Image))).all()
        in_db = {row.id for row in rows if row.id is not None}
        in_index = {int(i) for i in await ctx.index.ids()}
        listed: list[int] = []
        offset = 0
        while True:  # small pages, so paging itself is exercised
            page = (await client.get("/images", params={"offset": offset, "limit": 2})).json()
            assert page["count"] == len(expected), page
            listed += [image["id"] for image in page["data"]]
            if len(page["data"]) < 2:
                break
            offset += 2
        assert len(listed) == len(set(listed)), f"GET /images listed an id twice: {listed}"
        assert in_db == expected, f"SQLite holds {sorted(in_db)}, expected {sorted(expected)}"
        assert in_index == expected, f"the index holds {sorted(in_index)}, expected {sorted(expected)}"
        assert set(listed) == expected, f"GET /images lists {sorted(listed)}, expected {sorted(expected)}"
        health = (await client.get("/health")).json()
        assert (health["images"], health["index"]["size"]) == (len(expected), len(expected)), health

        wanted_files = set()
        for row in rows:
            assert row.id is not None
            sha = hashlib.sha256(make_image_bytes(self.live[row.id])).hexdigest()
            assert row.sha256 == sha, f"row {row.id} is not named by the hash of the bytes sent"
            assert row.storage_key == f"originals/{sha[:2]}/{sha}.jpg", row.storage_key
            assert row.thumbnail_key == f"thumbnails/{sha[:2]}/{sha}.jpg", row.thumbnail_key
            original, thumbnail = ctx.store.path(row.storage_key), ctx.store.path(row.thumbnail_key)
            assert original.is_file() and thumbnail.is_file(), f"row {row.id} lost a file"
            assert hashlib.sha256(original.read_bytes()).hexdigest() == sha, f"row {row.id}'s original changed"
            wanted_files |= {row.storage_key, row.thumbnail_key}
        on_disk = {
            path.relative_to(self.storage).as_posix()
            for folder in ("originals", "thumbnails")
            for path in (self.storage / folder).rglob("*")
            if path.is_file()
        }
        orphans, missing = sorted(on_disk - wanted_files), sorted(wanted_files - on_disk)
        assert on_disk == wanted_files, f"files without a row: {orphans}; rows without a file: {missing}"
        leftovers = [p.name for p in (self.storage / "tmp").iterdir()]
        assert not leftovers, f"temp files left behind: {leftovers}"

        for image_id in self.deleted:
            for route in ("", "/file", "/thumbnail", "/similar"):
                response = await client.get(f"/images/{image_id}{route}")
                assert response.status_code == 404, f"GET /images/{image_id}{route} of a deleted image: {response}"

        kept = sorted(self.runs)[-RUNS_KEPT:]
        for run_id in sorted(self.runs):
            response = await client.get(f"/clusters/{run_id}")
            if run_id not in kept:
                assert response.status_code == 404, f"run {run_id} should have been pruned: {response.text}"
                continue
            assert response.status_code == 200, response.text
            run = response.json()
            assert run["image_count"] == len(self.runs[run_id]), run
            members: list[int] = []
            for cluster in run["clusters"]:
                page = (await client.get(f"/clusters/{run_id}/{cluster['cluster_id']}", params={"limit": 500})).json()
                ids = [member["image"]["id"] for member in page["data"]]
                assert cluster["size"] == page["size"] == len(ids), (cluster, page)
                assert {image["id"] for image in cluster["representatives"]} <= set(ids), cluster
                members += ids
            assert len(members) == len(set(members)), f"an image is in two clusters of run {run_id}: {members}"
            assert set(members) == self.runs[run_id] & expected, (
                f"run {run_id} holds {sorted(members)}; it clustered {sorted(self.runs[run_id])}, "
                f"of which {sorted(self.runs[run_id] & expected)} still exist"
            )


def test_database_files_and_index_agree_after_every_step(run_app: AppRunner, tmp_path: Path) -> None:
    machine = type(
        "StoresAgreeHere",
        (StoresAgree,),
        {"run_app": staticmethod(run_app), "root": tmp_path, "numbers": itertools.count()},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=20,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
