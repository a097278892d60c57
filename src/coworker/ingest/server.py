"""Serving the ingest app: uvicorn with a read deadline and a connection cap, logging, the
``coworker audit serve`` entry point and :class:`IngestServer` for tests and embedding."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from starlette.applications import Starlette

from coworker.audit.store import AuditStore
from coworker.exceptions import ConfigError
from coworker.ingest.app import DEFAULT_RETRY_AFTER, TRACES_PATH, _Ingest, create_app
from coworker.ingest.decode import DEFAULT_MAX_BODY_BYTES
from coworker.ingest.tokens import IngestToken

_log = logging.getLogger("coworker.ingest")

DEFAULT_READ_TIMEOUT: Final = 30.0
"""Seconds a client has to send one whole request (headers and body) once it starts; then
the server closes the connection (slow clients cannot hold connections forever)."""
DEFAULT_MAX_CONNECTIONS: Final = 512
"""Open connections beyond this are answered 503 and closed at once."""


# -- serving -------------------------------------------------------------------------------------
def parse_listen(listen: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:4318`` for IPv6).

    Raises:
        ConfigError: not a host and a port.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen={listen!r} must be HOST:PORT, e.g. 127.0.0.1:4318")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--listen={listen!r}: {port!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--listen={listen!r}: port out of range")
    return host.strip("[]"), number


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_config(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and coworker: text lines or JSON lines."""
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format={log_format!r} must be 'text' or 'json'")
    text = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    formatter: dict[str, Any] = (
        {"()": f"{__name__}._JsonFormatter"}
        if log_format == "json"
        else {"format": text, "datefmt": "%Y-%m-%dT%H:%M:%S%z"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": ["default"], "level": lvl, "propagate": False},
            "coworker": {"handlers": ["default"], "level": lvl, "propagate": False},
        },
    }


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 25\r\n"
    b"retry-after: 1\r\nconnection: close\r\n\r\ntoo many open connections"
)


def _check_server_limits(read_timeout: float, max_connections: int) -> None:
    if not read_timeout > 0 or not math.isfinite(read_timeout):
        raise ConfigError(f"read_timeout={read_timeout!r} must be a positive number of seconds")
    if max_connections < 1:
        raise ConfigError(f"max_connections={max_connections!r} must be at least 1")


