"""Outbox -> platform: claim what is due, decide, upload, record each outcome.

Every row is decided again at dispatch (``keycrowd.decide``, with the label API asked
through the label cache), and only a SEND verdict is uploaded; whose fault a failure is
decides what it costs (see ``sync.circuit``). ``upstream.concurrency`` uploads are in
flight at once, the next batch claimed while the previous one drains; outcomes are
built, counted and written by one thread (``sync.outcomes``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import date, datetime

import structlog

from sync import intake, keycrowd, records
from sync.circuit import BAD_IN_A_ROW, Circuit, Halt
from sync.clock import utcnow
from sync.crashpoints import crash_point
from sync.errors import (
    AuthError,
    ConfigError,
    InvalidRecord,
    PlatformUnavailable,
    SyncError,
    TransientError,
    describe,
)
from sync.keycrowd import Decision, LabelResult, LabelState, Verdict
from sync.outbox.model import DEFAULT_INSTITUTION, Claimed, Status
from sync.outbox.store import Store
from sync.outcomes import Outcomes
from sync.policy import RetryPolicy
from sync.settings import KeyCrowd, Settings
from sync.stats import CycleStats, Progress
from sync.upstream.client import Client, LookupResult
from sync.upstream.person import parse_person

log = structlog.get_logger(__name__)

_NOT_ASKED = LabelResult.not_asked()


class Dispatcher:
    """Sends what the outbox holds due for one institution, with its client (its key and token)."""

    def __init__(
        self, settings: Settings, *, store: Store, client: Client, owner: str, clock: Callable[[], datetime],
        sole_sender: bool, progress: Progress, stop: threading.Event, institution: str = DEFAULT_INSTITUTION,
        pool: ThreadPoolExecutor | None = None, outcomes: Outcomes | None = None,
    ) -> None:
        """``owner`` names this process's leases; ``sole_sender``: it holds the instance lock, so
        leases held by any other owner belong to a process that died; ``stop``: set to take no
        more work. ``pool`` and ``outcomes``: shared by the institutions of one pipeline (one
        ``upstream.concurrency``, one writer of outcomes)."""
        self.institution = institution
        self.settings = settings
        self.store = store
        self.client = client
        self.owner = owner
        self.clock = clock
        self.sole_sender = sole_sender
        self.progress = progress
        self._stop = stop
        self.policy = RetryPolicy(first_delay_s=settings.retry.first_delay_s, max_delay_s=settings.retry.max_delay_s)
        self.circuit = Circuit(store, probes=self.policy.probes(), clock=clock, institution=institution)
        self._pool = pool or ThreadPoolExecutor(max_workers=settings.upstream.concurrency, thread_name_prefix="upload")
        self.outcomes = outcomes or Outcomes(
            store, policy=self.policy, max_generic_attempts=settings.retry.max_generic_attempts, clock=clock
        )
        self._labels = LabelLookups(settings.key_crowd, store=store, client=client, pool=self._pool, clock=clock)

    def dispatch(self, stats: CycleStats, *, reading_done: threading.Event | None = None) -> None:
        """Send everything due, with ``upstream.concurrency`` uploads in flight; every outcome
        is in the outbox when this returns. ``reading_done``: the outbox is being filled
        meanwhile; nothing due is not the end until this is set."""
        looked_up: dict[str, LabelResult] = {}
        try:
            if self.sole_sender:
                self._recover_leases()
            paused, down = self.circuit.state()
            if self.circuit.waiting(stats, paused=paused, down=down):
                return
            if paused or down:
                # One record first; the backlog follows only once the platform takes it.
                claims = self.store.leases.claim_due(
                    now=self.clock(), limit=1, owner=self.owner, institution=self.institution
                )
                if not claims:
                    self.circuit.note(stats, paused=paused, down=down)
                    return
                self.progress.tick()
                halt = self._stream(stats, looked_up, only=claims, refusals_to_halt=1 if down else None)
                if self.circuit.settle(halt, stats, paused=paused, down=down):
                    if self.circuit.next_probe_at is not None:
                        # The next probe takes another record: one the platform cannot take
                        # must not keep the others waiting.
                        self.store.leases.postpone(claims, until=self.circuit.next_probe_at)
                    return
            halt = self._stream(stats, looked_up, reading_done=reading_done)
            self.circuit.settle(halt, stats, paused=None, down=None)
        finally:
            self.outcomes.recorder.flush()

    def close(self, *, wait_s: float = 10.0) -> None:
        """Let the uploads in flight finish (up to ``wait_s``), then write their outcomes.
        Leases are left as they are: the caller releases its own."""
        deadline = time.monotonic() + wait_s
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in list(getattr(self._pool, "_threads", ())):
            t.join(max(0.0, deadline - time.monotonic()))
        self.outcomes.recorder.close()

    def _recover_leases(self) -> None:
        """This process holds the instance lock: it is the only one sending, so leases held by
        anyone else belong to a process that died. Free them now rather than after lease_s."""
        n = self.store.leases.release_other_leases(self.owner)
        if n:
            log.warning("leases_recovered", records=n, reason="held by a process that is no longer running")

    def _stream(
        self, stats: CycleStats, looked_up: dict[str, LabelResult], *, only: list[Claimed] | None = None,
        refusals_to_halt: int | None = None, reading_done: threading.Event | None = None,
    ) -> list[SyncError]:
        """Keep ``concurrency`` uploads in flight: every decided record goes into the pool's one
        work queue, its threads take the next as soon as one is done, and the next batch is
        claimed while enough remain queued (``only``: send these and claim nothing more).
        Returns why sending had to stop (configuration errors, platform faults), empty when it
        did not."""
        concurrency = self.settings.upstream.concurrency
        batch_size = max(32, concurrency * 8)
        # Claimed ahead while this many are still queued or in flight: no thread waits for a claim.
        refill = max(2 * concurrency, batch_size // 2)
        flow = _Flow()
        halt = Halt(refusals_to_halt or max(BAD_IN_A_ROW, concurrency + 1))
        if only is not None:
            self._submit(self._prepare(only, stats, looked_up, halt), stats, halt, flow)
        drained = only is not None
        while True:
            if not drained and not (self._stop.is_set() or halt.errors):
                flow.wait_below(refill, self._stop)
                if self._stop.is_set() or halt.errors:
                    continue
                claims = self.store.leases.claim_due(
                    now=self.clock(), limit=batch_size, owner=self.owner, institution=self.institution
                )
                if claims:
                    self.progress.tick()
                    self._submit(self._prepare(claims, stats, looked_up, halt), stats, halt, flow)
                elif reading_done is not None and not reading_done.is_set():
                    reading_done.wait(0.05)  # the reader is about to commit its next batch
                else:
                    drained = True
                continue
            flow.wait_below(1, None)
            if only is None and not self._stop.is_set() and halt.take_released():
                drained = False  # records went back untouched after a platform fault: try them again
                continue
            break
        if flow.unsent:
            # Not sent (sending stopped first): back as they were, nothing charged.
            self.store.leases.release(flow.unsent, now=self.clock())
        return list(halt.errors)

    def _submit(self, queue: list[tuple[Claimed, Decision, str | None]], stats: CycleStats, halt: Halt,
                flow: _Flow) -> None:
        for c, d, new_hash in queue:
            flow.add()
            self._pool.submit(self._upload_guarded, c, d, stats, halt, new_hash, flow).add_done_callback(flow.done)

    def _upload_guarded(
        self, c: Claimed, d: Decision, stats: CycleStats, halt: Halt, new_hash: str | None, flow: _Flow
    ) -> None:
        if self._stop.is_set() or halt.errors:
            flow.hand_back(c)
            return
        try:
            self._upload_one(c, d, stats, halt, new_hash, flow)
        except Exception as exc:  # noqa: BLE001 - counted against the record (sync.outcomes.crashed)
            self.outcomes.crashed(c, exc, stats)

    def _prepare(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, LabelResult], halt: Halt,
    ) -> list[tuple[Claimed, Decision, str | None]]:
        """Decide one claimed batch (``keycrowd.decide``, every row, every time): park what is
        not to be sent; the rest, to upload."""
        queue: list[tuple[Claimed, Decision, str | None]] = []
        rebuilt: dict[str, str] = {}
        today = datetime.now(self.settings.schedule.tz).date()
        claims = [r for r in (self._rebuilt(c, stats, rebuilt, today) for c in claims) if r is not None]
        kc = self.settings.key_crowd
        labels = self._labels.fetch(claims, stats, looked_up, halt)
        if halt.errors:
            # The platform is down or refuses the configuration: the batch goes back untouched.
            self.store.leases.release(claims, now=self.clock())
            return queue
        unasked: list[Claimed] = []
        for c in claims:
            d = keycrowd.decide(
                source=kc.source, upload_only_key_crowd=kc.upload_only_key_crowd, card_type=c.card_type,
                column=c.key_crowd, labels=labels.get(c.card_no or "", _NOT_ASKED),
            )
            if d.verdict is Verdict.SEND:
                queue.append((c, d, rebuilt.get(c.lsh)))
            elif d.verdict is Verdict.SKIP:
                self.outcomes.parked(c, Status.SKIPPED, d.how, stats, key_crowd=d.key_crowd)
            elif d.needs_lookup:
                unasked.append(c)  # its lookup hit a platform fault: nothing known, nothing charged
            else:
                # Undecided: never sent on a guess; tried again with the record's back-off.
                self.outcomes.failed(c, TransientError(d.how), stats)
        if unasked:
            halt.release(self.store, unasked, now=self.clock())
        return queue

    def _rebuilt(self, c: Claimed, stats: CycleStats, rebuilt: dict[str, str], today: date) -> Claimed | None:
        """``c`` as it is to be sent: a requeued record that local validation had parked is
        validated again from its raw HIS row (``intake.rebuild``), and parked again if it
        must not go."""
        item = intake.rebuild(c.lsh, c.payload_json, key_crowd=self.settings.key_crowd, today=today)
        if item is None:
            return c
        if item.status is Status.INVALID:
            self.outcomes.parked(c, Status.INVALID, item.reason or "invalid", stats)
            return None
        if item.status is Status.SKIPPED:
            self.outcomes.parked(c, Status.SKIPPED, item.reason or "not in the key population", stats, key_crowd=item.key_crowd)
            return None
        rebuilt[c.lsh] = item.payload_hash
        return replace(
            c, payload_json=item.payload_json, key_crowd=item.key_crowd, card_type=item.card_type, card_no=item.card_no
        )

    def _upload_one(
        self, c: Claimed, d: Decision, stats: CycleStats, halt: Halt, new_hash: str | None, flow: _Flow
    ) -> None:
        kc = self.settings.key_crowd
        if d.verdict is not Verdict.SEND or not keycrowd.may_upload(
            upload_only_key_crowd=kc.upload_only_key_crowd, key_crowd=d.key_crowd
        ):  # pragma: no cover - decide() is the only way here; refuse rather than send
            log.error("upload_refused", lsh=c.lsh, verdict=str(d.verdict), key_crowd=d.key_crowd)
            self.store.leases.release([c], now=self.clock())
            return
        assert d.key_crowd is not None
        body = records.with_key_crowd(c.payload_json, d.key_crowd)
        if not halt.begin():
            # Sending just stopped (platform down, configuration): this one goes back untouched.
            flow.hand_back(c)
            return
        try:  # the request's slot is given back once its outcome is known
            try:
                result = self.client.upload(body, lsh=c.lsh)
                crash_point("after_upload_accepted")
            except ConfigError as exc:
                halt.add(exc)
                self.store.leases.release([c], now=self.clock())
                self.outcomes.count(stats, "uploads_refused")
                return
            except (PlatformUnavailable, AuthError) as exc:
                # The platform's fault, not the record's: nothing charged, tried again.
                halt.bad(exc)
                halt.release(self.store, [c], now=self.clock())
                self.outcomes.count(stats, "uploads_unanswered")
                return
            except InvalidRecord as exc:
                halt.answered()
                self.outcomes.count(stats, "uploads_rejected")
                self.outcomes.rejected(c, exc, stats)
                return
            except TransientError as exc:
                if exc.generic:
                    halt.bad(exc)
                self.outcomes.count(stats, "uploads_failed")
                self.outcomes.failed(c, exc, stats)
                return
            halt.answered()
        finally:
            halt.end()
        self.outcomes.sent(
            c, stats, body=body, key_crowd=d.key_crowd, answer=result.message, http_status=result.http_status,
            created=result.created, payload_hash=new_hash,
        )
        self.progress.tick()
        log.debug("record_sent", lsh=c.lsh, answer=result.message, key_population=d.how)


class _Flow:
    """The uploads of one dispatch that are queued or in flight, and the records handed back
    unsent; the claiming thread waits here for room instead of for each upload."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._outstanding = 0
        self._waiting_below = 0
        self.unsent: list[Claimed] = []

    def add(self) -> None:
        with self._cond:
            self._outstanding += 1

    def done(self, _future: Future[None]) -> None:
        """An upload finished (or was cancelled at shutdown)."""
        with self._cond:
            self._outstanding -= 1
            if self._outstanding < self._waiting_below:
                self._cond.notify_all()

    def hand_back(self, c: Claimed) -> None:
        with self._cond:
            self.unsent.append(c)

    def wait_below(self, n: int, stop: threading.Event | None) -> None:
        """Until fewer than ``n`` are outstanding (or ``stop`` is set)."""
        with self._cond:
            self._waiting_below = n
            while self._outstanding >= n and not (stop is not None and stop.is_set()):
                self._cond.wait(0.5)
            self._waiting_below = 0


