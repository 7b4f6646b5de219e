"""Signed model changes: promoting a gated candidate to a recipe's line, and rolling back.

The signer is one of the review app's users, checked by password for this one signature (21 CFR 11.200:
each signing is a fresh check). Only an ``admin`` may change the model that decides product. Every attempt
lands in the record store's audit trail: a refused password as ``signature_failed``, a change as
``model_promoted`` or ``model_rolled_back`` whose entry number is stored with the registry's own event, so
either record leads to the other.

A registry's changes are all signed in one user database: the first signed change records that database's
identity (a random id kept in its ``meta`` table) with the signature, and a change signed in any other database
(another ``--store`` with a self-made admin) is refused here and reported by ``registry verify``. The id is a
tamper-evidence measure against mistakes and casual misuse, not a secret: someone who can edit both databases
can copy it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vialinspect.errors import VialinspectError
from vialinspect.export.registry import Event, Registry, RegistryError, Signature

from . import audit, users
from .audit import ReviewDB, open_review_db

PROMOTE_MEANING = "Approval: model version released for production inspection"
ROLLBACK_MEANING = "Approval: production inspection returned to an earlier model version"


class PromotionError(VialinspectError):
    """Refused: wrong signature, not an admin, or the registry's rules say no."""


@dataclass(frozen=True)
class ModelChange:
    event: Event
    audit_seq: int


def _signer(db: ReviewDB, user: str, password: str, what: str, version: str | None) -> users.User:
    try:
        signer = users.verify_password(db, user, password)
    except users.AuthError as e:
        audit.record(db, users.audit_name(db, user), audit.SIGNATURE_FAILED,
                     new_value={"change": what, "version": version}, reason=str(e))
        raise PromotionError(f"signature refused: {e}") from None
    if signer.role != "admin":
        audit.record(db, signer.username, audit.SIGNATURE_FAILED, new_value={"change": what, "version": version},
                     reason="only an admin may change the production model")
        raise PromotionError(f"{signer.username} is a {signer.role}; only an admin may sign a model change")
    return signer


def review_db_id(db: ReviewDB) -> str:
    """This user database's identity, made once (random) and kept in its ``meta`` table."""
    with db.transaction() as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
        if row is not None:
            return str(row[0])
        value = uuid.uuid4().hex
        conn.execute("INSERT INTO meta (key, value) VALUES ('db_id', ?)", (value,))
        return value


def _signed_change(db_spec: str | Path, registry: Registry, action: str, recipe: str, current: str | None,
                   target: str, meaning: str, user: str, password: str, reason: str,
                   apply: Callable[[Signature], Event]) -> ModelChange:
    """Verify the signer, write the audit entry, then make the registry change that names it. ``db_spec``: the
    QA database, a store directory or a postgresql:// URL (:func:`audit.open_review_db`)."""
    db = open_review_db(db_spec, create=False)
    db_id, bound = review_db_id(db), registry.review_db()
    if bound is not None and db_id != bound:
        raise PromotionError(f"{registry.root}'s model changes are signed in user database {bound}; {db.where} "
                             f"holds another one ({db_id}): sign with the production store's users")
    signer = _signer(db, user, password, action, target)
    what = audit.MODEL_PROMOTED if action == "promote" else audit.MODEL_ROLLED_BACK
    seq = audit.record(db, signer.username, what, old_value={"recipe": recipe, "version": current},
                       new_value={"recipe": recipe, "version": target, "registry": str(registry.root.resolve()),
                                  "meaning": meaning, "printed_name": signer.full_name},
                       reason=reason.strip())
    try:
        ev = apply(Signature(signer.username, signer.full_name, meaning, audit.utc_now()[1], seq, db_id,
                             audit.entry_hash_of(db, seq)))
    except RegistryError as e:  # changed under our feet (another change in between): say so in the trail
        audit.record(db, signer.username, what, new_value={"recipe": recipe, "version": target, "completed": False},
                     reason=f"not completed: {e}")
        raise PromotionError(str(e)) from None
    return ModelChange(ev, seq)


def promote(db_spec: str | Path, registry: Registry, version: str, recipe: str, user: str, password: str,
            reason: str) -> ModelChange:
    if not (reason or "").strip():
        raise PromotionError("a promotion needs a reason")
    try:
        current = registry.check_promote(version, recipe)  # refuse before anyone signs for nothing
    except RegistryError as e:
        raise PromotionError(str(e)) from None
    return _signed_change(db_spec, registry, "promote", recipe, current, version, PROMOTE_MEANING, user, password,
                          reason, lambda sig: registry.promote(version, recipe, sig, reason))


def rollback(db_spec: str | Path, registry: Registry, recipe: str, user: str, password: str,
             reason: str) -> ModelChange:
    if not (reason or "").strip():
        raise PromotionError("a rollback needs a reason")
    try:
        current = registry.current(recipe)
        target = registry.rollback_target(recipe)
    except RegistryError as e:
        raise PromotionError(str(e)) from None
    return _signed_change(db_spec, registry, "rollback", recipe, current, target, ROLLBACK_MEANING, user, password,
                          reason, lambda sig: registry.rollback(recipe, sig, reason))
