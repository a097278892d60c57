"""The outage spool of the PostgreSQL store and the thread that ships it."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from coworker import attributes as attr
from coworker.audit.chain_seal import ChainSealed
from coworker.audit.record import canonical
from coworker.audit.spool import Spool, SpoolStatus
from coworker.audit.store_postgres._wire import (
    _SHIP_BATCH,
    AppendResult,
    _Item,
    _item_from_spool,
    _ServerDown,
    _Unreachable,
)
from coworker.audit.store_postgres.writes import _Writes
from coworker.exceptions import AuditUnavailable

_log = logging.getLogger("coworker.audit")


class _Shipper(_Writes):
    """The outage spool of the PostgreSQL store and the thread that ships it."""

    # -- spool -------------------------------------------------------------------------------
    @property
    def spool_path(self) -> Path | None:
        """The local spool file (created on first need), or ``None`` when spooling is off."""
        return self._spool_path

    def spool_status(self) -> SpoolStatus | None:
        """Depth and timing of the local spool, or ``None`` when spooling is off."""
        if self._spool_path is None:
            return None
        if self._spool is None:
            return SpoolStatus(str(self._spool_path), 0, None, None)
        return self._spool.status()

    def ship(self) -> int:
        """Ship what waits in the spool now (normally a background thread does it).

        Returns:
            The number of entries still waiting.
        """
        if self._spool is None:
            return 0
        with self._lock:
            try:
                self._drain_locked()
            except _ServerDown:
                pass
            return self._spool.depth()

    def _open_spool(self) -> Spool:
        # Called at construction or with self._lock held. Created on first need, so that
        # read-only uses (verify, query) leave no file behind.
        if self._spool is None:
            assert self._spool_path is not None
            self._spool = Spool(self._spool_path)
            try:
                from coworker import metrics
            except ImportError:  # pragma: no cover - metrics is optional
                pass
            else:
                metrics.register_spool_depth(
                    self._spool_depth,
                    attributes={attr.METRIC_ATTR_SPOOL: str(self._spool_path)},
                )
        return self._spool

    def _spool_depth(self) -> int:
        spool = self._spool
        return spool.depth() if spool is not None else 0

    def _start_shipper(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._closed:
                return
            if self._shipper is not None and self._shipper_pid == pid and self._shipper.is_alive():
                return
            self._shipper = threading.Thread(
                target=self._ship_loop, name="coworker-audit-spool", daemon=True
            )
            self._shipper_pid = pid
            self._shipper.start()

    def _ship_loop(self) -> None:
        while not self._stop.wait(self._ship_interval):
            if not self._connected():
                # Connect outside the store lock: against an unresponsive server this takes
                # the connect timeout, and appends must keep spooling meanwhile.
                try:
                    self._install(self._new_connection())
                except _ServerDown:
                    continue
                except ChainSealed as exc:  # retired meanwhile: the registry refused the open
                    self._stop_shipping_sealed(exc)
                    return
                except Exception:
                    _log.exception("audit spool %s: cannot connect to ship", self._spool_path)
                    continue
            with self._lock:
                if self._closed or self._spool is None:
                    return
                try:
                    self._drain_locked()
                except _ServerDown:
                    continue
                except ChainSealed as exc:
                    self._stop_shipping_sealed(exc)
                    return
                except Exception:
                    _log.exception("audit spool %s: shipping failed", self._spool.path)
                    continue
                if self._spool.is_empty():
                    self._shipper = None
                    return

    def _stop_shipping_sealed(self, exc: ChainSealed) -> None:
        # Spooled before the store learnt the chain was retired: kept in the spool (never
        # lost), but no append will ever take them. Said once; the shipper stops, and from
        # now on appends are refused, not spooled.
        self._sealed_seq = exc.seq or self._sealed_seq or -1
        spool = self._spool
        _log.error(
            "audit spool %s: %d spooled record(s) of chain %r cannot be shipped: %s. They stay "
            "in the spool file",
            spool.path if spool is not None else self._spool_path,
            spool.depth() if spool is not None else 0,
            self.chain,
            exc,
        )
        self._shipper = None

    def _drain_locked(self) -> None:
        """Ship the spool, oldest first, until it is empty; raises _ServerDown if it cannot."""
        spool = self._spool
        assert spool is not None
        with spool.shipping() as mine:
            if not mine:  # another process or thread is shipping it
                return
            while True:
                batch = spool.peek(_SHIP_BATCH)
                if not batch:
                    return
                items = [_item_from_spool(e) for e in batch]
                try:
                    self._write_with_retry(items, note=spool)
                except _Unreachable as exc:
                    raise _ServerDown(str(exc.cause)) from exc.cause
                spool.remove([e.id for e in batch])
                _log.info("audit spool %s: shipped %d record(s)", spool.path, len(batch))

    def _append(self, items: list[_Item], owed: list[_Item] | None = None) -> AppendResult:
        """Write, or spool when the server is unreachable; ``owed``: see _write_with_retry."""
        if self.readonly:
            raise AuditUnavailable(f"audit store {self} is read-only: append refused")
        if self._sealed_seq:
            # The chain was found retired (a seal at its head): never again written, so
            # never spooled either (a spooled entry is answered durable).
            raise self._refuse_sealed(self._sealed_seq, len(items))
        spool = self._spool
        with self._lock:
            if spool is not None and not spool.is_empty():
                # Older entries wait in the spool: these queue behind them, in order. The
                # shipper (one thread) ships them; an append never waits for a server that
                # just failed (it would hold the lock for a connect timeout each time).
                return self._to_spool(items)
            try:
                return self._write_with_retry(items, owed=owed)
            except _Unreachable as exc:
                if self._spool_path is None:
                    raise AuditUnavailable(
                        f"audit store {self}: server unreachable, {len(items)} record(s) not "
                        f"written: {exc.cause}"
                    ) from exc.cause
                _log.warning("audit store %s unreachable (%s): spooling", self, exc.cause)
                return self._to_spool(exc.items)

    def _to_spool(self, items: list[_Item]) -> AppendResult:
        # An entry that could never be sealed must fail now, as it would have in a direct
        # append, not sit in the spool forever blocking the ones behind it.
        for item in items:
            try:
                canonical({**item.fields, "seq": 1})
            except Exception as exc:
                raise AuditUnavailable(
                    f"audit store {self}: record cannot be canonicalised: {exc}"
                ) from exc
        try:
            spool = self._open_spool()
            spool.put(
                [i.fields for i in items],
                [i.payload for i in items],
                [i.dedup_key for i in items],
                [i.attempted for i in items],
            )
        except Exception as exc:
            raise AuditUnavailable(
                f"audit store {self}: server unreachable and spool {self._spool_path} failed: {exc}"
            ) from exc
        self._start_shipper()
        return AppendResult([], spooled=True)
