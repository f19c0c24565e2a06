"""Background jobs: lifecycle, listing, cancelling, and what a restart does to unfinished jobs."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from backend.config import Settings
from backend.models import Job
from backend.services.jobs import RESTART_ERROR, JobHandle, JobService
from tests.conftest import AppRunner, app_context
from tests.helpers import sql, upload_many, wait_job


def gated_job(gate: asyncio.Event, steps: int = 3, started: asyncio.Event | None = None):
    """A job that reports progress, then waits for `gate` before its last checkpoint."""

    async def run(handle: JobHandle) -> dict[str, object]:
        for step in range(steps):
            await handle.progress(step, steps, "working")
        if started is not None:
            started.set()
        await gate.wait()
        await handle.progress(steps, steps, "done")
        return {"steps": steps}

    return run


async def test_job_lifecycle_from_queued_to_succeeded(client: httpx.AsyncClient) -> None:
    gate = asyncio.Event()
    job = await app_context(client).jobs.submit("caption", {"why": "test"}, gated_job(gate))
    seen = (await client.get(f"/jobs/{job.id}")).json()
    assert seen["status"] in ("queued", "running") and seen["finished_at"] is None
    gate.set()
    done = await wait_job(client, job.id)
    assert done["status"] == "succeeded"
    assert done["result"] == {"steps": 3}
    assert done["progress"] == {"done": 3, "total": 3, "message": "done"}
    assert done["params"] == {"why": "test"} and done["kind"] == "caption"
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["url"] == f"/jobs/{job.id}"


async def test_jobs_are_listed_newest_first_and_filtered(client: httpx.AsyncClient) -> None:
    await upload_many(client, 2)
    for _ in range(2):
        job = (await client.post("/clusters", json={"k": 1, "captions": False})).json()
        await wait_job(client, job["id"])
    listed = (await client.get("/jobs")).json()
    assert listed["count"] == 2
    assert listed["data"][0]["created_at"] >= listed["data"][1]["created_at"]
    assert (await client.get("/jobs", params={"kind": "import"})).json()["count"] == 0
    page = (await client.get("/jobs", params={"status": "succeeded", "limit": 1, "offset": 1})).json()
    assert page["count"] == 2 and [job["id"] for job in page["data"]] == [listed["data"][1]["id"]]
    assert (await client.get("/jobs", params={"status": "sleeping"})).status_code == 422


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, "/jobs/0123456789abcdef")
        assert response.status_code == 404 and response.json()["code"] == "job_not_found"


async def test_cancel_a_running_job_stops_it_at_a_checkpoint(client: httpx.AsyncClient) -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    job = await app_context(client).jobs.submit("import", {}, gated_job(gate, started=started))
    await asyncio.wait_for(started.wait(), 60)
    assert (await client.get(f"/jobs/{job.id}")).json()["status"] == "running"
    response = await client.delete(f"/jobs/{job.id}")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    gate.set()
    finished = await wait_job(client, job.id)
    assert finished["status"] == "cancelled" and finished["result"] is None


async def test_cancel_a_queued_job_at_once(run_app: AppRunner) -> None:
    async with run_app(job_concurrency=1) as client:
        gate = asyncio.Event()
        jobs = app_context(client).jobs
        first = await jobs.submit("import", {"path": "/first"}, gated_job(gate))
        second = await jobs.submit("import", {"path": "/second"}, gated_job(gate))
        response = await client.delete(f"/jobs/{second.id}")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        gate.set()
        assert (await wait_job(client, first.id))["status"] == "succeeded"
        assert (await client.get(f"/jobs/{second.id}")).json()["status"] == "cancelled"


async def test_clustering_does_not_queue_behind_a_long_import(run_app: AppRunner) -> None:
    async with run_app(job_concurrency=1) as client:
        await upload_many(client, 3)
        gate, started = asyncio.Event(), asyncio.Event()
        importing = await app_context(client).jobs.submit("import", {}, gated_job(gate, started=started))
        await started.wait()
        latest = await asyncio.wait_for(client.get("/clusters", params={"captions": "false"}), timeout=60)
        assert latest.status_code == 200 and latest.json()["image_count"] == 3
        assert (await client.get(f"/jobs/{importing.id}")).json()["status"] == "running"
        gate.set()
        assert (await wait_job(client, importing.id))["status"] == "succeeded"


async def test_cancelling_a_finished_job_is_409(client: httpx.AsyncClient) -> None:
    job = (await client.post("/clusters", json={"captions": False})).json()
    await wait_job(client, job["id"])
    response = await client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 409 and response.json()["code"] == "job_finished"


async def test_a_failing_job_reports_its_error(client: httpx.AsyncClient) -> None:
    async def broken(handle: JobHandle) -> dict[str, object]:
        raise RuntimeError("the disk is on fire")

    job = await app_context(client).jobs.submit("reindex", {}, broken)
    finished = await wait_job(client, job.id)
    assert finished["status"] == "failed"
    assert finished["error"] == "RuntimeError: the disk is on fire"


async def test_the_event_loop_answers_while_a_job_works(client: httpx.AsyncClient) -> None:
    release = threading.Event()
    ctx = app_context(client)

    async def busy(handle: JobHandle) -> dict[str, object]:
        await ctx.executor.run(release.wait, 30)  # blocking work, in the executor
        return {}

    job = await ctx.jobs.submit("cluster", {}, busy)
    while (await client.get(f"/jobs/{job.id}")).json()["status"] != "running":
        await asyncio.sleep(0.01)
    health = await client.get("/health")
    assert health.status_code == 200
    assert (await client.get(f"/jobs/{job.id}")).json()["status"] == "running"
    release.set()
    assert (await wait_job(client, job.id))["status"] == "succeeded"


async def test_a_restart_never_leaves_a_job_running(run_app: AppRunner, settings) -> None:
    async with run_app() as client:
        stuck = await app_context(client).jobs.submit("import", {}, gated_job(asyncio.Event()))
        while (await client.get(f"/jobs/{stuck.id}")).json()["status"] != "running":
            await asyncio.sleep(0.01)
    # A process killed outright leaves its rows as they were: simulate one left "running" and one "queued".
    for job_id, status in (("a" * 32, "running"), ("b" * 32, "queued")):
        await sql(
            settings,
            "INSERT INTO job (id, kind, status, params, progress_done, cancel_requested, created_at)"
            " VALUES (:id, 'cluster', :status, '{}', 0, false, '2026-01-01 00:00:00')",
            id=job_id,
            status=status,
        )
    async with run_app() as client:
        for job_id in (stuck.id, "a" * 32, "b" * 32):
            job = (await client.get(f"/jobs/{job_id}")).json()
            assert job["status"] == "failed", job
            assert job["error"] == RESTART_ERROR
            assert job["finished_at"] is not None


async def test_a_job_that_finished_as_the_service_stops_keeps_its_result(
    run_app: AppRunner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the jobs while one is writing its end: the write is completed before the service
    stops, not dropped (it was: the row stayed "running", and the next start reported a job whose work was
    done as failed by the restart)."""
    original = JobService._save
    writing_end = asyncio.Event()

    async def slow_end(self: JobService, job: Job) -> bool:
        if job.status == "succeeded":
            writing_end.set()
            await asyncio.sleep(1.0)  # longer than the rest of the shutdown takes
        return await original(self, job)

    monkeypatch.setattr(JobService, "_save", slow_end)

    async def work(handle: JobHandle) -> dict[str, object]:
        return {"done": True}

    async with run_app() as client:
        job = await app_context(client).jobs.submit("caption", {}, work)
        await writing_end.wait()
    assert await sql(settings, "SELECT status FROM job WHERE id = :id", id=job.id) == [("succeeded",)]
    async with run_app() as client:
        answer = (await client.get(f"/jobs/{job.id}")).json()
    assert (answer["status"], answer["result"], answer["error"]) == ("succeeded", {"done": True}, None), answer


