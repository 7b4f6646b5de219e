"""Users of the review app: salted scrypt password hashes, roles, disable (never delete).

Users live in ``STORE/review.sqlite`` or PostgreSQL's QA tables (see :mod:`vialinspect.inspection_station.qa.audit`);
every change is audited in the same transaction as the change itself. A user name is never reused: a disabled user
cannot be added again, so a name in the audit trail always means the same person (21 CFR 11.100(a), 11.300(a)).

Every user change writes the row's readable columns and a digest of the whole row (password hash included,
see :func:`audit.user_audit_value`), so that ``audit verify`` notices a password hash swapped in the file.

Password checks and lockout (21 CFR 11.300(d)). Logins and e-signatures (:func:`verify_password`: reviews,
model promotions) share one counter: ``LOCKOUT_FAILURES`` wrong passwords for a name within
``LOCKOUT_WINDOW``, counted from the name's last successful login or admin unlock, lock it for logins *and*
signatures. Callers audit every refusal (``login_failed``, ``signature_failed``) with the exception's text as
the reason, which is what the counter reads; refusals *because* the account is locked are audited but do not
count again. Decision on expiry: a lock ends by itself once fewer than ``LOCKOUT_FAILURES`` failures lie in
the last ``LOCKOUT_WINDOW`` (15 min). A lock that never expired would let anyone who can reach the login page
shut every reviewer out until an admin is found; the window keeps guessing to 5 tries per 15 minutes, and
:func:`unlock_user` (``vialinspect users unlock``, audited) ends a lock at once.

A failed attempt under a name that is not a user is recorded as ``unknown user (hmac-sha256 ...)``, never the
typed text: people type their password into the user name field, and the trail is shown to every reviewer.
The digest is keyed with a random per-database key (``meta``), so it cannot be checked against guesses
offline, yet the same wrong name always gives the same label (and the same lockout: unknown and known names
behave alike, which tells an attacker nothing about which names exist).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from vialinspect.errors import VialinspectError

from . import audit
from .audit import ReviewDB
from .dbconn import Connection, RowLike

ROLES: tuple[str, ...] = ("reviewer", "admin")
MIN_PASSWORD_LENGTH = 8
LOCKOUT_FAILURES = 5  # wrong passwords (logins and signatures) within LOCKOUT_WINDOW lock the account ...
LOCKOUT_WINDOW = timedelta(minutes=15)  # ... until the window has passed, or an admin unlocks it
WRONG_PASSWORD = "wrong user name or password"  # the refusal that counts toward the lockout (audited reason)
LOCKED = "account locked after repeated wrong passwords; try again later or ask an admin to unlock it"
_NAME_KEY = "unknown_user_key"  # meta key: the per-database key of unknown-user labels
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# scrypt: 16 MiB and ~50 ms per check: cheap for a login, expensive for guessing a stolen database.
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32


class UserError(VialinspectError):
    """A user cannot be added or changed as asked (bad name, weak password, unknown, already exists)."""


class AuthError(VialinspectError):
    """Credentials were refused (wrong password, unknown or disabled user, locked account)."""


@dataclass
class User:
    username: str
    full_name: str  # the printed name of a signature (21 CFR 11.50(a)(1))
    role: str
    created_at_utc: str
    created_by: str
    disabled_at_utc: str | None = None
    disabled_by: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at_utc is None


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex); a fresh random salt per user unless given."""
    salt = secrets.token_bytes(16) if salt is None else salt
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${dk.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, want = stored.split("$")
        if algo != "scrypt":
            return False
        dk = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                            dklen=len(want) // 2)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(dk.hex(), want)


# A real hash to check against when the user does not exist, so that an unknown name costs as much time as a
# known one and response times do not tell which user names exist.
_DUMMY_HASH = hash_password(secrets.token_hex(16))


def _user(row: RowLike) -> User:
    return User(username=row["username"], full_name=row["full_name"], role=row["role"],
                created_at_utc=row["created_at_utc"], created_by=row["created_by"],
                disabled_at_utc=row["disabled_at_utc"], disabled_by=row["disabled_by"])


def validate_password(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if password != password.strip():
        raise UserError("a password must not start or end with white space")


def add_user(db: ReviewDB, username: str, full_name: str, role: str, password: str, actor: str) -> User:
    """Create a user; ``actor`` is who did it (recorded in the audit trail)."""
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise UserError(f"invalid user name {username!r}: 1-64 of letters, digits, '.', '_', '@', '-', "
                        "starting with a letter or digit")
    full_name = (full_name or "").strip()
    if not full_name:
        raise UserError("a user needs a full name: it is printed with every signature")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    validate_password(password)
    pw_hash = hash_password(password)
    with db.transaction() as conn:
        old = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        if old is not None:
            state = "exists" if old["disabled_at_utc"] is None else "was disabled; user names are never reused"
            raise UserError(f"user {username!r} {state}")
        _, now = audit.utc_now()
        conn.execute("INSERT INTO users (username, full_name, role, password_hash, created_at_utc, created_by) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (username, full_name, role, pw_hash, now, actor))
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        audit.append(conn, actor, audit.USER_ADDED, new_value=audit.user_audit_value(row), at_utc=now)
    return User(username, full_name, role, now, actor)


def disable_user(db: ReviewDB, username: str, actor: str, reason: str | None = None) -> User:
    with db.transaction() as conn:
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise UserError(f"no user {username!r}")
        if row["disabled_at_utc"] is not None:
            raise UserError(f"user {username!r} is already disabled (since {row['disabled_at_utc']})")
        _, now = audit.utc_now()
        conn.execute("UPDATE users SET disabled_at_utc = ?, disabled_by = ? WHERE username = ?",
                     (now, actor, username))
        new = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        audit.append(conn, actor, audit.USER_DISABLED, old_value=audit.user_audit_value(row),
                     new_value=audit.user_audit_value(new), reason=reason, at_utc=now)
    return _user(new)


def unlock_user(db: ReviewDB, username: str, actor: str, reason: str) -> User:
    """End a lockout at once (audited as ``user_unlocked``, with the reason); the failures before it stop counting.

    Who may: ``actor`` is either an operating-system account (``os:NAME``, what the CLI passes: as for
    ``users add`` and ``users disable``, access to the store's files is the authority) or an active admin of
    the review app. The password is not reset: an unlock is for a user who knows it.
    """
    reason = (reason or "").strip()
    if not reason:
        raise UserError("an unlock needs a reason (recorded in the audit trail)")
    if not isinstance(actor, str) or not actor:
        raise UserError("an unlock needs an actor")
    if not actor.startswith("os:"):
        who = get_user(db, actor)
        if who is None or not who.active or who.role != "admin":
            raise UserError(f"{actor!r} may not unlock users: only an admin may")
    with db.transaction() as conn:
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise UserError(f"no user {username!r}")
        if row["disabled_at_utc"] is not None:
            raise UserError(f"user {username!r} is disabled (since {row['disabled_at_utc']}); unlocking does not "
                            "enable a user")
        fails = _failures(conn, username)
        if fails < LOCKOUT_FAILURES:
            raise UserError(f"user {username!r} is not locked ({fails} wrong password(s) in the last "
                            f"{LOCKOUT_WINDOW.total_seconds() / 60:g} min; {LOCKOUT_FAILURES} lock)")
        audit.append(conn, actor, audit.USER_UNLOCKED,
                     old_value={"username": username, "locked": True, "failures": fails},
                     new_value=audit.user_audit_value(row), reason=reason)
    return _user(row)


def list_users(db: ReviewDB, include_disabled: bool = True) -> list[User]:
    with db.connect() as conn:
        rows = conn.execute("SELECT * FROM users ORDER BY username").fetchall()
    return [u for u in map(_user, rows) if include_disabled or u.active]


def get_user(db: ReviewDB, username: str) -> User | None:
    with db.connect() as conn:
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    return None if row is None else _user(row)


def is_active(db: ReviewDB, username: str | None) -> bool:
    u = get_user(db, username) if username else None
    return u is not None and u.active


def verify_password(db: ReviewDB, username: str, password: str) -> User:
    """The user, if the password is theirs, they are active and not locked; raises ``AuthError`` otherwise.

    Used for logins and for every e-signature. Audits nothing itself: callers record what the check was for
    (``login_failed``, ``signature_failed``) under :func:`audit_name` with ``str(error)`` as the reason, and
    those records are what the lockout counts (module docstring).
    """
    if _locked(db, audit_name(db, username)):
        raise AuthError(LOCKED)
    with db.connect() as conn:
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    ok = check_password(password or "", row["password_hash"] if row is not None else _DUMMY_HASH)
    if row is None or not ok:
        raise AuthError(WRONG_PASSWORD)
    if row["disabled_at_utc"] is not None:
        raise AuthError(f"user {username!r} is disabled")
    return _user(row)


def _name_key(db: ReviewDB) -> bytes:
    with db.connect() as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_NAME_KEY,)).fetchone()
    if row is None:
        with db.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                         (_NAME_KEY, secrets.token_hex(32)))
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_NAME_KEY,)).fetchone()
    return str(row[0]).encode("utf-8")


