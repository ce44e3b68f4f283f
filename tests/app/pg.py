"""A real PostgreSQL server for the workbench tests: the one ``DEFECTLAB_TEST_PG_URL``
names (CI starts it), else a throw-away cluster started here from the Debian binaries."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

URL_ENV = "DEFECTLAB_TEST_PG_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Cluster:
    """A cluster in a temporary folder on loopback, trust authentication, stopped at the end."""

    def __init__(self) -> None:
        self.bin = _binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="defectlab-pg-"))
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root without runuser: cannot start PostgreSQL")
            shutil.chown(self.folder, "postgres")
            self.prefix = [runuser, "-u", "postgres", "--"]
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self.folder / "log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off",
            "start",
        )
        self.data = data
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, name: str, *args: str) -> None:
        done = subprocess.run(
            [*self.prefix, str(self.bin / name), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed: {(done.stderr or done.stdout).strip()[-400:]}")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def server_url() -> tuple[str | None, Cluster | None, str]:
    """(admin URL, cluster to stop or None, reason when there is no server)."""
    url = os.environ.get(URL_ENV)
    if url:
        return url, None, ""
    try:
        cluster = Cluster()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return None, None, f"no PostgreSQL server: {URL_ENV} is unset and {exc}"
    return cluster.url, cluster, ""


def fresh_database(admin_url: str) -> tuple[str, str]:
    """Create an empty database on the server; returns (its URL, its name)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"defectlab_test_{os.getpid()}_{time.monotonic_ns()}"
    parsed = make_url(admin_url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return parsed.set(database=name).render_as_string(hide_password=False), name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    dsn = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
