"""The shared hash-chain helper (export/hashchain.py) and the chains built on it.

The golden hashes below were computed by each chain's own code before the helper existed: every stored hash
(registry events, audit entries, challenge log lines, record store rows) must stay byte-for-byte what it was, or
existing files would no longer verify.
"""

from __future__ import annotations

import hashlib
import json

from vialinspect.export import hashchain, registry
from vialinspect.export.hashchain import GENESIS, canonical_json, content_hash, link_hash, sha256_text
from vialinspect.inspection_station import challenge, store
from vialinspect.inspection_station.qa import audit

AUDIT_GOLDEN = "6b63404220fa1730f798ca5b6f5458cdce4281858347c29e205c9f30bd719567"
AUDIT_GOLDEN_2 = "a0c42006fd1fb1604d1715a9a329a90f35a512880706a9fd7faf632098b73cea"
REGISTRY_GOLDEN = "bf3146dca7808443711073e5fe37fb9367aa81d7ccf8dc47fd2dcf81d28643b3"
CHALLENGE_GOLDEN = "d402e4d73a9890ce0357e1b935e4ed84c2e6d262d6965b4dbf9f0aa08e033fd4"
STORE_GOLDEN = "ed16edc468660ff248451f0f09e086d47a6f81395306b5b7fb012f41606ab310"

EVENT = {"seq": 1, "at_utc": "2024-05-01T08:00:00+00:00", "action": "add", "version": "abc123", "actor": "qa ü",
         "reason": "first", "recipe": "vial-2R", "details": {"b": 1, "a": [1.5, None]}}
CHALLENGE_LINE = {"type": "challenge", "passed": True, "set_hash": "f" * 64, "note": "é",
                  "rule": {"mode": "all", "k": 2}, "prev": GENESIS}


def _store_row() -> dict:
    row = dict.fromkeys(store._CHAINED)
    row.update(container_id="unit-ü", sequence=3, decided_at=1714550400.25,
               decided_at_utc="2024-05-01T08:00:00.250+00:00", recorded_at_utc="2024-05-01T08:00:00.300+00:00",
               recipe="vial-2R", model_version="m1", accept=0, reasons='["particle"]', scores='{"particle":0.9}',
               thresholds='{"particle":0.5}', fill_height_mm=12.5, timings_ms="{}", frames='["f0.png"]', has_maps=1,
               prev_hash=GENESIS)
    return row


def test_every_chain_hashes_as_it_did_before_the_shared_helper():
    assert audit.entry_hash(GENESIS, 1, "2024-05-01T08:00:00.000+00:00", "alice", "review", "unit-1", None,
                            '{"verdict":"false_reject","comment":"Glasfehler ü"}', "geprüft") == AUDIT_GOLDEN
    assert audit.entry_hash("ab" * 32, 2, "2024-05-01T08:00:01.000+00:00", "bob", "login", None, None, None,
                            None) == AUDIT_GOLDEN_2
    assert registry._event_hash(GENESIS, EVENT) == REGISTRY_GOLDEN
    assert challenge._line_hash(GENESIS, CHALLENGE_LINE) == CHALLENGE_GOLDEN
    assert store.row_hash(_store_row()) == STORE_GOLDEN


def test_the_chains_share_one_genesis():
    assert GENESIS == "0" * 64
    assert audit.GENESIS_HASH == registry.GENESIS == challenge.GENESIS == store.GENESIS == GENESIS


def test_each_chain_is_the_helper_with_its_own_canonical_form():
    # registry: prev, newline, sorted keys, non-ASCII escaped
    text = GENESIS + "\n" + json.dumps(EVENT, sort_keys=True, separators=(",", ":"))
    assert "\\u00fc" in text and link_hash(GENESIS, EVENT) == hashlib.sha256(text.encode()).hexdigest()
    # audit trail: prev, newline, a JSON list with non-ASCII kept as UTF-8
    entry = [1, "t", "jörg", "review", None, None, None, None]
    text = GENESIS + "\n" + '[1,"t","jörg","review",null,null,null,null]'
    assert link_hash(GENESIS, entry, sort_keys=False, ensure_ascii=False) == sha256_text(text)
    assert sha256_text(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    # challenge log: no separator
    assert link_hash("ab", {"b": 1, "a": 2}, sep="") == sha256_text('ab{"a":2,"b":1}')
    # record store: prev inside the JSON list, key order as given, NaN as json writes it
    assert content_hash([1, "x", GENESIS], sort_keys=False) == sha256_text(f'[1,"x","{GENESIS}"]')
    assert canonical_json([float("nan")]) == "[NaN]"


def test_a_changed_or_moved_entry_breaks_the_links_after_it():
    bodies = [{"n": i, "text": f"entry {i}"} for i in range(4)]
    hashes, prev = [], GENESIS
    for b in bodies:
        prev = link_hash(prev, b)
        hashes.append(prev)
    changed = link_hash(hashes[0], {"n": 1, "text": "entry 1!"})
    assert changed != hashes[1] and link_hash(changed, bodies[2]) != hashes[2]
    assert link_hash(GENESIS, bodies[1]) != hashes[1]  # the same content at another place hashes differently
    assert link_hash(hashes[0], dict(reversed(list(bodies[1].items())))) == hashes[1]  # key order is not content


def test_the_helper_imports_nothing_of_the_project():
    src = open(hashchain.__file__, encoding="utf-8").read()
    assert "import vialinspect" not in src and "from vialinspect" not in src and "from ." not in src