def audit_name(db: ReviewDB, username: str | None) -> str:
    """The name under which a failed login or signature for ``username`` is audited (and locked out).

    A user's own name if the user exists (active or disabled); ``(empty)`` for nothing typed; otherwise
    ``unknown user (hmac-sha256 <12 hex>)``, never the typed text, which may well be a password.
    """
    name = (username or "").strip()[:128] if isinstance(username, str) else ""
    if not name:
        return "(empty)"
    if get_user(db, name) is not None:
        return name
    digest = hmac.new(_name_key(db), name.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"unknown user (hmac-sha256 {digest[:12]})"


def _failures(conn: Connection, name: str) -> int:
    """Wrong passwords (logins and signatures) audited under ``name`` within the window, since its last
    successful login or admin unlock."""
    since = (datetime.now(tz=UTC) - LOCKOUT_WINDOW).isoformat(timespec="milliseconds")
    last_ok = conn.execute('SELECT MAX(seq) FROM audit WHERE "user" = ? AND action = ?',
                           (name, audit.LOGIN)).fetchone()[0] or 0
    # An unlock names the user in its value (its ``user`` is the admin). Only the window's entries matter, so
    # walk back from the newest entry until the window ends: an earlier unlock resets nothing that counts.
    for seq, action, at_utc, value in conn.execute("SELECT seq, action, at_utc, new_value FROM audit WHERE seq > ? "
                                                   "ORDER BY seq DESC", (last_ok,)):
        if str(at_utc) < since:
            break
        if action != audit.USER_UNLOCKED:
            continue
        try:
            unlocked = json.loads(value).get("username") == name
        except (ValueError, TypeError, AttributeError):
            continue
        if unlocked:
            last_ok = seq
            break
    return conn.execute('SELECT COUNT(*) FROM audit WHERE "user" = ? AND action IN (?, ?) AND reason = ? AND seq > ? '
                        "AND at_utc >= ?", (name, audit.LOGIN_FAILED, audit.SIGNATURE_FAILED, WRONG_PASSWORD,
                                            last_ok, since)).fetchone()[0]


def _locked(db: ReviewDB, name: str) -> bool:
    with db.connect() as conn:
        return _failures(conn, name) >= LOCKOUT_FAILURES


def is_locked(db: ReviewDB, username: str) -> bool:
    """Whether logins and signatures under ``username`` are refused for repeated wrong passwords."""
    return _locked(db, audit_name(db, username))


def login(db: ReviewDB, username: str, password: str) -> User:
    """Check a login and audit it (``login`` or ``login_failed`` with the reason); raises ``AuthError``."""
    name = (username or "").strip()[:128] if isinstance(username, str) else ""
    try:
        user = verify_password(db, name, password)
    except AuthError as e:
        audit.record(db, audit_name(db, name), audit.LOGIN_FAILED, reason=str(e))
        raise
    audit.record(db, user.username, audit.LOGIN)
    return user


def logout(db: ReviewDB, username: str, reason: str | None = None) -> None:
    audit.record(db, username, audit.LOGOUT, reason=reason)
