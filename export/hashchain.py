"""The hash chain of the append-only logs: each entry's hash covers the previous entry's hash and the entry's
canonical JSON, so an entry changed, removed, inserted or moved breaks every hash after it.

One helper for the four chains: the model registry's events (``export.registry``, ``events.jsonl``), the review
database's audit trail (``inspection_station.qa.audit``), the shift-start challenge log
(``inspection_station.challenge``, ``challenges.jsonl``) and the record store's rows (``inspection_station.store``,
also the rows PostgreSQL holds). It lives in ``export`` because both of its users may import ``export`` (the
registry is here; ``inspection_station`` imports ``export``) while ``export`` may import neither ``datasets`` nor
``inspection_station``, and it imports nothing of the project itself.

Each chain keeps the canonical form its first entries were written with, so that every stored hash stays
byte-for-byte what it was and old files still verify. The forms differ, and are the arguments here:

=============== ============================================ ======================================
chain           hashed text                                  JSON
=============== ============================================ ======================================
registry        prev + "\\n" + JSON of the event's fields     keys sorted, non-ASCII escaped
audit trail     prev + "\\n" + JSON list of the entry's        non-ASCII as is (UTF-8)
                columns
challenge log   prev + JSON of the line (which holds          keys sorted, non-ASCII escaped
                ``prev`` itself)
record store    JSON list of the row's values, prev last      non-ASCII escaped
=============== ============================================ ======================================

All of them: no spaces (``","`` and ``":"``), NaN written as ``NaN`` (``json.dumps``' default), text hashed
as UTF-8, sha256 in lower-case hex, and the first entry's "previous" hash is :data:`GENESIS`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64  # the first entry's "previous hash"


def canonical_json(value: Any, *, sort_keys: bool = True, ensure_ascii: bool = True) -> str:
    """``value`` as compact JSON (no spaces), the text a chain hashes."""
    return json.dumps(value, sort_keys=sort_keys, ensure_ascii=ensure_ascii, separators=(",", ":"))


def sha256_text(text: str) -> str:
    """sha256 of ``text`` in UTF-8, as lower-case hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(value: Any, *, sort_keys: bool = True, ensure_ascii: bool = True) -> str:
    """sha256 of ``value``'s canonical JSON: for a chain whose entry carries the previous hash inside its
    content (the record store's rows)."""
    return sha256_text(canonical_json(value, sort_keys=sort_keys, ensure_ascii=ensure_ascii))


def link_hash(prev: str, value: Any, *, sep: str = "\n", sort_keys: bool = True, ensure_ascii: bool = True) -> str:
    """sha256 of ``prev + sep + canonical JSON of value``: the hash of an entry that follows the entry whose hash
    is ``prev`` (:data:`GENESIS` for the first)."""
    return sha256_text(prev + sep + canonical_json(value, sort_keys=sort_keys, ensure_ascii=ensure_ascii))