class LabelLookups:
    """What the label API says about the people a batch needs it for: the label cache
    first, each card at most once per dispatch, the lookups on the upload threads."""

    def __init__(
        self, settings: KeyCrowd, *, store: Store, client: Client, pool: ThreadPoolExecutor,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._pool = pool
        self._clock = clock

    def fetch(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, LabelResult], halt: Halt
    ) -> dict[str, LabelResult]:
        """What the label API says about each card the batch needs it for: cache first, each
        card at most once per dispatch. A failure is remembered for the whole dispatch, so
        every visit of that person waits (never one decided without the answer)."""
        source = self._settings.source
        need = sorted({
            c.card_no for c in claims if c.card_no and keycrowd.needs_lookup(source=source, card_type=c.card_type)
        })
        cards = [card for card in need if card not in looked_up]
        if cards:
            ttl_s = self._settings.cache_ttl_h * 3600
            cached = self._store.labels.get(cards, now=self._clock(), ttl_s=ttl_s) if ttl_s > 0 else {}
            for card, (data_json,) in cached.items():
                person = parse_person(json.loads(data_json)) if data_json else None
                looked_up[card] = keycrowd.from_labels(person, via="label cache", at=utcnow())
                stats.cache_hits += 1
            missing = [card for card in cards if card not in looked_up]
            fresh: dict[str, str | None] = {}
            futures = {self._pool.submit(self._ask, card, halt): card for card in missing}
            for fut, card in futures.items():
                try:
                    res = fut.result()
                except ConfigError as exc:
                    halt.add(exc)
                    continue
                except (PlatformUnavailable, AuthError) as exc:
                    halt.bad(exc)  # not the person's fault: not remembered as their failure
                    continue
                except SyncError as exc:
                    if isinstance(exc, TransientError) and exc.generic:
                        halt.bad(exc)
                    looked_up[card] = LabelResult(state=LabelState.FAILED, error=describe(exc))
                    continue
                if res is None:
                    continue  # not asked: sending stopped meanwhile
                halt.answered()
                stats.lookups += 1
                looked_up[card] = keycrowd.from_labels(res.person, via="label API", at=utcnow())
                fresh[card] = json.dumps(res.data, ensure_ascii=False) if res.data is not None else None
            if fresh:
                self._store.labels.put(fresh, now=self._clock())
        return {card: looked_up[card] for card in need if card in looked_up}

    def _ask(self, card: str, halt: Halt) -> LookupResult | None:
        if not halt.begin():
            return None  # sending stopped (platform down, configuration): do not ask
        try:
            return self._client.lookup(card)
        finally:
            halt.end()
