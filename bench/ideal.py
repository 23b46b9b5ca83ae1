"""The ideal client: the yardstick for crowd-sync's uploads and label lookups.

``threads`` threads, each with its own keep-alive ``requests.Session``, do nothing but
signed requests against the simulator: label lookups, or uploads of bodies prepared
beforehand. Every request is signed with ``sync.upstream.signing`` (a fresh time stamp
and hie_secret each, as crowd-sync signs) and carries the same headers, and every
answer is read and checked (status 200 and ``code`` 200), so the work on the wire is
crowd-sync's; what is left out is everything crowd-sync does around a request
(outbox, claims, decisions, outcomes, rate limit, deadlines, logs).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal
from urllib.parse import quote

import requests

from bench import seed
from sync import records
from sync.upstream.signing import (
    EHRKEY_HEADER,
    ENDPOINTS,
    EndpointName,
    KeyForm,
    event_code,
    platform_app_key,
    signed_query,
)
from sync.upstream.simulator import TEST_APP_KEY, TEST_PASSWORD, TEST_USERNAME

Kind = Literal["lookups", "uploads"]
# The reading of the app key the simulator plays by default (sync.upstream.simulator.SimConfig).
SIMULATOR_KEY_FORM: KeyForm = "as_printed"


@dataclass(frozen=True, kw_only=True)
class Figures:
    kind: Kind
    requests: int
    seconds: float
    cpu_s: float  # the whole process's CPU time over the run

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        """CPU time per request, in microseconds."""
        return self.cpu_s / self.requests * 1e6


def _headers() -> dict[str, str]:
    return {"Accept": "application/json", EHRKEY_HEADER[0]: EHRKEY_HEADER[1]}


def _url(base_url: str, code: str, key: str, path: str) -> str:
    return f"{base_url}{path}?{signed_query(code, key, int(time.time() * 1000))}"


def login(base_url: str) -> str:
    """A token for the simulator's test account."""
    key = platform_app_key(TEST_APP_KEY, SIMULATOR_KEY_FORM)
    answer = requests.post(
        _url(base_url, event_code("test", "login"), key, ENDPOINTS["login"].path),
        json={"username": TEST_USERNAME, "password": TEST_PASSWORD}, headers=_headers(), timeout=30,
    )
    token: str = answer.json()["data"]["token"]
    return token


def upload_bodies(n: int, *, prefix: str = "I") -> list[bytes]:
    """``n`` valid upload bodies of distinct visits, as crowd-sync would send them."""
    today = date.today()
    bodies = []
    for row in seed.visits(n, start=seed.HISTORY_START, prefix=prefix):
        payload = records.build(dict(zip(seed.COLUMNS, row, strict=True)), today=today)
        bodies.append(records.payload_json(payload).encode("utf-8"))
    return bodies


def run(base_url: str, kind: Kind, items: Sequence[str] | Sequence[bytes], *, threads: int) -> Figures:
    """Send one request per item (an ID number to look up, or a body to upload) from
    ``threads`` threads; the time runs from the start of all threads to the last answer."""
    key = platform_app_key(TEST_APP_KEY, SIMULATOR_KEY_FORM)
    token = login(base_url)
    endpoint: EndpointName = "labels" if kind == "lookups" else "upload"
    code = event_code("test", endpoint)
    path = ENDPOINTS[endpoint].path
    headers = {**_headers(), "accesstoken": token}
    upload_headers = {**headers, "Content-Type": "application/json;charset=UTF-8"}
    suffixes = [quote(str(item), safe="") for item in items] if kind == "lookups" else []
    n = len(items)
    counter = itertools.count()  # next() on it is atomic under the GIL
    start = threading.Barrier(threads + 1)
    errors: list[str] = []

    def work() -> None:
        session = requests.Session()
        try:
            start.wait()
            while (i := next(counter)) < n:
                if kind == "lookups":
                    answer = session.get(_url(base_url, code, key, path + suffixes[i]), headers=headers, timeout=30)
                else:
                    body = items[i]
                    answer = session.post(_url(base_url, code, key, path), data=body, headers=upload_headers, timeout=30)
                if answer.status_code != 200 or answer.json().get("code") != 200:
                    errors.append(f"{answer.status_code} {answer.text[:200]}")
                    return
        finally:
            session.close()

    workers = [threading.Thread(target=work, name=f"ideal-{i}", daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    start.wait()
    began, cpu = time.perf_counter(), time.process_time()
    for t in workers:
        t.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    if errors:
        raise RuntimeError(f"the ideal client was refused: {errors[0]}")
    return Figures(kind=kind, requests=n, seconds=elapsed, cpu_s=cpu)
