"""`image-organizer`: what an operator does from a shell.

`serve` starts the service. The other commands work on the collection's storage directly, in this process,
through the same services the API uses; in the embedded mode (SQLite, the index in the server's memory)
they refuse to run while a server holds the same STORAGE_ROOT, since the two would keep diverging indexes.
Settings come from the environment and `.env`, as for the service. Exit status: 0 done, 1 the work failed
or found problems, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backend import apikeys
from backend.apikeys import COLLECTION_NAME, DEFAULT_COLLECTION
from backend.config import Settings
from backend.context import AppContext
from backend.errors import DomainError

log = logging.getLogger("backend.cli")


class CommandError(Exception):
    """A failure to report in one line, with the exit status it calls for."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-organizer",
        description="Self-hosted image organizer: serve the API, or work on a collection from the shell.",
        epilog="Settings come from the environment and .env (see .env.example). Run `image-organizer COMMAND "
        "--help` for a command's options.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and results")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the service (what run.sh starts)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="how much the server logs (default info)",
    )

    def with_collection(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument(
            "--collection",
            default=DEFAULT_COLLECTION,
            help="the collection to work on (an API_KEYS collection name; default: the default collection)",
        )
        return command

    imports = with_collection(commands.add_parser("import", help="import a folder of images into the collection"))
    imports.add_argument("path", type=Path, help="the folder (its images are copied into the collection)")
    imports.add_argument("--no-recursive", dest="recursive", action="store_false", help="skip sub-folders")

    reindex = with_collection(commands.add_parser("reindex", help="re-embed images with the current CLIP model"))
    reindex.add_argument("--all", action="store_true", help="every image, not only those another model embedded")

    export = with_collection(commands.add_parser("export", help="write a clustering run as folders on disk"))
    export.add_argument("run_id", type=int, metavar="RUN_ID", help="the run's id (GET /clusters shows it)")
    export.add_argument("--to", type=Path, required=True, metavar="DIR", help="a new or empty folder")

    library = commands.add_parser("library", help="folders indexed in place (their files are never changed)")
    library_commands = library.add_subparsers(dest="library_command", required=True, metavar="SUBCOMMAND")
    add = with_collection(library_commands.add_parser("add", help="index a folder in place, and scan it"))
    add.add_argument("path", type=Path, help="the folder (its files stay where they are, read-only)")
    add.add_argument("--name", help="what to call it (default: the folder's name)")
    add.add_argument("--no-watch", dest="watch", action="store_false", help="do not follow it while serving")
    with_collection(library_commands.add_parser("list", help="the libraries with their counts"))
    scan = with_collection(library_commands.add_parser("scan", help="bring a library's changes in now"))
    scan.add_argument("library_id", type=int, metavar="ID", help="the library's id (`library list` shows it)")
    remove = with_collection(library_commands.add_parser("remove", help="forget a library; its files stay"))
    remove.add_argument("library_id", type=int, metavar="ID", help="the library's id")

    check = with_collection(commands.add_parser("check", help="compare the database, the files and the index"))
    check.add_argument("--repair", action="store_true", help="fix what can be fixed without losing data")

    dups = commands.add_parser("duplicates", help="find duplicates, list their groups, keep the best copies")
    dup_commands = dups.add_subparsers(dest="duplicates_command", required=True, metavar="SUBCOMMAND")
    with_collection(dup_commands.add_parser("scan", help="look for duplicates in the whole collection"))
    listing = with_collection(dup_commands.add_parser("list", help="the groups, largest first"))
    listing.add_argument("--tier", choices=["exact", "same_picture", "similar"], help="only this tier")
    listing.add_argument("--limit", type=int, default=50, help="at most this many groups (default 50)")
    resolving = with_collection(
        dup_commands.add_parser("resolve", help="keep each group's suggested keeper; the rest go to the trash")
    )
    resolving.add_argument("--tier", choices=["same_picture", "similar"], default="same_picture")
    resolving.add_argument("--limit", type=int, default=1000, help="at most this many groups (default 1000)")
    resolving.add_argument("--dry-run", action="store_true", help="only say what would be kept and trashed")

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    new_key = key_commands.add_parser("new", help="make a key for a collection and print its API_KEYS entry")
    new_key.add_argument("name", help="the collection the key opens (1-64 of a-z, 0-9, _ and -)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "keys":
            return _new_key(args.name)
        settings = _settings()
        if args.command == "serve":
            return _serve(settings, args.host, args.port, args.log_level)
        _check_name(getattr(args, "collection", DEFAULT_COLLECTION))
        return asyncio.run(_COMMANDS[args.command](settings, args))
    except CommandError as exc:
        print(f"image-organizer: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("image-organizer: interrupted", file=sys.stderr)
        return 130


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise CommandError(f"invalid settings: {problems}", 2) from exc


def _check_name(name: str) -> None:
    if not COLLECTION_NAME.match(name):
        raise CommandError(f"collection name {name!r} must be 1-64 of a-z, 0-9, _ and -", 2)


def _new_key(name: str) -> int:
    _check_name(name)
    apikeys.print_new_key(name)
    return 0


def _serve(settings: Settings, host: str, port: int, log_level: str) -> int:
    from backend.collections import StorageBusy, StorageLock
    from backend.server import serve

    lock = StorageLock(settings.storage_root)
    try:  # a clear message now; the service itself takes the lock when it starts
        lock.acquire()
    except StorageBusy as exc:
        raise CommandError(str(exc)) from exc
    lock.release()

    print(f"starting on http://{host}:{port} (Swagger UI at /docs)", file=sys.stderr)
    serve(settings, host=host, port=port, log_level=log_level)
    return 0


@asynccontextmanager
async def _open(settings: Settings, name: str, *, maintain: bool = True) -> AsyncIterator[AppContext]:
    """One collection opened in this process, with the shared parts it needs; closed (and saved) on exit. A
    domain error, in opening it or in the command's body, becomes the command's error."""
    from transformers.utils import logging as transformers_logging

    from backend.collections import StorageBusy, open_runtime

    transformers_logging.disable_progress_bar()  # one bar per command: the job's
    try:
        # CLIP loads when a command needs it, not on principle.
        # No watcher either: a command does its work and ends.
        update = {"clip_preload": False, "library_watch": False}
        async with open_runtime(settings.model_copy(update=update)) as collections:
            yield await collections.get(name, maintain=maintain)
    except StorageBusy as exc:
        raise CommandError(str(exc)) from exc
    except DomainError as exc:
        raise CommandError(exc.detail) from exc


async def _follow(ctx: AppContext, job_id: str, unit: str) -> dict[str, Any]:
    """Show a job's progress as a bar until it ends; Ctrl-C cancels it. Its result, or CommandError."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit=unit, dynamic_ncols=True, file=sys.stderr)
    try:
        while True:
            job = await ctx.jobs.get(job_id)
            if job.message and bar.desc != job.message:
                bar.set_description(job.message)
            if job.progress_total is not None and bar.total != job.progress_total:
                bar.reset(total=job.progress_total)
            bar.n = job.progress_done
            bar.refresh()
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                with contextlib.suppress(DomainError):
                    await ctx.jobs.cancel(job_id)
                await ctx.jobs.wait(job_id)
                raise
    finally:
        bar.close()
    if job.status != "succeeded":
        raise CommandError(f"the {job.kind} job {job.status}: {job.error or 'cancelled'}")
    return job.result or {}


async def _import(settings: Settings, args: argparse.Namespace) -> int:
    from backend.services.importer import start_import

    async with _open(settings, args.collection) as ctx:
        folder = args.path.expanduser().absolute()
        job = await start_import(ctx, str(folder), recursive=args.recursive, roots=[folder.resolve()])
        result = await _follow(ctx, job.id, "files")
    print(
        f"imported {result['created']} new images, {result['duplicates']} already stored, "
        f"{result['failed']} failed, {result['skipped']} other files skipped"
    )
    for failure in result.get("failures", [])[:20]:
        print(f"  failed: {failure['path']}: {failure['detail']}")
    return 1 if result["failed"] and not (result["created"] or result["duplicates"]) else 0


async def _library(settings: Settings, args: argparse.Namespace) -> int:
    from backend.models import LibraryCreate
    from backend.services import libraries

    async with _open(settings, args.collection) as ctx:
        if args.library_command == "list":
            listed = await libraries.list_libraries(ctx)
            for item in listed.data:
                state = "online" if item.online else f"offline ({item.last_error})"
                scanned = item.scanned_at.isoformat(timespec="seconds") if item.scanned_at else "never"
                print(f"{item.id}\t{item.name}\t{item.path}\t{item.images} images\t{state}\tscanned {scanned}")
            if not listed.data:
                print("no libraries: `image-organizer library add FOLDER` makes one")
            return 0
        if args.library_command == "remove":
            removed = await libraries.delete_library(ctx, args.library_id)
            print(f"forgot library {args.library_id}: {removed} images left the catalog; its files are untouched")
            return 0
        if args.library_command == "add":
            folder = args.path.expanduser().absolute()
            body = LibraryCreate(path=str(folder), name=args.name, watch=args.watch)
            created = await libraries.create_library(ctx, body, roots=[folder.resolve()])
            print(f"library {created.id} ({created.name}): {created.path}")
            library_id, job_id = created.id, created.scan_job
        else:
            library_id, job_id = args.library_id, None
        if job_id is None:
            job_id = (await libraries.start_scan(ctx, library_id)).id
        result = await _follow(ctx, job_id, "files")
    if not result.get("online", True):
        print(f"library {library_id} is offline: {result['reason']}; nothing was removed")
        return 1
    print(
        f"scanned {result['files']} files: {result['added']} new images, {result['linked']} files of known images, "
        f"{result['unchanged']} unchanged, {result['removed']} images removed, {result['pending']} still being "
        f"written, {result['failed']} failed"
    )
    for failure in result.get("failures", [])[:20]:
        print(f"  failed: {failure['path']}: {failure['detail']}")
    return 0


async def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    from backend.services.reindex import start_reindex

    async with _open(settings, args.collection) as ctx:
        job = await start_reindex(ctx, all_images=args.all)
        result = await _follow(ctx, job.id, "images")
    print(f"re-embedded {result['reembedded']} images with {result['model']}, {result['failed']} failed")
    for failure in result.get("failures", [])[:20]:
        print(f"  failed: image {failure['image_id']}: {failure['detail']}")
    return 1 if result["failed"] else 0


async def _export(settings: Settings, args: argparse.Namespace) -> int:
    from backend.services.export import export_to_folder

    async with _open(settings, args.collection) as ctx:
        written, missing = await export_to_folder(ctx, args.run_id, args.to.expanduser().absolute())
    print(f"wrote {written} files into {args.to}" + (f" ({missing} deleted meanwhile, left out)" if missing else ""))
    return 0


async def _duplicates(settings: Settings, args: argparse.Namespace) -> int:
    from backend.models import BulkResolveRequest
    from backend.services import duplicates

    async with _open(settings, args.collection) as ctx:
        if args.duplicates_command == "scan":
            result = await _follow(ctx, (await duplicates.start_scan(ctx)).id, "images")
            counts = ", ".join(f"{n} {tier}" for tier, n in result["groups"].items())
            print(f"scanned {result['images']} images ({result['hashed']} hashed now): groups {counts}")
            return 0
        if args.duplicates_command == "list":
            if not 1 <= args.limit <= 200:
                raise CommandError("--limit must be between 1 and 200", status=2)
            listed = await duplicates.list_groups(ctx, tier=args.tier, limit=args.limit)
            for group in listed.data:
                print(f"{group.id}\t{group.size} images\tkeep {group.keeper_id}: {group.keeper_reason}")
                for member in group.members:
                    mark = "*" if member.keeper else " "
                    image = member.image
                    where = image.path or image.filename
                    print(f"  {mark} {image.id}\t{image.width}x{image.height}\t{image.size_bytes} bytes\t{where}")
            print(
                f"{listed.count} groups"
                + (f" (first {len(listed.data)} shown)" if listed.count > len(listed.data) else "")
            )
            return 0
        if not 1 <= args.limit <= 10_000:
            raise CommandError("--limit must be between 1 and 10000", status=2)
        request = BulkResolveRequest(tier=args.tier, dry_run=args.dry_run, limit=args.limit)
        outcome = await duplicates.resolve_many(ctx, request)
    verb = "would move" if outcome.dry_run else "moved"
    for resolved in outcome.groups:
        print(f"{resolved.group_id}: keep {resolved.kept} ({resolved.reason}); {verb} {resolved.trashed} to the trash")
    print(f"{verb} {outcome.trashed} images to the trash from {len(outcome.groups)} groups")
    return 0


async def _check(settings: Settings, args: argparse.Namespace) -> int:
    from backend.services.maintenance import check_collection

    async with _open(settings, args.collection, maintain=False) as ctx:
        report = await check_collection(ctx, repair=args.repair)
    for line in report.lines():
        print(line)
    return 0 if report.healthy else 1


_COMMANDS = {
    "import": _import,
    "library": _library,
    "reindex": _reindex,
    "export": _export,
    "check": _check,
    "duplicates": _duplicates,
}

if __name__ == "__main__":
    raise SystemExit(main())
