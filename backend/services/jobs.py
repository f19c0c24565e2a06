"""Background jobs: persisted in the database, run as asyncio tasks, observable and cancellable.

A job's function receives a `JobHandle`; it reports progress through it and calls `checkpoint()`
between units of work, where a requested cancel takes effect. Cancelling is cooperative so that a job
is never interrupted half-way through a commit. At startup, jobs that a previous process left queued
or running are marked failed: nothing is ever left "running" by a restart.

Beside other replicas (PostgreSQL, `shared`): a job runs in the replica that accepted it, which owns its
row (`owner`) and renews its lease (`lease_until`) every third of JOB_LEASE_SECONDS. Every replica reads
every job from the database, and a cancel asked of any replica is a flag on the row that the owner picks up
within a second. A job whose lease ran out (its replica was killed, or lost the database) is failed with
the reason by whichever replica notices first, within one and a half leases; a replica never overwrites
the row of a job that is no longer queued or running, so a job taken from it stays failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import delete, func, literal, or_, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.errors import DomainError, JobFinished, JobNotFound, ShuttingDown, TooManyJobs
from backend.models import ClusterRun, Job, JobKind, JobProgress, JobPublic, JobStatus, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

FINISHED = ("succeeded", "failed", "cancelled")
# Progress is written to the database at most this often (readers of a live job see it at once).
PERSIST_EVERY_SECONDS = 0.5
RESTART_ERROR = "the service stopped while this job was queued or running"
UNFINISHED = ("queued", "running")
# How often a replica looks for cancels asked of its jobs through another replica.
CANCEL_POLL_SECONDS = 1.0
# What a job keeps of the items it could not do: the first MAX_LISTED, each text cut to MAX_TEXT characters.
MAX_LISTED = 100
MAX_TEXT = 500
# Finished jobs older than the retention are deleted at startup and, while jobs keep coming, this often.
EXPIRE_EVERY_SECONDS = 3600.0


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[: MAX_TEXT - 1] + "\u2026"
    return value


class Failures:
    """The items a job could not do, bounded: `count` counts them all, `listed` keeps the first MAX_LISTED
    with every text cut to MAX_TEXT characters (a folder of a million broken links with long paths is one
    number and a hundred short entries, not hundreds of megabytes in the job's result)."""

    def __init__(self) -> None:
        self.count = 0
        self.listed: list[dict[str, Any]] = []

    def add(self, **fields: Any) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append({key: _cut(value) for key, value in fields.items()})


def _detached(job: Job) -> Job:
    """A copy that no session tracks: the live object is only ever changed by its own job."""
    return Job.model_validate(job.model_dump())


class JobCancelled(Exception):
    """Raised inside a job at a checkpoint after a cancel was requested."""


class JobHandle:
    """What a running job sees of itself."""

    def __init__(self, service: JobService, job: Job) -> None:
        self._service = service
        self.job = job
        self._persisted_at = 0.0
        self._cancelled = asyncio.Event()
        # What the job has done so far; kept as its result when it is cancelled or fails part-way.
        self.partial: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.job.id

    def checkpoint(self) -> None:
        if self.job.cancel_requested:
            raise JobCancelled

    def request_cancel(self) -> None:
        self.job.cancel_requested = True
        self._cancelled.set()

    async def unless_cancelled(self, work: Awaitable[T]) -> T:
        """Await `work`, or raise JobCancelled as soon as a cancel is requested, whichever comes first. For
        steps that are safe to abandon (reading a file to stage it): a call in a thread that never returns
        (a read on a dead share) then holds only its thread, not the job, its queue or the shutdown."""
        if self.job.cancel_requested:
            if asyncio.iscoroutine(work):
                work.close()  # never started: nothing to wait for, and no "never awaited" warning
            raise JobCancelled
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            raise JobCancelled
        return task.result()

    async def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress; also a checkpoint."""
        self.job.progress_done = done
        if total is not None:
            self.job.progress_total = total
        new_phase = message is not None and message != self.job.message
        if message is not None:
            self.job.message = message
        now = time.monotonic()
        if new_phase or now - self._persisted_at >= PERSIST_EVERY_SECONDS:
            self._persisted_at = now
            if not await self._service._save(self.job):
                self.request_cancel()  # another replica failed it (its lease lapsed): stop working on it
        self.checkpoint()


JobFunc = Callable[[JobHandle], Awaitable[dict[str, Any]]]


class JobService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        concurrency: int = 1,
        queue_limit: int = 20,
        retention_days: float = 30.0,
        *,
        replica: str = "local",
        lease_seconds: float = 30.0,
        shared: bool = False,
    ) -> None:
        self._sessions = sessions
        self.replica = replica
        self._lease = timedelta(seconds=lease_seconds)
        self._shared = shared
        self._lease_task: asyncio.Task[None] | None = None
        self._retention = timedelta(days=retention_days) if retention_days > 0 else None
        self._expired_at = time.monotonic()
        self._slots = asyncio.Semaphore(concurrency)
        # Clustering has a lane of its own: it takes seconds, and GET /clusters waits for it, so it must
        # not queue behind an import or a re-embedding that takes hours. It reads an index snapshot and
        # stores its run under the write lock, so it is safe next to them.
        self._lanes = {"cluster": asyncio.Semaphore(1)}
        # This process's jobs that have not finished yet: each one's handle (holding the live record) and task.
        self._handles: dict[str, JobHandle] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._queue_limit = queue_limit
        self._closing = False

    async def recover(self) -> int:
        """Mark jobs an earlier process left unfinished as failed; returns how many. Beside other replicas only
        the ones this replica owned before a restart and those whose lease ran out: the others are alive."""
        query = update(Job).where(col(Job.status).in_(UNFINISHED))
        if self._shared:
            query = query.where(
                or_(
                    col(Job.owner) == self.replica,
                    col(Job.owner).is_(None),
                    col(Job.lease_until).is_(None),
                    col(Job.lease_until) < utcnow(),
                )
            )
        async with self._sessions() as session:
            result = await session.exec(query.values(status="failed", error=RESTART_ERROR, finished_at=utcnow()))
            await session.commit()
        return int(result.rowcount or 0)

    def start_leases(self) -> None:
        """Beside other replicas: renew this replica's leases, pick up cancels, fail jobs whose lease ran out."""
        if self._shared and self._lease_task is None:
            self._lease_task = asyncio.create_task(self._lease_loop(), name="job-leases")

    async def _lease_loop(self) -> None:
        seconds = self._lease.total_seconds()
        renewed = expired = time.monotonic()
        while True:
            await asyncio.sleep(min(CANCEL_POLL_SECONDS, seconds / 3))
            try:
                await self._pick_up_cancels()
                now = time.monotonic()
                if now - renewed >= seconds / 3:
                    renewed = now
                    await self._renew()
                if now - expired >= seconds / 2:
                    expired = now
                    failed = await self.fail_expired()
                    if failed:
                        log.warning("failed %d jobs whose replica stopped renewing their lease", failed)
            except Exception:  # the database may be away for a moment: try again at the next tick
                log.exception("job lease upkeep failed")

    async def _renew(self) -> None:
        if not self._handles:
            return
        async with self._sessions() as session:
            await session.exec(
                update(Job)
                .where(col(Job.id).in_(list(self._handles)), col(Job.status).in_(UNFINISHED))
                .values(lease_until=utcnow() + self._lease)
            )
            await session.commit()

    async def _pick_up_cancels(self) -> None:
        local = [job_id for job_id, handle in self._handles.items() if not handle.job.cancel_requested]
        if not local:
            return
        async with self._sessions() as session:
            asked = (await session.exec(select(Job.id).where(col(Job.id).in_(local), col(Job.cancel_requested)))).all()
        for job_id in asked:
            if job_id in self._handles and not self._handles[job_id].job.cancel_requested:
                log.info("job %s: cancel asked through another replica", job_id)
                await self.cancel(job_id)

    async def fail_expired(self) -> int:
        """Fail the queued and running jobs whose lease ran out (their replica died); returns how many."""
        now = utcnow()
        async with self._sessions() as session:
            stale = (
                await session.exec(
                    select(Job.id, Job.owner, Job.lease_until).where(
                        col(Job.status).in_(UNFINISHED), col(Job.lease_until) < now
                    )
                )
            ).all()
            failed = 0
            for job_id, owner, lease_until in stale:
                if job_id in self._handles:
                    continue  # ours: renewed late (a long pause); the next renewal takes it up again
                result = await session.exec(
                    update(Job)
                    .where(col(Job.id) == job_id, col(Job.status).in_(UNFINISHED), col(Job.lease_until) < now)
                    .values(
                        status="failed",
                        finished_at=now,
                        error=f"replica {owner} stopped renewing this job's lease (it stopped, or lost the "
                        f"database) at {lease_until:%Y-%m-%d %H:%M:%S} UTC",
                    )
                )
                failed += int(result.rowcount or 0)
            await session.commit()
        return failed

    async def expire(self) -> int:
        """Delete the jobs that finished longer than the retention ago (JOB_RETENTION_DAYS; 0 keeps them
        all), except the clustering jobs of runs still stored (the page finds runs through them); how many."""
        self._expired_at = time.monotonic()
        if self._retention is None:
            return 0
        made_runs = select(ClusterRun.job_id).where(col(ClusterRun.job_id).is_not(None))
        async with self._sessions() as session:
            result = await session.exec(
                delete(Job)
                .where(col(Job.status).in_(FINISHED))
                .where(col(Job.finished_at) < utcnow() - self._retention)
                .where(col(Job.id).not_in(made_runs))
            )
            await session.commit()
        return int(result.rowcount or 0)

    async def submit(self, kind: str, params: dict[str, Any], func: JobFunc) -> Job:
        """Queue a job; the same kind with the same parameters already queued or running is that job (twenty
        identical requests start one re-embedding, not twenty). TooManyJobs past the queue's limit."""
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        for live in self._unfinished(kind):
            if live.params == params:
                return _detached(live)
        if self._shared:  # one running in another replica
            for other in await self._unfinished_elsewhere(kind):
                if other.params == params:
                    return other
        queued = sum(handle.job.status == "queued" for handle in self._handles.values())
        if queued >= self._queue_limit:
            raise TooManyJobs(
                f"{queued} jobs are waiting already (JOB_QUEUE_LIMIT): wait for some to finish, or cancel some"
            )
        if time.monotonic() - self._expired_at >= EXPIRE_EVERY_SECONDS:
            try:
                await self.expire()
            except Exception:  # housekeeping: never the reason a job is refused
                log.exception("could not delete expired jobs")
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            status="queued",
            params=params,
            owner=self.replica,
            lease_until=utcnow() + self._lease,
        )
        async with self._sessions() as session:
            session.add(_detached(job))
            await session.commit()
        self._handles[job.id] = JobHandle(self, job)
        self._tasks[job.id] = asyncio.create_task(self._run(job, func), name=f"job-{kind}-{job.id[:8]}")
        return _detached(job)

    async def _run(self, job: Job, func: JobFunc) -> None:
        result: dict[str, Any] | None = None
        error: str | None = None
        handle = self._handles[job.id]
        try:
            async with self._lanes.get(job.kind, self._slots):
                if job.cancel_requested:
                    raise JobCancelled
                job.status = "running"
                job.started_at = utcnow()
                await self._save(job)
                result = await func(handle)
            status = "succeeded"
            if job.progress_total is not None:
                job.progress_done = job.progress_total
            job.message = "done"
        except JobCancelled:
            status = "cancelled"
        except asyncio.CancelledError:
            if job.cancel_requested and not self._closing:
                status = "cancelled"
            else:
                status, error = "failed", RESTART_ERROR
        except DomainError as exc:
            status, error = "failed", exc.detail
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            status, error = "failed", f"{type(exc).__name__}: {exc}"[:1000]
        if result is None:
            result = handle.partial
        # All at once, so no reader sees a finished status without its result and time.
        job.status, job.result, job.error, job.finished_at = status, result, error, utcnow()
        save = asyncio.ensure_future(self._save(job))
        try:
            try:
                await asyncio.shield(save)
            except asyncio.CancelledError:
                # Shutdown cancelled us while the end was being written: finish writing it (close() waits
                # for this task), or the saved record would be lost and read "failed" at the next start.
                await save
                raise
        except Exception:
            log.exception("could not record the end of job %s", job.id)
        finally:
            self._forget(job.id)

    def _forget(self, job_id: str) -> None:
        self._handles.pop(job_id, None)
        self._tasks.pop(job_id, None)

    def _unfinished(self, kind: str) -> Iterator[Job]:
        """This process's queued and running jobs of `kind` no cancel was asked for, oldest first."""
        for handle in self._handles.values():
            job = handle.job
            if job.kind == kind and job.status not in FINISHED and not job.cancel_requested:
                yield job

    async def _unfinished_elsewhere(self, kind: str) -> list[Job]:
        async with self._sessions() as session:
            rows = (
                await session.exec(
                    select(Job)
                    .where(Job.kind == kind, col(Job.status).in_(UNFINISHED), col(Job.cancel_requested).is_(False))
                    .order_by(col(Job.created_at))
                )
            ).all()
        return [row for row in rows if row.id not in self._handles]

    async def _save(self, job: Job) -> bool:
        """Write the live record over its row, while the row is still queued or running (a job another replica
        failed for a lapsed lease stays failed). A cancel asked through another replica is never undone."""
        values = job.model_dump(exclude={"id", "cancel_requested", "owner", "created_at", "lease_until"})
        async with self._sessions() as session:
            result = await session.exec(
                update(Job)
                .where(col(Job.id) == job.id, col(Job.status).in_(UNFINISHED))
                .values(**values, cancel_requested=or_(col(Job.cancel_requested), literal(job.cancel_requested)))
            )
            await session.commit()
        if not result.rowcount:
            log.warning("job %s is no longer this replica's to record (%s)", job.id, job.status)
            return False
        return True

    async def get(self, job_id: str) -> Job:
        handle = self._handles.get(job_id)
        if handle is not None:
            return _detached(handle.job)
        async with self._sessions() as session:
            job = await session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} not found")
        return job

    async def list(
        self, *, offset: int, limit: int, kind: str | None = None, status: str | None = None
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and how many match in all."""
        filters = []
        if kind is not None:
            filters.append(Job.kind == kind)
        if status is not None:
            filters.append(Job.status == status)
        query = (
            select(Job).where(*filters).order_by(col(Job.created_at).desc(), col(Job.id)).offset(offset).limit(limit)
        )
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
            total = (await session.exec(select(func.count()).select_from(Job).where(*filters))).one()
        return [_detached(self._handles[row.id].job) if row.id in self._handles else row for row in rows], total

    async def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one at its next checkpoint. A job of another replica is
        flagged; its replica cancels it within CANCEL_POLL_SECONDS."""
        handle = self._handles.get(job_id)
        if handle is None and self._shared:
            job = await self.get(job_id)
            if job.status not in FINISHED:
                async with self._sessions() as session:
                    await session.exec(
                        update(Job)
                        .where(col(Job.id) == job_id, col(Job.status).in_(UNFINISHED))
                        .values(cancel_requested=True)
                    )
                    await session.commit()
                job = await self.get(job_id)
                if job.status not in FINISHED:
                    return job
        if handle is None or handle.job.status in FINISHED:
            job = handle.job if handle is not None else await self.get(job_id)
            raise JobFinished(f"job {job_id} has finished already ({job.status})")
        live = handle.job
        handle.request_cancel()  # also wakes a job waiting in `unless_cancelled`
        task = self._tasks.get(job_id)
        if live.status == "queued" and task is not None:
            task.cancel()  # it only waits for a slot: nothing to interrupt
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if live.status not in FINISHED:
                # Cancelled before its task ever ran: _run never got to record the end, so record it here.
                live.status, live.finished_at = "cancelled", utcnow()
                await asyncio.shield(self._save(live))
                self._forget(job_id)
        else:
            await self._save(live)
        return _detached(live)

    def active(self, kind: str) -> Job | None:
        """The oldest queued or running job of this kind, if any."""
        return next((_detached(job) for job in self._unfinished(kind)), None)

    async def active_anywhere(self, kind: str) -> Job | None:
        """`active`, or beside other replicas the oldest such job any of them runs."""
        job = self.active(kind)
        if job is None and self._shared:
            others = await self._unfinished_elsewhere(kind)
            job = others[0] if others else None
        return job

    async def wait(self, job_id: str) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
            return await self.get(job_id)
        job = await self.get(job_id)
        while job.status not in FINISHED:  # another replica's job: its row says when it ends
            await asyncio.sleep(0.2)
            job = await self.get(job_id)
        return job

    async def close(self) -> None:
        """Stop every job; the ones that were running are recorded as failed."""
        self._closing = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
            self._lease_task = None
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def job_public(job: Job, *, listed: bool = False) -> JobPublic:
    """A job as the API shows it; `listed`: as a listing shows it, its result without lists (counts and
    ids stay; the failures and the ids of what it made are in GET /jobs/{id})."""
    result = job.result
    if listed and result is not None:
        result = {key: value for key, value in result.items() if not isinstance(value, (list, dict))}
    return JobPublic(
        id=job.id,
        kind=cast(JobKind, job.kind),  # the table stores them as text; only these values are written
        status=cast(JobStatus, job.status),
        progress=JobProgress(done=job.progress_done, total=job.progress_total, message=job.message),
        params=job.params,
        cancel_requested=job.cancel_requested,
        result=result,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        url=f"/jobs/{job.id}",
        replica=job.owner,
    )
