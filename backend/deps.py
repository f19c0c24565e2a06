"""Annotated dependency aliases the routers use, and the API key check."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.apikeys import DEFAULT_COLLECTION, HEADER, collection_for
from backend.context import AppContext
from backend.errors import AppError

# Declared as a security scheme, so Swagger UI at /docs offers an "Authorize" box for it.
api_key_header = APIKeyHeader(
    name=HEADER,
    auto_error=False,
    description="Needed on every route but /health and the page when API_KEYS is set; it picks the collection.",
)


class UnauthorizedError(AppError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="unauthorized", status_code=401)


async def get_context(request: Request, key: Annotated[str | None, Security(api_key_header)] = None) -> AppContext:
    """The caller's collection: the default one without API keys, else the one the X-API-Key opens (401 when
    the key is missing or unknown)."""
    entries = request.app.state.key_entries  # parsed once, by create_app
    if not entries:
        return request.app.state.ctx  # type: ignore[no-any-return]
    if len(set(request.headers.getlist(HEADER))) > 1:
        raise UnauthorizedError(f"send one {HEADER} header, not several different ones")
    collection = collection_for(entries, key)
    if collection is None:
        raise UnauthorizedError(f"a valid {HEADER} header is required" if key else f"missing {HEADER} header")
    if collection == DEFAULT_COLLECTION:
        return request.app.state.ctx  # type: ignore[no-any-return]
    return await request.app.state.collections.get(collection)  # type: ignore[no-any-return]


async def get_context_if_allowed(
    request: Request, key: Annotated[str | None, Security(api_key_header)] = None
) -> AppContext | None:
    """Like get_context, but None instead of a 401 (for /health, which answers everyone)."""
    try:
        return await get_context(request, key)
    except UnauthorizedError:
        return None


async def get_session(ctx: Annotated[AppContext, Depends(get_context)]) -> AsyncIterator[AsyncSession]:
    async with ctx.sessions() as session:
        yield session


ContextDep = Annotated[AppContext, Depends(get_context)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
