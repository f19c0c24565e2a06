"""Streaming multipart reception: each file part goes straight into STORAGE_ROOT/tmp as it arrives,
hashed and counted on the way, so a file past MAX_UPLOAD_BYTES is refused without being kept and
nothing is spooled twice. Parsing is python-multipart's; writing and hashing run in the app's executor.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from backend.errors import DomainError, MalformedMultipart, NoFileSent, TooManyFilesError
from backend.executor import Executor
from backend.services.storage import FileStore, IncomingFile, StagingWriter

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # declared for type checkers only

    from backend.context import AppContext

MAX_TEXT_FIELDS = 16


def multipart_body(*, required: bool = True, **fields: tuple[bool, str]) -> dict[str, object]:
    """OpenAPI requestBody for file fields, given as name=(many, description); `format: binary` is what
    Swagger UI turns into file pickers."""
    properties: dict[str, object] = {}
    for name, (many, description) in fields.items():
        binary = {"type": "string", "format": "binary"}
        properties[name] = (
            {"type": "array", "items": binary, "description": description}
            if many
            else {**binary, "description": description}
        )
    schema: dict[str, object] = {"type": "object", "properties": properties}
    if required and len(fields) == 1:
        schema["required"] = list(fields)
    return {"requestBody": {"required": required, "content": {"multipart/form-data": {"schema": schema}}}}


@dataclass
class ReceivedFile(IncomingFile):
    """An IncomingFile for the services, with its staging writer while the part is being received."""

    writer: StagingWriter | None = field(default=None, repr=False)


@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_name: bytes = b""
    header_value: bytes = b""
    target: ReceivedFile | None = None


class _Collector:
    """python-multipart callbacks: they only record events; the async loop acts on them."""

    def __init__(self, wanted: set[str], max_files: int, charset: str) -> None:
        self.wanted = wanted
        self.max_files = max_files
        self.charset = charset
        self.files: list[ReceivedFile] = []
        self.events: list[tuple[str, ReceivedFile, bytes]] = []
        self.file_parts = 0
        self.text_parts = 0
        self.part = _PartState()

    def decode(self, raw: bytes) -> str:
        """A header parameter as text. The request's charset may name a codec that is not a text encoding
        (base64, rot13: LookupError) or that fails whatever the error handler (idna: UnicodeError): UTF-8 then."""
        try:
            return raw.decode(self.charset, errors="replace")
        except (LookupError, UnicodeError):
            return raw.decode("utf-8", errors="replace")

    def on_part_begin(self) -> None:
        self.part = _PartState()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.part.header_name.lower()] = self.part.header_value
        self.part.header_name = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise MalformedMultipart('a multipart part has no Content-Disposition "name"')
        name = self.decode(options[b"name"])
        if b"filename" not in options:
            self.text_parts += 1
            if self.text_parts > MAX_TEXT_FIELDS:
                raise MalformedMultipart(f"more than {MAX_TEXT_FIELDS} text fields", code="too_many_fields")
            return
        self.file_parts += 1
        if self.file_parts > self.max_files:
            raise TooManyFilesError(f"more than {self.max_files} files in one request")
        if name in self.wanted:
            received = ReceivedFile(form_field=name, filename=self.decode(options[b"filename"]))
            self.files.append(received)
            self.part.target = received
            self.events.append(("open", received, b""))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.target is not None:
            self.events.append(("data", self.part.target, data[start:end]))

    def on_part_end(self) -> None:
        if self.part.target is not None:
            self.events.append(("close", self.part.target, b""))


@asynccontextmanager
async def receive_files(
    request: Request,
    *,
    store: FileStore,
    executor: Executor,
    fields: set[str],
    max_files: int,
    max_file_bytes: int,
) -> AsyncIterator[list[ReceivedFile]]:
    """Stage the file parts of the named fields; whatever is still in tmp/ on exit is removed."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    collector: _Collector | None = None
    try:
        if content_type == b"multipart/form-data":
            if b"boundary" not in params:
                raise MalformedMultipart("multipart body without a boundary")
            charset = params.get(b"charset", b"utf-8").decode("latin-1")
            try:
                charset = codecs.lookup(charset).name
            except LookupError:
                charset = "utf-8"
            collector = _Collector(fields, max_files, charset)
            await _parse(request, collector, params[b"boundary"], store, executor, max_file_bytes)
        yield collector.files if collector else []
    finally:
        for received in collector.files if collector else []:
            if received.writer is not None:
                await executor.run(received.writer.abort)
            if received.staged is not None:
                await executor.run(store.discard, received.staged)  # a no-op once ingest moved it


@asynccontextmanager
async def receive_uploads(
    request: Request, ctx: AppContext, *, fields: set[str], missing: str, max_files: int | None = None
) -> AsyncIterator[list[IncomingFile]]:
    """receive_files with the app's limits; a body without any file part is refused with `missing` as the reason."""
    async with receive_files(
        request,
        store=ctx.store,
        executor=ctx.executor,
        fields=fields,
        max_files=ctx.settings.max_files_per_request if max_files is None else max_files,
        max_file_bytes=ctx.settings.max_upload_bytes,
    ) as received:
        if not received:
            raise NoFileSent(missing)
        yield list(received)


async def _parse(
    request: Request,
    collector: _Collector,
    boundary: bytes,
    store: FileStore,
    executor: Executor,
    max_file_bytes: int,
) -> None:
    try:
        parser = MultipartParser(boundary, _callbacks(collector))
        async for chunk in request.stream():
            parser.write(chunk)
            await _apply(collector, store, executor, max_file_bytes)
        parser.finalize()
        await _apply(collector, store, executor, max_file_bytes)
    except FormParserError as exc:  # a bad boundary, broken framing, oversized part headers
        raise MalformedMultipart(f"malformed multipart body: {exc}") from exc
    for received in collector.files:
        if received.staged is None and received.error is None:
            received.error = MalformedMultipart("the file part ended before the body did")


def _callbacks(collector: _Collector) -> MultipartCallbacks:
    return {
        "on_part_begin": collector.on_part_begin,
        "on_part_data": collector.on_part_data,
        "on_part_end": collector.on_part_end,
        "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value,
        "on_header_end": collector.on_header_end,
        "on_headers_finished": collector.on_headers_finished,
    }


async def _apply(collector: _Collector, store: FileStore, executor: Executor, max_file_bytes: int) -> None:
    """Carry out the recorded events: open, write (one call per part per chunk), finish."""
    events, collector.events = collector.events, []
    pending: ReceivedFile | None = None
    buffered: list[bytes] = []

    async def flush() -> None:
        nonlocal pending
        if pending is not None and buffered and pending.writer is not None:
            try:
                await executor.run(pending.writer.write, b"".join(buffered))
            except DomainError as exc:  # too large: the writer has removed its file
                pending.writer, pending.error = None, exc
        pending = None
        buffered.clear()

    for kind, received, data in events:
        if kind == "data":
            if received is not pending:
                await flush()
                pending = received
            buffered.append(data)
            continue
        await flush()
        if kind == "open":
            received.writer = await executor.run(store.open_staging, max_file_bytes)
        elif kind == "close" and received.writer is not None:
            writer, received.writer = received.writer, None
            if writer.size == 0 and not received.filename:
                # What a browser sends for a file input left empty: not an upload at all.
                await executor.run(writer.abort)
                collector.files.remove(received)
                continue
            try:
                received.staged = await executor.run(writer.finish)
            except DomainError as exc:  # empty file
                received.error = exc
    await flush()
