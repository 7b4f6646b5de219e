"""The model registry: a directory of verified model packages, their model cards, a ``current`` pointer per
recipe, and the full history of what happened to each version.

Layout::

    REGISTRY/registry.json            format marker
    REGISTRY/packages/<version>/      the model package, byte for byte (verified on every load)
    REGISTRY/cards/<version>.json     model card, written once: parent version, training data hashes,
                                      qualification data hash, who registered it and why
    REGISTRY/reports/<version>/...    evaluation and gate reports (written by retraining)
    REGISTRY/current/<recipe>.json    the version the line runs for this recipe (atomic replace)
    REGISTRY/history.jsonl            append-only, hash-chained events: register, gate, promote, rollback

Status is derived from the history, never stored twice: ``registered`` → ``candidate`` (passed the gate)
or ``rejected`` (failed it) → ``current`` for a recipe once promoted.

The registry does not check passwords: promotion and rollback take a ``Signature`` made by the caller after
it verified the signer (``vialinspect.inspection_station.qa.promotion`` does this with the review app's users and audit
trail), and record it with the event.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vialinspect.errors import VialinspectError

from .hashchain import GENESIS, link_hash
from .package import ModelPackage, PackageError, load_package

REGISTRY_FORMAT = "vialinspect-model-registry"
REGISTRY_VERSION = 1
_RECIPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REGISTER, GATE, PROMOTE, ROLLBACK = "register", "gate", "promote", "rollback"


class RegistryError(VialinspectError):
    """A registry that is missing or damaged, or an action the registry's rules do not allow."""


@dataclass(frozen=True)
class Signature:
    """A verified electronic signature for a registry change (who, printed name, when, what it means)."""

    user: str
    printed_name: str
    meaning: str
    signed_at_utc: str
    audit_seq: int | None = None  # the entry in the review database's audit trail that holds it
    # The identity of the user database the signer was checked in. A registry's changes are all signed in one
    # (the first signed change binds it), so a self-made database with a self-made admin cannot sign.
    review_db: str | None = None
    # The audit trail's chain hash at that entry: the trail's head, anchored in the (signed) registry history, so
    # the trail cannot be rewritten up to that point without the two disagreeing.
    audit_hash: str | None = None


@dataclass(frozen=True)
class Event:
    seq: int
    at_utc: str
    action: str
    version: str
    recipe: str | None
    actor: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] | None = None
    prev_hash: str = GENESIS
    hash: str = ""
    sig: dict[str, Any] | None = None  # Ed25519 signature over ``hash`` (export.signing), when the writer had a key


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _event_hash(prev: str, body: dict[str, Any]) -> str:
    return link_hash(prev, body)  # prev, a newline, the event's fields as JSON with sorted keys


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chain_problems(events: list[Event]) -> list[str]:
    """Breaks in the history's sequence numbers and hash chain."""
    problems: list[str] = []
    prev = GENESIS
    for i, e in enumerate(events, 1):
        body = {k: v for k, v in asdict(e).items() if k not in ("hash", "prev_hash", "sig")}
        if e.seq != i:
            problems.append(f"event {i}: sequence number {e.seq} (events missing or reordered)")
        if e.prev_hash != prev or e.hash != _event_hash(prev, body):
            problems.append(f"event {e.seq}: hash chain broken (edited or removed history)")
        prev = e.hash
    return problems


def _signing_problems(events: list[Event]) -> list[str]:
    """Signed changes that were not signed in the registry's one user database, or that reuse another change's
    audit entry (a hand-appended event copying a real one)."""
    problems: list[str] = []
    bound: str | None = None
    seen: dict[tuple[str | None, int], int] = {}
    for e in events:
        if e.action not in (PROMOTE, ROLLBACK) or not e.signature:
            continue
        db = e.signature.get("review_db")
        if bound is None and db:
            bound = db
        elif bound is not None and db != bound:
            problems.append(f"event {e.seq}: signed in user database {db!r}, but this registry's changes are signed "
                            f"in {bound!r}")
        seq = e.signature.get("audit_seq")
        if seq is not None:
            if (db, seq) in seen:
                problems.append(f"event {e.seq}: reuses audit entry {seq} of event {seen[(db, seq)]} (a copied "
                                "signature)")
            seen[(db, seq)] = e.seq
    return problems


