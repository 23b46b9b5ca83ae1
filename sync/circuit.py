"""Sending paused: a configuration error, or a platform that does not answer.

Whose fault a failure is decides what it costs (STYLE 12):
- the platform's (PlatformUnavailable: network, timeouts, 5xx, HTML, unreadable answers,
  failed logins; a token refused even after a new login): nothing is charged, the record
  goes back as it was and is tried again in the same dispatch. Several bad answers in a
  row with no good one between them mean the platform is down: sending pauses and the
  platform is probed, one record per back-off step, until it answers (``platform_down``
  in sync_state: seen by every process, `status`, /healthz, metrics);
- the configuration's (ConfigError): nothing is charged; sending pauses until fixed;
- unexplained (a bare 中间请求异常, a 200 without 新增成功/修改成功, an unknown message):
  the record is retried with its own back-off and never given up on, since nothing says
  it is wrong; they also count as bad answers in a row;
- the record's (参数校验错误): parked invalid.
So `dead` never comes from the platform, by construction: the only answer the document
has that names a record's problem is 参数校验错误, and that one parks it as invalid.

``Halt`` is one dispatch's view (the answers as they come, from every upload and lookup
thread); ``Circuit`` is what outlives it, in the outbox's state rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from sync import localtime
from sync.errors import AuthError, ConfigError, PlatformUnavailable, SyncError, describe
from sync.outbox.model import DEFAULT_INSTITUTION, Claimed
from sync.outbox.store import Store
from sync.policy import RetryPolicy
from sync.stats import CycleStats

log = structlog.get_logger(__name__)

# Bad answers in a row (platform faults, unexplained refusals), with no good one between
# them, that mean the platform is down: at least this many, or one more than the uploads
# in flight (an outage fails all of those at once).
BAD_IN_A_ROW = 4


class Halt:
    """Why one dispatch must stop sending, and the platform's recent answers; shared by the
    upload and lookup threads.

    Every request is made between ``begin`` and ``end``. After a bad answer, requests go
    one at a time until a good answer comes back: an outage costs the requests already in
    flight and one more, not a request per record waiting.
    """

    def __init__(self, bad_to_halt: int) -> None:
        self._lock = threading.Condition()
        self._limit = bad_to_halt
        self._bad = 0
        self._inflight = 0
        self._released = False
        self.errors: list[SyncError] = []

    def begin(self) -> bool:
        """Wait for a slot to send; False when sending stopped meanwhile."""
        with self._lock:
            while not self.errors and self._bad > 0 and self._inflight > 0:
                self._lock.wait()
            if self.errors:
                return False
            self._inflight += 1
            return True

    def end(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._lock.notify_all()

    def add(self, exc: SyncError) -> None:
        """Stop sending now (a configuration error)."""
        with self._lock:
            self.errors.append(exc)
            self._lock.notify_all()

    def answered(self) -> None:
        """The platform took (or judged) a request: what came before was no outage."""
        with self._lock:
            self._bad = 0
            self._lock.notify_all()

    def bad(self, exc: SyncError) -> None:
        """A platform fault or an unexplained refusal; too many in a row: the platform is down."""
        with self._lock:
            self._bad += 1
            self._lock.notify_all()
            if self._bad < self._limit or self.errors:
                return
            if isinstance(exc, PlatformUnavailable | AuthError):
                self.errors.append(exc)
                return
            self.errors.append(
                PlatformUnavailable(
                    f"平台连续 {self._bad} 次拒收且未说明原因 / the platform refused {self._bad} requests in a row without a reason (last: {exc.message})",
                    hint="平台拒收所有请求且未说明原因，暂停发送并定时探测 / the platform refuses everything without a "
                    "reason: sending pauses and the platform is probed with back-off",
                    http_status=exc.http_status, platform_message=exc.platform_message,
                )
            )

    def release(self, store: Store, claims: list[Claimed], *, now: datetime) -> None:
        """Give records back untouched after a platform fault; the dispatch tries them again."""
        store.leases.release(claims, now=now)
        with self._lock:
            self._released = True

    def take_released(self) -> bool:
        with self._lock:
            released, self._released = self._released, False
            return released and not self.errors


class Circuit:
    """Whether one institution's sending is paused (``config_error``: its key, its account) or
    waits for the platform (``platform_down``, shared: one platform), and when to probe it
    next; kept in the outbox's state rows for every process."""

    def __init__(
        self, store: Store, *, probes: RetryPolicy, clock: Callable[[], datetime], institution: str = DEFAULT_INSTITUTION
    ) -> None:
        self._store = store
        self.institution = institution
        self._probes = probes
        self._clock = clock
        # While the platform is unreachable: when to probe it next (outbox time).
        self.next_probe_at: datetime | None = None

    def state(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the configuration error holding sending back, the platform found unreachable)."""
        return self._store.state.get_config_error(self.institution), self._store.state.get_platform_down()

    def waiting(self, stats: CycleStats, *, paused: dict[str, Any] | None, down: dict[str, Any] | None) -> bool:
        """The platform is unreachable and its next probe is not due yet: no request at all."""
        if down is None:
            return False
        due = _state_time(down.get("next_probe_at"))
        if due is None or self._clock() >= due:
            return False
        self.next_probe_at = due
        self.note(stats, paused=paused, down=down)
        return True

    @staticmethod
    def note(stats: CycleStats, *, paused: dict[str, Any] | None, down: dict[str, Any] | None) -> None:
        """Why nothing was sent, for the run's figures."""
        stats.paused = str(paused.get("message")) if paused else None
        stats.unreachable = unreachable_text(down) if down else None

    def probe_due(self, now: datetime | None = None) -> bool:
        """Whether a probe of the unreachable platform is due (the daemon runs a dispatch then)."""
        due = self.next_probe_at
        return due is not None and (now or self._clock()) >= due

    def settle(
        self, halt: list[SyncError], stats: CycleStats, *, paused: dict[str, Any] | None, down: dict[str, Any] | None
    ) -> bool:
        """Record why sending stopped, or that it works again. True when it stopped."""
        config = next((e for e in halt if isinstance(e, ConfigError)), None)
        if config is not None:
            self.pause(config)
            stats.paused = config.message
            if down is not None:
                # A configuration error is an answer: the platform is reachable.
                self._store.state.clear_platform_down()
                self.next_probe_at = None
            return True
        if halt:
            error = halt[0]
            reason = describe(error)
            previous = self._store.state.get_platform_down()
            probes = int(previous.get("probes") or 0) + 1 if previous else 0
            now = self._clock()
            nxt = now + timedelta(seconds=self._probes.delay_s(probes + 1))
            state = self._store.state.set_platform_down(reason=reason, now=now, next_probe_at=nxt)
            self.next_probe_at = nxt
            stats.unreachable = unreachable_text(state)
            stats.paused = str(paused.get("message")) if paused else None
            if previous is None:
                log.error(
                    "platform_unreachable", error=error.message, platform_message=error.platform_message,
                    next_probe_at=localtime.text(nxt),
                    consequence="sending paused; no record is charged; probing with back-off",
                )
            else:
                log.warning("platform_probe_failed", probes=probes, error=error.message,
                            next_probe_at=localtime.text(nxt))
            return True
        if paused:
            self._store.state.clear_config_error(self.institution)
            log.warning("sending_resumed", after=paused.get("message"), institution=self.institution)
        if down is not None:
            self._store.state.clear_platform_down()
            log.warning("platform_reachable_again", unreachable_since=down.get("since"), probes=down.get("probes"))
        self.next_probe_at = None
        return False

    def pause(self, exc: ConfigError) -> None:
        """Hold sending back until the configuration is fixed (said once per new error)."""
        already = self._store.state.get_config_error(self.institution)
        self._store.state.set_config_error(
            message=describe(exc), hint=exc.hint, now=self._clock(), institution=self.institution
        )
        if not already or already.get("message") != describe(exc):
            log.error("sending_paused", error=exc.message, fix=exc.hint, platform_message=exc.platform_message,
                      institution=self.institution)


def unreachable_text(state: Mapping[str, Any]) -> str:
    """``platform unreachable since …`` for status, /healthz and the logs."""
    text = f"platform unreachable since {localtime.text(state.get('since'))}: {state.get('reason')}"
    if state.get("next_probe_at"):
        text += (
            f" (probes failed: {state.get('probes') or 0}; next probe at {localtime.text(state.get('next_probe_at'))})"
        )
    return text


def _state_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
