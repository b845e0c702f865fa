"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, the server on a unix
socket there (no TCP port to collide with), stopped by its pid at the end.

initdb refuses to run as root, so as root the binaries run as the `postgres` user.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): the ledger "
            "tests need it. Install it with `apt-get install postgresql` (or run "
            "./scripts/setup.sh --dev, which does).")
    return Path(found[-1]).parent


class PgCluster:
    def __init__(self, *, fsync: bool = False) -> None:
        self._fsync = fsync  # off for tests: speed; on to measure what production pays
        self._bin = bin_dir()
        self._as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="spillover-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        return [*prefix, *args]

    @property
    def user(self) -> str:
        return "postgres" if self._as_root else os.environ.get("USER", "postgres")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}"

    def start(self) -> None:
        subprocess.run(
            self._cmd(str(self._bin / "initdb"), "-D", str(self.data), "-U", self.user,
                      "--auth=trust", "--no-sync", "-E", "UTF8"),
            check=True, capture_output=True, timeout=120)
        self.resume()

    def pause(self) -> None:
        """Stop the server (fast shutdown: clients are cut off) and keep its data."""
        self._shutdown()

    def resume(self) -> None:
        """Start the server on the cluster's data (after start()'s initdb, or a pause)."""
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 - the server's lifetime
        self._proc = subprocess.Popen(
            self._cmd(str(self._bin / "postgres"), "-D", str(self.data),
                      "-k", str(self.socket_dir), "-c", "listen_addresses=",
                      "-c", f"fsync={'on' if self._fsync else 'off'}", "-c", "max_connections=200"),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    text = (self.dir / "postgres.log").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start:\n{text}") from None
                time.sleep(0.1)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.url(name)

    def stop(self) -> None:
        self._shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():
                # runuser may sit between us and the server: signal the postmaster itself.
                postmaster = int(pid_file.read_text().split("\n", 1)[0])
                os.kill(postmaster, signal.SIGINT)  # fast shutdown
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT_S)
