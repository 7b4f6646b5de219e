"""Users of the review app: salted scrypt password hashes, roles, disable (never delete).

Users live in ``STORE/review.sqlite`` (see :mod:`vialinspect.inspection_station.audit`); every change is audited in the
same transaction as the change itself. A user name is never reused: a disabled user cannot be added again,
so a name in the audit trail always means the same person (21 CFR 11.100(a), 11.300(a)).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import audit
from .audit import ReviewDB

ROLES: tuple[str, ...] = ("reviewer", "admin")
MIN_PASSWORD_LENGTH = 8
LOCKOUT_FAILURES = 5  # failed logins within LOCKOUT_WINDOW (since the last success) lock the account ...
LOCKOUT_WINDOW = timedelta(minutes=15)  # ... until the window has passed
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# scrypt: 16 MiB and ~50 ms per check: cheap for a login, expensive for guessing a stolen database.
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32


class UserError(Exception):
    """A user cannot be added or changed as asked (bad name, weak password, unknown, already exists)."""


class AuthError(Exception):
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


def _user(row: sqlite3.Row) -> User:
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
        audit.append(conn, actor, audit.USER_ADDED,
                     new_value={"username": username, "full_name": full_name, "role": role}, at_utc=now)
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
        audit.append(conn, actor, audit.USER_DISABLED, old_value={"username": username, "active": True},
                     new_value={"username": username, "active": False}, reason=reason, at_utc=now)
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
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
    """The user, if the password is theirs and they are active; raises ``AuthError`` otherwise.

    Audits nothing: callers record what the check was for (a login, a signature).
    """
    with db.connect() as conn:
        row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    ok = check_password(password or "", row["password_hash"] if row is not None else _DUMMY_HASH)
    if row is None or not ok:
        raise AuthError("wrong user name or password")
    if row["disabled_at_utc"] is not None:
        raise AuthError(f"user {username!r} is disabled")
    return _user(row)


def _locked(db: ReviewDB, username: str) -> bool:
    since = (datetime.now(tz=UTC) - LOCKOUT_WINDOW).isoformat(timespec="milliseconds")
    with db.connect() as conn:
        last_ok = conn.execute("SELECT MAX(seq) FROM audit WHERE user = ? AND action = ?",
                               (username, audit.LOGIN)).fetchone()[0] or 0
        fails = conn.execute("SELECT COUNT(*) FROM audit WHERE user = ? AND action = ? AND seq > ? AND at_utc >= ?",
                             (username, audit.LOGIN_FAILED, last_ok, since)).fetchone()[0]
    return fails >= LOCKOUT_FAILURES


def login(db: ReviewDB, username: str, password: str) -> User:
    """Check a login and audit it (``login`` or ``login_failed`` with the reason); raises ``AuthError``."""
    name = (username or "").strip()[:128] or "(empty)"
    if _locked(db, name):
        audit.record(db, name, audit.LOGIN_FAILED, reason="account locked after repeated failed logins")
        raise AuthError("account locked after repeated failed logins; try again later")
    try:
        user = verify_password(db, name, password)
    except AuthError as e:
        audit.record(db, name, audit.LOGIN_FAILED, reason=str(e))
        raise
    audit.record(db, user.username, audit.LOGIN)
    return user


def logout(db: ReviewDB, username: str, reason: str | None = None) -> None:
    audit.record(db, username, audit.LOGOUT, reason=reason)
