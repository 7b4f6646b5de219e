"""A throwaway PostgreSQL server for the tests that need one.

``initdb`` into a temporary folder with the server binaries (``/usr/local/bin``, else ``/usr/lib/postgresql/*/bin``;
when neither has them, Debian's ``postgresql`` package is installed through apt, as tests/browser.py installs
Chromium, and the tests skip with the reason if that fails), trust authentication, listening only on a unix socket
in that folder (no TCP port to clash with), stopped and removed at the end of the session. As root, the server
runs as the ``postgres`` (else ``nobody``) account, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.apt import apt_install

BIN_NAMES = ("initdb", "pg_ctl", "postgres")


def _bin_dir() -> Path | None:
    for d in ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if all(os.access(Path(d) / n, os.X_OK) for n in BIN_NAMES):
            return Path(d)
    return None


def server_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres; installed through apt when missing (skip if that fails)."""
    found = _bin_dir()
    if found:
        return found
    apt_install("postgresql", "--no-install-recommends")
    found = _bin_dir()
    if found is None:
        pytest.skip("apt-get installed postgresql, but its server binaries are not where they were looked for")
    return found


class PgServer:
    """One server in a temporary folder; ``url(db, **params)`` a postgresql:// URL to a database on it."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed (the postgres extra: pip install 'vialinspect[postgres]')")
        self.root = Path(tempfile.mkdtemp(prefix="vi-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            runuser = shutil.which("runuser")
            if user is None or runuser is None:
                pytest.skip("running as root without a postgres or nobody account (or runuser) to run the server")
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.run_as = [runuser, "-u", user, "--"]
        os.chmod(self.root, 0o755)
        self._names = itertools.count()
        self._cmd([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-sync", "--no-instructions"])
        self.start()

    def _cmd(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.run_as, *args], capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip()[-500:]}\n"
                               f"{self.log.read_text()[-1000:] if self.log.exists() else ''}")
        return r

    def tool(self, name: str) -> str:
        """A client program of the same PostgreSQL (pg_dump, pg_restore): beside pg_ctl, or where pg_ctl's link
        leads (/usr/local/bin may link only the server programs); skips where there is none."""
        for d in (self.bin, (self.bin / "pg_ctl").resolve().parent):
            if os.access(d / name, os.X_OK):
                return str(d / name)
        pytest.skip(f"no {name} beside the server binaries ({self.bin})")

    def running(self) -> bool:
        return self._cmd([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], check=False).returncode == 0

    def start(self) -> None:
        if self.running():
            return
        opts = (f"-k {self.root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=50")
        self._cmd([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "30",
                   "start"])

    def stop(self, mode: str = "fast") -> None:
        self._cmd([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"],
                  check=False)

    def url(self, db: str = "postgres", **params: str) -> str:
        q = "&".join(f"{k}={v}" for k, v in {"host": str(self.root), "user": "postgres", **params}.items())
        return f"postgresql:///{db}?{q}"

    def create_db(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def pg_server():
    server = PgServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_db(pg_server):
    """A fresh database on the session's server: its name."""
    return pg_server.create_db()
