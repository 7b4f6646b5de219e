"""Signed model changes: promoting a gated candidate to a recipe's line, and rolling back.

The signer is one of the review app's users, checked by password for this one signature (21 CFR 11.200:
each signing is a fresh check). Only an ``admin`` may change the model that decides product. Every attempt
lands in the record store's audit trail: a refused password as ``signature_failed``, a change as
``model_promoted`` or ``model_rolled_back`` whose entry number is stored with the registry's own event, so
either record leads to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.registry import Event, Registry, RegistryError, Signature

from . import audit, users
from .audit import ReviewDB

PROMOTE_MEANING = "Approval: model version released for production inspection"
ROLLBACK_MEANING = "Approval: production inspection returned to an earlier model version"


class PromotionError(Exception):
    """Refused: wrong signature, not an admin, or the registry's rules say no."""


@dataclass(frozen=True)
class ModelChange:
    event: Event
    audit_seq: int


def _signer(db: ReviewDB, user: str, password: str, what: str, version: str | None) -> users.User:
    try:
        signer = users.verify_password(db, user, password)
    except users.AuthError as e:
        audit.record(db, (user or "(empty)")[:128], audit.SIGNATURE_FAILED, new_value={"change": what,
                                                                                     "version": version},
                     reason=str(e))
        raise PromotionError(f"signature refused: {e}") from None
    if signer.role != "admin":
        audit.record(db, signer.username, audit.SIGNATURE_FAILED, new_value={"change": what, "version": version},
                     reason="only an admin may change the production model")
        raise PromotionError(f"{signer.username} is a {signer.role}; only an admin may sign a model change")
    return signer


def promote(store_dir: str | Path, registry: Registry, version: str, recipe: str, user: str, password: str,
            reason: str) -> ModelChange:
    if not (reason or "").strip():
        raise PromotionError("a promotion needs a reason")
    db = ReviewDB(store_dir, create=False)
    try:
        current = registry.check_promote(version, recipe)  # refuse before anyone signs for nothing
    except RegistryError as e:
        raise PromotionError(str(e)) from None
    signer = _signer(db, user, password, "promote", version)
    seq = audit.record(db, signer.username, audit.MODEL_PROMOTED, old_value={"recipe": recipe, "version": current},
                       new_value={"recipe": recipe, "version": version, "registry": str(registry.root.resolve()),
                                  "meaning": PROMOTE_MEANING, "printed_name": signer.full_name},
                       reason=reason.strip())
    sig = Signature(signer.username, signer.full_name, PROMOTE_MEANING, audit.utc_now()[1], seq)
    try:
        ev = registry.promote(version, recipe, sig, reason)
    except RegistryError as e:  # changed under our feet (another promotion in between): say so in the trail
        audit.record(db, signer.username, audit.MODEL_PROMOTED, new_value={"recipe": recipe, "version": version,
                                                                           "completed": False},
                     reason=f"not completed: {e}")
        raise PromotionError(str(e)) from None
    return ModelChange(ev, seq)


def rollback(store_dir: str | Path, registry: Registry, recipe: str, user: str, password: str,
             reason: str) -> ModelChange:
    if not (reason or "").strip():
        raise PromotionError("a rollback needs a reason")
    db = ReviewDB(store_dir, create=False)
    try:
        current = registry.current(recipe)
        target = registry.rollback_target(recipe)
    except RegistryError as e:
        raise PromotionError(str(e)) from None
    signer = _signer(db, user, password, "rollback", target)
    seq = audit.record(db, signer.username, audit.MODEL_ROLLED_BACK, old_value={"recipe": recipe, "version": current},
                       new_value={"recipe": recipe, "version": target, "registry": str(registry.root.resolve()),
                                  "meaning": ROLLBACK_MEANING, "printed_name": signer.full_name},
                       reason=reason.strip())
    sig = Signature(signer.username, signer.full_name, ROLLBACK_MEANING, audit.utc_now()[1], seq)
    try:
        ev = registry.rollback(recipe, sig, reason)
    except RegistryError as e:
        audit.record(db, signer.username, audit.MODEL_ROLLED_BACK, new_value={"recipe": recipe, "version": target,
                                                                               "completed": False},
                     reason=f"not completed: {e}")
        raise PromotionError(str(e)) from None
    return ModelChange(ev, seq)
