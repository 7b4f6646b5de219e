"""A drift baseline from a station's own records: the units of a qualification run (PQ) on the line.

The baseline must describe production as the qualified system saw it: the same model, the same recipe, the
line's own mix of good and defective units. A Knapp challenge set (`vialinspect qualify`) is the wrong source:
it is 40% defective by design, where a line rejects a few percent. So the baseline is read from the record
store of a run the plant accepts as its reference, through the same decisions the monitor will be fed.
"""

from __future__ import annotations

from pathlib import Path

from vialinspect.errors import VialinspectError
from vialinspect.vision.drift import DriftBaseline, baseline_from
from vialinspect.vision.scores import CLASSES

from .store import RecordStore, StoreError


class BaselineSourceError(VialinspectError, ValueError):
    """The record store cannot give a baseline (none, too few units, several models): one line."""


def baseline_from_store(store_dir: str | Path, last: int | None = None, model_version: str | None = None,
                        since: str | None = None, until: str | None = None) -> DriftBaseline:
    """The baseline of the units a store recorded (optionally only the ``last`` N, or those decided between
    ``since`` and ``until``, ISO times) for one model version: the one named, or the only one recorded. Units
    the station did not inspect (``not_inspected:*``) are left out, as the monitor leaves them out."""
    try:
        store = RecordStore(store_dir, readonly=True)
    except StoreError as e:  # already names the store
        raise BaselineSourceError(str(e)) from None
    with store:
        rows = list(store.iter_decisions(since=since, until=until))
    # A unit turned away unjudged may carry no model version: only decided units name the model.
    decided = [r for r in rows if not any(str(x).startswith("not_inspected:") for x in r["reasons"])]
    versions = sorted({str(r.get("model_version")) for r in decided})
    if model_version is None:
        if len(versions) > 1:
            raise BaselineSourceError(f"{store_dir}: units of {len(versions)} model versions are recorded "
                                      f"({', '.join(versions)}); name one with --model-version")
        model_version = versions[0] if versions else ""
    left_out = len(rows) - len(decided)
    decided = [r for r in decided if str(r.get("model_version")) == model_version]
    if last is not None:
        decided = decided[-last:]
    if not decided:
        raise BaselineSourceError(f"{store_dir}: no decided unit of model {model_version or '(none)'} recorded")
    scores = [{c: r["scores"].get(c) for c in CLASSES} for r in decided]
    rejected = [[c for c in r["reasons"] if c in CLASSES] for r in decided]
    first, end = decided[0]["decided_at_utc"], decided[-1]["decided_at_utc"]
    source = (f"record store {Path(store_dir).resolve()}: {len(decided)} decided units of model {model_version}, "
              f"{first} to {end} ({left_out} not inspected left out)")
    try:
        return baseline_from(scores, rejected, model_version, source=source)
    except ValueError as e:
        raise BaselineSourceError(f"{store_dir}: {e}") from None
