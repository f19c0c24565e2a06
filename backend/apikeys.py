"""Optional API keys. Each key opens one collection; the service only ever holds SHA-256 digests of keys.

`API_KEYS` lists `collection:sha256-hex` entries. `python -m backend.apikeys new <collection>` makes a key,
prints it once, and prints the entry to add. A presented key is hashed and compared with every entry in
constant time, so neither timing nor an early exit tells how close a guess came.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass

HEADER = "X-API-Key"
DEFAULT_COLLECTION = "default"
COLLECTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class KeyEntry:
    collection: str
    digest: bytes


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_entry(raw: str) -> KeyEntry:
    """`collection:sha256-hex` -> KeyEntry; ValueError saying what is wrong otherwise."""
    collection, sep, digest = raw.strip().partition(":")
    if not sep:
        # The value is not echoed: it may be a raw key pasted by mistake.
        raise ValueError("an API_KEYS entry is not collection:sha256 (make one: python -m backend.apikeys new NAME)")
    if not COLLECTION_NAME.match(collection):
        raise ValueError(
            f"API_KEYS collection name {collection!r} must be 1-64 of a-z, 0-9, _ and -, starting alphanumeric"
        )
    if not _DIGEST.match(digest.lower()):
        raise ValueError(
            f"API_KEYS entry for {collection!r} needs the key's SHA-256 as 64 hex digits, not the key itself"
        )
    return KeyEntry(collection=collection, digest=bytes.fromhex(digest))


def collection_for(entries: list[KeyEntry], key: str | None) -> str | None:
    """The collection `key` opens, or None. Every entry is compared, whatever matched before."""
    if not key:
        return None
    presented = bytes.fromhex(digest_of(key))
    found = None
    for entry in entries:
        if hmac.compare_digest(entry.digest, presented):
            found = entry.collection
    return found


def new_key() -> str:
    return "io_" + secrets.token_urlsafe(32)


def print_new_key(collection: str) -> None:
    """Make a key for `collection`; print it (once: it is not kept) and the API_KEYS entry that opens it."""
    key = new_key()
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"add to API_KEYS (comma-separated):                     {collection}:{digest_of(key)}")


def main(argv: list[str]) -> int:
    """`python -m backend.apikeys new COLLECTION`, the same as `image-organizer keys new COLLECTION`."""
    if len(argv) != 2 or argv[0] != "new" or not COLLECTION_NAME.match(argv[1]):
        print("usage: python -m backend.apikeys new COLLECTION   (1-64 of a-z, 0-9, _ and -)", file=sys.stderr)
        return 2
    print_new_key(argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