def _guarded_protocol(ingest: _Ingest, read_timeout: float, max_connections: int) -> type[Any]:
    """uvicorn's h11 protocol with a deadline for reading each request and a connection cap.

    uvicorn times out idle keep-alive connections only: a client that sends its headers or
    body one byte at a time keeps a connection (and a file descriptor) forever. Here every
    request must arrive whole within ``read_timeout`` seconds of its first byte (of the
    connection, for the first request), or the connection is closed; a connection beyond
    ``max_connections`` gets a 503 and is closed before anything is read.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _check_server_limits(read_timeout, max_connections)
    reading = (h11.IDLE, h11.SEND_BODY)

    class _GuardedProtocol(H11Protocol):
        _refused = False
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                transport.write(_BUSY)
                transport.close()
                ingest.count(refused_connections=1)
                refused = ingest.stats["refused_connections"]
                if refused == 1 or refused % 1000 == 0:
                    _log.warning(
                        "refused a connection: %d open (--max-connections); %d refused so far",
                        len(self.connections),
                        refused,
                    )
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._read_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on a keep-alive connection starts
            super().data_received(data)
            if self.conn.their_state not in reading:
                self._disarm()  # the request is complete (or broken and answered)

        def on_response_complete(self) -> None:
            # A pipelined request that arrived with the previous one is started here, from
            # h11's buffer, not in data_received: without this its body could trickle in
            # forever (data_received only arms the timer for a request that starts IDLE).
            super().on_response_complete()
            if (
                self._read_timer is None
                and not self.transport.is_closing()
                and self.conn.their_state is h11.SEND_BODY
            ):
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self._arm()  # we are answering (say a 413 before the body): let it finish
                return
            ingest.count(read_timeouts=1)
            _log.info(
                "closed the connection from %s: no whole request within %.1f s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                read_timeout,
            )
            self.transport.close()

    return _GuardedProtocol


def _uvicorn_config(
    app: Starlette,
    host: str,
    port: int,
    log_format: str,
    log_level: str,
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=log_config(log_format, log_level),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=30,
        http=_guarded_protocol(app.state.ingest, read_timeout, max_connections),
    )


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 4318,
    token: str | None,
    tokens: Sequence[IngestToken] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    log_format: str = "text",
    log_level: str = "info",
    decode_workers: int | None = None,
) -> None:
    """Run the ingest endpoint with uvicorn until SIGINT/SIGTERM (then finish in-flight appends).

    A PostgreSQL store is opened without a spool: when the server is down the endpoint
    answers 503 and the clients keep (and retry) the spans.

    Args:
        url: the audit store URL.
        host: address to listen on.
        port: TCP port.
        token: one shared bearer secret (trusted for everything), or ``None``.
        tokens: the tokens of a token file; with neither, no authentication.
        max_body_bytes: request size limit.
        retry_after: seconds in ``Retry-After`` with a 503.
        read_timeout: seconds a client has to send a whole request.
        max_connections: open connections beyond this get 503 and are closed.
        log_format: ``text`` or ``json``.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        decode_workers: processes that decode requests (:mod:`coworker.ingest.workers`);
            ``None``: one per core when there are several, else none.
    """
    import uvicorn

    _check_server_limits(read_timeout, max_connections)  # before the store is opened
    store = _open(url)
    app = create_app(
        store,
        token=token,
        tokens=tokens,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        close_store=True,
        decode_workers=_default_workers() if decode_workers is None else decode_workers,
    )
    config = _uvicorn_config(
        app,
        host,
        port,
        log_format,
        log_level,
        read_timeout=read_timeout,
        max_connections=max_connections,
    )
    server = uvicorn.Server(config)
    _log.info("coworker audit ingest on http://%s:%d%s", host, port, TRACES_PATH)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully, then re-raises the signal to the previous handler:
        # make that a normal exit rather than death by SIGTERM or a KeyboardInterrupt trace.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, _exit_quietly)
    server.run()


def _default_workers() -> int:
    # One decoder per core: the server process itself mostly waits for the store's commits.
    cores = os.cpu_count() or 1
    return cores if cores > 1 else 0


def _exit_quietly(number: int, frame: Any) -> None:
    raise SystemExit(0)


def _open(url: str) -> AuditStore:
    from coworker.audit.urls import open_store

    if url.split("://", 1)[0].lower().startswith("postgres"):
        from coworker.audit.store_postgres import PostgresStore

        return PostgresStore(url, spool=None)
    return open_store(url)


def _listen_socket(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    # says TCP, and without it every response waits ~40 ms for a delayed ACK (Nagle).
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


class IngestServer:
    """The ingest endpoint served by uvicorn in a background thread (tests, benchmarks, apps
    that embed it).

    Args:
        store: where audit records go.
        host: address to listen on.
        port: TCP port; 0 picks a free one (see :attr:`port`).
        read_timeout: seconds a client has to send a whole request.
        max_connections: open connections beyond this get 503 and are closed.
        **options: passed to :func:`create_app`.
    """

    def __init__(
        self,
        store: AuditStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **options: Any,
    ) -> None:
        import uvicorn

        self.app = create_app(store, **options)
        self.host = host
        config = _uvicorn_config(
            self.app,
            host,
            port,
            "text",
            "warning",
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
        self._socket = _listen_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        """``http://host:port/v1/traces``."""
        return f"http://{self.host}:{self.port}{TRACES_PATH}"

    @property
    def stats(self) -> dict[str, int]:
        """Counts: requests, appended, duplicates, rejected, forbidden, conflicts, ..."""
        return self.app.state.ingest_stats  # type: ignore[no-any-return]

    def start(self, timeout: float = 60.0) -> IngestServer:
        """Start serving; returns once the server accepts connections (decoding workers, if
        any, are started first: spawning them can take seconds on a loaded machine)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ingest server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 35.0) -> None:
        """Graceful shutdown: stop accepting, finish in-flight requests and appends."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