def check_onnx_graph(path: Path) -> None:
    """Raise ``RegistryError`` unless ``path`` loads with ``onnx.load`` and passes ``onnx.checker.check_model``.

    onnx is imported here, not at module level: the station verifies packages without it."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf, checker and OS errors alike: all refuse
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise RegistryError(f"{path}: not a valid ONNX model ({type(e).__name__}: {detail}); refusing to register "
                            "it") from None


def check_recipe_name(recipe: str) -> str:
    if not isinstance(recipe, str) or not _RECIPE.match(recipe):
        raise RegistryError(f"recipe name {recipe!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return recipe


class Registry:
    """A registry directory. ``signing_key`` (``export.signing.SigningKey``) signs every event this object
    appends and every package it adds; ``trusted_keys`` (key id -> public key) make ``verify`` and ``approved``
    demand a trusted signature on the events and packages they rely on."""

    def __init__(self, root: str | Path, create: bool = False, *, signing_key: Any = None,
                 trusted_keys: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.signing_key = signing_key
        self.trusted_keys = trusted_keys or {}
        marker = self.root / "registry.json"
        if not marker.is_file():
            if not create:
                raise RegistryError(f"{self.root}: not a model registry (no registry.json); "
                                    "create one with `vialinspect registry add --registry DIR PACKAGE`")
            if self.root.exists() and any(self.root.iterdir()):
                raise RegistryError(f"{self.root} exists, is not empty and is not a registry")
            for sub in ("packages", "cards", "reports", "current"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            _write_atomic(marker, json.dumps({"format": REGISTRY_FORMAT, "format_version": REGISTRY_VERSION,
                                              "created_utc": _now()}, indent=2) + "\n")
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"{marker}: unreadable ({e})") from None
        if meta.get("format") != REGISTRY_FORMAT:
            raise RegistryError(f"{self.root}: not a vialinspect model registry")
        if meta.get("format_version") != REGISTRY_VERSION:
            raise RegistryError(f"{self.root}: registry format version {meta.get('format_version')} not supported")

    # ---------------------------------------------------------------- locking and history

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def history(self, recipe: str | None = None, version: str | None = None) -> list[Event]:
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(Event(**json.loads(line)))
            except (ValueError, TypeError) as e:
                raise RegistryError(f"{path}: line {n} is damaged ({e}); run `vialinspect registry verify`") from None
        return [e for e in out if (recipe is None or e.recipe == recipe) and (version is None or e.version == version)]

    def verify(self) -> list[str]:
        """Problems with the history chain and the packages; empty when all is intact."""
        try:
            events = self.history()
        except RegistryError as e:
            return [str(e)]
        problems = _chain_problems(events) + _signing_problems(events)
        if self.trusted_keys:
            for e in events:
                try:
                    self._check_event_signature(e)
                except RegistryError as err:
                    problems.append(str(err))
        for v in self.versions():
            try:
                self.package(v)
                if self.trusted_keys:
                    self._check_package_signature(v)
            except RegistryError as err:
                problems.append(str(err))
        for p in sorted((self.root / "current").glob("*.json")):
            try:
                self.approved(p.stem)  # the very check a station makes before it runs the recipe's model
            except RegistryError as err:
                if str(err) not in problems:
                    problems.append(str(err))
        return problems

    def approved(self, recipe: str) -> ModelPackage:
        """The recipe's current model, verified, if the registry's own record approves it for the line.

        The station runs only this (at start and when a promotion arrives). Approved means all of: the pointer
        names one of the registry's own packages (not a path), the package verifies, the history chain is
        intact, the history's last change for the recipe is a signed promotion or rollback of that very version,
        and a promotion that replaced a model follows a passed gate of this version against the model it
        replaced (a rollback returns to a version that was promoted for the recipe before). Anything else
        raises ``RegistryError`` saying which rule failed: a hand-edited pointer or history is never run.
        """
        check_recipe_name(recipe)
        pointer = self.root / "current" / f"{recipe}.json"
        try:
            version = json.loads(pointer.read_text()).get("version")
        except FileNotFoundError:
            raise RegistryError(f"the registry {self.root} has no current model for recipe {recipe!r}; promote "
                                "one first (`vialinspect registry promote`)") from None
        except (OSError, ValueError, AttributeError):
            raise RegistryError(f"{pointer}: damaged current pointer") from None
        if not isinstance(version, str) or version not in self.versions():
            raise RegistryError(f"{pointer} names {version!r}, which is not a package of this registry")
        events = self.history()
        broken = _chain_problems(events)
        if broken:
            raise RegistryError(f"{self.root}: history is not intact ({broken[0]}); run `vialinspect registry "
                                "verify`")
        changes = [e for e in events if e.recipe == recipe and e.action in (PROMOTE, ROLLBACK)]
        if not changes or changes[-1].version != version:
            raise RegistryError(f"{pointer} names {version}, but the history's last change for {recipe} does not")
        last = changes[-1]
        if not last.signature or not last.signature.get("user") or last.signature.get("user") != last.actor:
            raise RegistryError(f"the {last.action} of {version} for {recipe} (event {last.seq}) is not signed")
        signing = _signing_problems(events)
        if signing:
            raise RegistryError(signing[0])
        if self.trusted_keys:
            relied_on = [last] + [e for e in events if e.seq < last.seq and e.action == GATE and e.version == version]
            for e in relied_on[:2]:  # the change, and the gate a promotion rests on
                self._check_event_signature(e)
            self._check_package_signature(version)
        before = changes[-2].version if len(changes) > 1 else None
        if last.action == PROMOTE:
            if last.details.get("previous") != before:
                raise RegistryError(f"event {last.seq} says it replaced {last.details.get('previous')}, but the "
                                    f"history's model before it was {before}")
            if before is not None:
                gates = [e for e in events if e.seq < last.seq and e.action == GATE and e.version == version]
                if not gates or not gates[-1].details.get("passed") or gates[-1].details.get("champion") != before:
                    raise RegistryError(f"{version} was promoted for {recipe} (event {last.seq}) without a passed "
                                        f"gate against {before}")
        elif not any(e.action == PROMOTE and e.version == version for e in changes[:-1]):
            raise RegistryError(f"event {last.seq} rolls {recipe} back to {version}, which was never promoted for it")
        return self.package(version)

    def _check_event_signature(self, e: Event) -> None:
        from .signing import SigningError, verify

        try:
            verify(self.trusted_keys, e.sig, e.hash.encode(), f"registry event {e.seq} ({e.action} {e.version})")
        except SigningError as err:
            raise RegistryError(str(err)) from None

    def _check_package_signature(self, version: str) -> None:
        from .signing import SigningError, verify_package

        try:
            verify_package(self.package_dir(version), self.trusted_keys)
        except SigningError as err:
            raise RegistryError(f"registry package {version}: {err}") from None

    def review_db(self) -> str | None:
        """The user database this registry's changes are signed in (bound by the first signed change), or None."""
        return next((e.signature["review_db"] for e in self.history()
                     if e.signature and e.signature.get("review_db")), None)

    def _append(self, action: str, version: str, actor: str, reason: str, recipe: str | None = None,
                details: dict[str, Any] | None = None, signature: Signature | None = None) -> Event:
        events = self.history()
        prev = events[-1].hash if events else GENESIS
        body = {"seq": len(events) + 1, "at_utc": _now(), "action": action, "version": version, "recipe": recipe,
                "actor": actor, "reason": reason, "details": details or {},
                "signature": asdict(signature) if signature else None}
        ev = Event(**body, prev_hash=prev, hash=_event_hash(prev, body))
        if self.signing_key is not None:
            from .signing import sign

            ev = Event(**{**asdict(ev), "sig": sign(self.signing_key, ev.hash.encode())})
        with open(self.root / "history.jsonl", "a") as fh:
            fh.write(json.dumps(asdict(ev), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return ev

    # ---------------------------------------------------------------- packages and cards

    def versions(self) -> list[str]:
        d = self.root / "packages"
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []

    def package_dir(self, version: str) -> Path:
        return self.root / "packages" / version

    def package(self, version: str) -> ModelPackage:
        if version not in self.versions():
            raise RegistryError(f"version {version!r} is not in the registry {self.root}")
        try:
            return load_package(self.package_dir(version))
        except PackageError as e:
            raise RegistryError(f"registry package {version}: {e}") from None

    def resolve(self, prefix: str) -> str:
        """A version id from a unique prefix (at least 6 characters)."""
        hits = [v for v in self.versions() if v.startswith(prefix)] if len(prefix) >= 6 else []
        if prefix in self.versions():
            return prefix
        if len(hits) != 1:
            raise RegistryError(f"no single version matches {prefix!r} (give at least 6 characters of a version id; "
                                f"see `vialinspect registry list`)")
        return hits[0]

    def add(self, package_dir: str | Path, actor: str, reason: str, card: dict[str, Any] | None = None) -> str:
        """Copy a verified package into the registry with its model card; returns its version id.

        Beyond what every load verifies (checksums, version id, metadata, thresholds), the graph itself must
        pass onnx's loader and checker: a package is checked once in full before the line can ever run it."""
        try:
            pkg = load_package(package_dir)
        except PackageError as e:
            raise RegistryError(str(e)) from None
        v = pkg.version_id
        with self._locked():
            if v in self.versions():
                raise RegistryError(f"version {v} is already in the registry")
            dest = self.package_dir(v)
            tmp = Path(tempfile.mkdtemp(prefix=f".{v}.", dir=dest.parent))
            try:
                for f in pkg.path.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
                try:  # the copy is what will run: verify it, not the source
                    copied = load_package(tmp)
                except PackageError as e:
                    raise RegistryError(f"the copy of {pkg.path} in the registry does not verify: {e}") from None
                if copied.version_id != v:
                    raise RegistryError(f"{pkg.path} changed while it was being added (version {v} became "
                                        f"{copied.version_id}); add it again")
                check_onnx_graph(copied.onnx_path)
                if self.signing_key is not None:
                    from .signing import sign_package

                    sign_package(tmp, self.signing_key)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            m = pkg.metadata
            full_card = {
                "version": v, "registered_utc": _now(), "registered_by": actor, "reason": reason,
                "parent_version": m.get("parent_version"),
                "training": {"data_hash": m.get("training", {}).get("data_hash"),
                             "n_train": m.get("training", {}).get("n_train"),
                             "git_commit": m.get("training", {}).get("git_commit")},
                "thresholds": m.get("thresholds"), "onnx_sha256": m.get("onnx_sha256"),
                **(card or {}),
            }
            _write_atomic(self.root / "cards" / f"{v}.json", json.dumps(full_card, indent=2, sort_keys=True) + "\n")
            self._append(REGISTER, v, actor, reason, details={"parent_version": full_card["parent_version"]})
        return v

    def card(self, version: str) -> dict[str, Any]:
        path = self.root / "cards" / f"{version}.json"
        if not path.is_file():
            raise RegistryError(f"version {version!r} has no model card in {self.root}")
        card = json.loads(path.read_text())
        events = self.history(version=version)
        gates = [e for e in events if e.action == GATE]
        card["gate"] = gates[-1].details if gates else None
        card["status"] = self.status(version, events)
        card["promotions"] = [{"action": e.action, "recipe": e.recipe, "at_utc": e.at_utc, "reason": e.reason,
                               "signed_by": (e.signature or {}).get("printed_name"), "user": e.actor}
                              for e in events if e.action in (PROMOTE, ROLLBACK)]
        card["current_for"] = [r for r, v in self.pointers().items() if v == version]
        return card

    def status(self, version: str, events: list[Event] | None = None) -> str:
        events = self.history(version=version) if events is None else events
        if any(v == version for v in self.pointers().values()):
            return "current"
        gates = [e for e in events if e.action == GATE]
        if any(e.action in (PROMOTE, ROLLBACK) for e in events):
            return "retired"
        if gates:
            return "candidate" if gates[-1].details.get("passed") else "rejected"
        return "registered"

    def record_gate(self, version: str, champion: str | None, passed: bool, summary: dict[str, Any],
                    actor: str) -> Event:
        self.package(version)
        with self._locked():
            return self._append(GATE, version, actor, "challenger against champion on the qualification set",
                                details={"passed": bool(passed), "champion": champion, **summary})

    def reports_dir(self, version: str) -> Path:
        return self.root / "reports" / version

    # ---------------------------------------------------------------- current pointers

    def pointers(self) -> dict[str, str]:
        d = self.root / "current"
        out = {}
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                out[p.stem] = json.loads(p.read_text())["version"]
            except (OSError, ValueError, KeyError):
                raise RegistryError(f"{p}: damaged current pointer") from None
        return out

    def current(self, recipe: str) -> str | None:
        return self.pointers().get(check_recipe_name(recipe))

    def pointer_stamp(self, recipe: str) -> tuple[str | None, int | None]:
        """(version, history seq) of the recipe's pointer: cheap enough for a station to poll."""
        p = self.root / "current" / f"{check_recipe_name(recipe)}.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, None
        return d.get("version"), d.get("seq")

    def _set_current(self, recipe: str, version: str, ev: Event) -> None:
        _write_atomic(self.root / "current" / f"{recipe}.json",
                      json.dumps({"version": version, "seq": ev.seq, "since_utc": ev.at_utc, "by": ev.actor,
                                  "reason": ev.reason}, indent=2) + "\n")

    def check_promote(self, version: str, recipe: str) -> str | None:
        """Raise ``RegistryError`` unless ``version`` may become current for ``recipe``; returns the current one.

        A replacement needs a passed gate against the very model it replaces; a recipe's first model needs none
        (it was qualified outside the registry, and the signature says so)."""
        check_recipe_name(recipe)
        self.package(version)
        cur = self.current(recipe)
        if cur == version:
            raise RegistryError(f"{version} is already current for {recipe}")
        if cur is not None:
            gates = [e for e in self.history(version=version) if e.action == GATE]
            if not gates:
                raise RegistryError(f"{version} has not been through the gate against the champion; "
                                    "only a candidate that passed it can replace a recipe's current model")
            if not gates[-1].details.get("passed"):
                raise RegistryError(f"{version} failed the gate (see its gate report); it cannot be promoted")
            if gates[-1].details.get("champion") != cur:
                raise RegistryError(f"{version} was gated against {gates[-1].details.get('champion')}, but the "
                                    f"current model for {recipe} is {cur}; retrain or re-gate against it")
        return cur

    def promote(self, version: str, recipe: str, signature: Signature, reason: str) -> Event:
        """Make ``version`` the recipe's current model (see ``check_promote`` for when that is allowed)."""
        if not reason.strip():
            raise RegistryError("a promotion needs a reason")
        with self._locked():
            cur = self.check_promote(version, recipe)
            ev = self._append(PROMOTE, version, signature.user, reason.strip(), recipe=recipe,
                              details={"previous": cur}, signature=signature)
            self._set_current(recipe, version, ev)
            return ev

    def rollback_target(self, recipe: str) -> str:
        """The model that was current before the present one (following earlier rollbacks too)."""
        cur = self.current(check_recipe_name(recipe))
        if cur is None:
            raise RegistryError(f"recipe {recipe} has no current model to roll back")
        ev = [e for e in self.history(recipe=recipe) if e.action in (PROMOTE, ROLLBACK)]
        if not ev:
            raise RegistryError(f"recipe {recipe}: no promotion history")
        prev = ev[-1].details.get("previous")
        if prev is None:
            raise RegistryError(f"{cur} is the first model of recipe {recipe}; there is nothing to roll back to")
        return prev

    def rollback(self, recipe: str, signature: Signature, reason: str) -> Event:
        if not reason.strip():
            raise RegistryError("a rollback needs a reason")
        with self._locked():
            cur = self.current(check_recipe_name(recipe))
            target = self.rollback_target(recipe)
            self.package(target)  # never point the line at a package that would not load
            # A rollback's own "previous" is the model that was current before the one rolled back, so that
            # repeated rollbacks walk back through the history instead of toggling between two versions.
            earlier = [e for e in self.history(recipe=recipe) if e.action in (PROMOTE, ROLLBACK)
                       and e.version == target]
            before_target = earlier[-1].details.get("previous") if earlier else None
            ev = self._append(ROLLBACK, target, signature.user, reason.strip(), recipe=recipe,
                              details={"previous": before_target, "rolled_back": cur}, signature=signature)
            self._set_current(recipe, target, ev)
            return ev


def open_registry(root: str | Path, create: bool = False) -> Registry:
    return Registry(root, create=create)