async def test_identical_jobs_are_merged_and_the_queue_is_bounded(run_app: AppRunner) -> None:
    """Twenty identical requests start one job; past JOB_QUEUE_LIMIT waiting jobs, a new one is refused."""
    async with run_app(job_concurrency=1, job_queue_limit=3) as client:
        await upload_many(client, 2)
        gate = asyncio.Event()
        jobs = app_context(client).jobs
        running = await jobs.submit("import", {"path": "/busy"}, gated_job(gate))
        answers = [await client.post("/reindex", params={"all": "true"}) for _ in range(20)]
        assert {a.status_code for a in answers} == {202}
        assert len({a.json()["id"] for a in answers}) == 1  # one re-embedding, not twenty
        reindex = answers[0].json()["id"]
        for n in range(2):
            await jobs.submit("import", {"path": f"/queued-{n}"}, gated_job(gate))
        refused = await client.post("/reindex")  # other parameters: a fourth waiting job
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_jobs"
        listed = (await client.get("/jobs", params={"kind": "reindex"})).json()
        assert listed["count"] == 1
        gate.set()
        assert (await wait_job(client, running.id))["status"] == "succeeded"
        assert (await wait_job(client, reindex))["status"] == "succeeded"
        # Once it has finished, the same request starts a new job.
        again = await client.post("/reindex", params={"all": "true"})
        assert again.status_code == 202 and again.json()["id"] != reindex


async def test_finished_jobs_expire_after_the_retention(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await upload_many(client, 4)
        cluster = (await client.post("/clusters", json={"k": 2, "captions": False})).json()
        await wait_job(client, cluster["id"])
        ctx = app_context(client)
        done = [await ctx.jobs.submit("caption", {"n": n}, _quick) for n in range(2)]
        for job in done:
            await wait_job(client, job.id)
        running = await ctx.jobs.submit("caption", {"n": 2}, gated_job(asyncio.Event()))
    # Age every job by 40 days: the two finished caption jobs are past the 30-day default, the clustering job
    # made a run that is still stored, and the one stopped by the restart is failed but recent.
    aged = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=40)
    await sql(settings, "UPDATE job SET finished_at = :aged WHERE id != :id", aged=aged, id=running.id)
    async with run_app(job_retention_days=0) as client:  # 0 keeps them all
        assert (await client.get("/jobs")).json()["count"] == 4
    async with run_app() as client:
        kept = {job["id"] for job in (await client.get("/jobs")).json()["data"]}
        assert kept == {cluster["id"], running.id}
        assert [(await client.get(f"/jobs/{job.id}")).status_code for job in done] == [404, 404]
        assert (await client.get("/clusters")).status_code == 200


async def _quick(handle: JobHandle) -> dict[str, object]:
    return {"done": True}
