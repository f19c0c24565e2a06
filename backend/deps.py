"""Annotated dependency aliases the routers use, and the API key check that picks the caller's collection."""

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from backend.apikeys import DEFAULT_COLLECTION, HEADER, collection_for
from backend.collections import Collections
from backend.context import AppContext
from backend.errors import Unauthorized

# Declared as a security scheme, so Swagger UI at /docs offers an "Authorize" box for it.
api_key_header = APIKeyHeader(
    name=HEADER,
    auto_error=False,
    description="Needed on every route but /health and the page when API_KEYS is set; it picks the collection.",
)


async def get_context(request: Request, key: Annotated[str | None, Security(api_key_header)] = None) -> AppContext:
    """The caller's collection: the default one without API keys, else the one the X-API-Key opens (401 when
    the key is missing or unknown)."""
    entries = request.app.state.key_entries  # parsed once, by create_app
    default: AppContext = request.app.state.ctx
    if not entries:
        return default
    if len(set(request.headers.getlist(HEADER))) > 1:
        raise Unauthorized(f"send one {HEADER} header, not several different ones")
    collection = collection_for(entries, key)
    if collection is None:
        raise Unauthorized(f"a valid {HEADER} header is required" if key else f"missing {HEADER} header")
    if collection == DEFAULT_COLLECTION:
        return default
    collections: Collections = request.app.state.collections
    return await collections.get(collection)


async def get_context_if_allowed(
    request: Request, key: Annotated[str | None, Security(api_key_header)] = None
) -> AppContext | None:
    """Like get_context, but None instead of a 401 (for /health, which answers everyone)."""
    try:
        return await get_context(request, key)
    except Unauthorized:
        return None


def get_default_context(request: Request) -> AppContext:
    """The default collection, which also holds what every collection shares (the model loaders)."""
    default: AppContext = request.app.state.ctx
    return default


# The caller's collection: every service call of a route works on it.
ContextDep = Annotated[AppContext, Depends(get_context)]
OptionalContextDep = Annotated[AppContext | None, Depends(get_context_if_allowed)]
DefaultContextDep = Annotated[AppContext, Depends(get_default_context)]
