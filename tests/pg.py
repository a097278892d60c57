"""Test helpers for the real PostgreSQL server: a fresh database per test run, a fresh schema
per test, and a TCP proxy on loopback whose connections a test can cut.

The server is ``COWORKER_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``),
a role that may create databases and roles. When it cannot be reached the tests that need it
skip with the reason, except under CI (``CI`` set), where they fail: a CI run that silently
skipped the shared-store tests would prove nothing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

__all__ = [
    "PGServer",
    "PrivateCluster",
    "TcpProxy",
    "import_psycopg",
    "private_cluster",
    "proxy_to",
    "require_server",
    "server_url",
    "with_database",
    "with_hostport",
    "with_user",
]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    """The admin URL of the test server."""
    return os.environ.get("COWORKER_TEST_PG") or DEFAULT_URL


def import_psycopg() -> Any:
    """Return the psycopg module, or skip (fail under CI) when the postgres extra is missing."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - the postgres extra is missing
        _unavailable(f"psycopg is not installed ({exc}); pip install 'coworker-otel[postgres]'")
    return psycopg


def require_server() -> str:
    """Return the admin URL, or skip (fail under CI) when the server is unreachable."""
    url = server_url()
    psycopg = import_psycopg()
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        _unavailable(f"PostgreSQL at {url} is unreachable: {str(exc).strip()}")
    return url


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def with_database(url: str, dbname: str, **params: str) -> str:
    """``url`` pointing at database ``dbname`` with extra query parameters."""
    parts = urlsplit(url)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, query, ""))


def with_user(url: str, user: str) -> str:
    """``url`` logging in as ``user`` (trust auth on the test server)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, ""))


def with_hostport(url: str, host: str, port: int) -> str:
    """``url`` connecting to ``host:port`` (e.g. a :class:`TcpProxy`)."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{user}{host}:{port}", parts.path, parts.query, ""))


class PGServer:
    """A fresh database on the test server for one test run; dropped by :meth:`close`."""

    def __init__(self, admin_url: str) -> None:
        import psycopg

        self.admin_url = admin_url
        self.dbname = f"coworker_test_{os.getpid()}_{secrets.token_hex(4)}"
        self.roles: list[str] = []
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        self.url = with_database(admin_url, self.dbname)

    def schema_url(self, schema: str | None = None, **params: str) -> str:
        """A store URL in a new (not yet existing) schema of the test database."""
        schema = schema or "t_" + secrets.token_hex(6)
        return with_database(self.admin_url, self.dbname, schema=schema, **params)

    def execute(self, statement: str, *, user: str | None = None) -> None:
        """Run one statement in the test database (autocommit)."""
        import psycopg

        url = self.url if user is None else with_user(self.url, user)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement.encode())

    def create_role(self, prefix: str, *, login: bool = True) -> str:
        """Create a role that :meth:`close` drops again; returns its name."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.execute(f'CREATE ROLE "{name}" {"LOGIN" if login else "NOLOGIN"}')
        self.roles.append(name)
        return name

    def close(self) -> None:
        """Drop the database and the roles made for it."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            for role in self.roles:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


class TcpProxy:
    """A loopback TCP proxy to the server whose connections a test can cut and restore.

    :meth:`cut` closes every proxied connection and refuses new ones (accepted, then closed at
    once) until :meth:`restore`: to the client it looks like the server went away.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._down = threading.Event()
        self._blackhole = threading.Event()
        self.accepted = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Close all connections and refuse new ones."""
        self._down.set()
        self.cuts += 1
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:  # all shut down first: see _pump
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def restore(self) -> None:
        """Accept connections again (and forward them)."""
        self._blackhole.clear()
        self._down.clear()

    def blackhole(self) -> None:
        """Freeze: bytes on open connections are no longer forwarded, and new connections are
        accepted but never answered, like a server behind a dropped route or a hung host."""
        self._blackhole.set()

    def close(self) -> None:
        """Stop the proxy."""
        self._closed.set()
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._down.is_set():
                client.close()
                continue
            if self._blackhole.is_set():
                with self._lock:
                    self._sockets.add(client)  # held open, never read: cut() closes it
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self._blackhole.is_set() and not self._down.is_set():
                    # Swallow the bytes: the other side sees silence, not a reset.
                    self._down.wait(0.05)
                    data = b""
                if data:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown() before close(): closing a socket that the other pump thread is
            # blocked in recv() on would leave it open (no FIN) and the client hanging.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()


@contextlib.contextmanager
def proxy_to(url: str) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` to the server of ``url``."""
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        yield proxy
    finally:
        proxy.close()


def _pg_bindir() -> Path | None:
    given = os.environ.get("COWORKER_PG_BIN")
    candidates = [given] if given else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateCluster:
    """A PostgreSQL cluster of a test's own (``initdb`` + ``pg_ctl``) on a free loopback port.

    Unlike the shared server, a test may crash it: :meth:`crash` is ``pg_ctl stop -m
    immediate`` (the postmaster kills every backend with SIGQUIT; WAL not yet written to the
    OS is lost, exactly as in a server crash), :meth:`start` recovers it. The binaries come
    from ``COWORKER_PG_BIN`` or ``/usr/lib/postgresql/*/bin``; when they are missing the test
    skips (fails under CI). ``initdb`` refuses to run as root: then the cluster runs as the
    ``postgres`` OS user, in a temporary directory it owns.

    Args:
        settings: extra ``postgresql.conf`` settings (``{"wal_writer_delay": "10s"}``).
    """

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            _unavailable("initdb and pg_ctl not found; set COWORKER_PG_BIN to their directory")
        assert bindir is not None
        self.bindir = bindir
        self._as: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="coworker-pg-"))
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.dir, ignore_errors=True)
                _unavailable("running as root without runuser: cannot start a private cluster")
            self._as = [str(runuser), "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "on",
            "max_connections": "50",
            "shared_buffers": "16MB",
            **(settings or {}),
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.crashes = 0
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start (or, after :meth:`crash`, recover) the server; returns once it accepts."""
        log = self.dir / "server.log"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(log))

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: no shutdown checkpoint, no WAL flush."""
        self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))
        self.crashes += 1

    def stop(self) -> None:
        """A clean (fast) shutdown."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_cluster(settings: Mapping[str, str] | None = None) -> Iterator[PrivateCluster]:
    """A :class:`PrivateCluster`, deleted afterwards."""
    import_psycopg()
    cluster = PrivateCluster(settings)
    try:
        yield cluster
    finally:
        cluster.close()
