"""The built-in simulator in a process of its own, so that its request handling does not
share the benchmark's GIL (the real platform is another machine), plus the naive
uploader the pipeline is compared with."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import requests

from sync.upstream.signing import EHRKEY_HEADER, ENDPOINTS, event_code, platform_app_key, signed_query
from sync.upstream.simulator import TEST_APP_KEY, TEST_PASSWORD, TEST_USERNAME


def _serve(conn: Connection) -> None:
    import logging

    from sync.upstream.simulator import SimConfig, Simulator

    logging.disable(logging.WARNING)
    sim = Simulator(SimConfig()).start()
    # A hundred thousand uploads would otherwise keep every request in memory.
    sim.requests_log = _Discard()
    conn.send(sim.url)
    while True:
        cmd, arg = conn.recv()
        if cmd == "latency":
            sim.faults.latency_s = float(arg)
        elif cmd == "people":
            for card in arg:
                sim.add_person(card, jjxBq=[{"code": "J01.02", "name": "农村低保对象", "remark": None, "attr1": "0"}])
        elif cmd == "reset":
            sim.reset_counters()
            sim.records.clear()
        elif cmd == "counters":
            conn.send(dict(sim.counters))
            continue
        elif cmd == "stop":
            sim.stop()
            conn.send("stopped")
            return
        conn.send("ok")


class _Discard(list[Any]):
    def append(self, _item: Any) -> None:
        return None


class Platform:
    """Handle on the simulator process."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="bench-simulator")
        self._proc.start()
        self.url: str = self._conn.recv()

    def _call(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def latency(self, seconds: float) -> None:
        self._call("latency", seconds)

    def label(self, cards: list[str]) -> None:
        """These people are in the key population (one socio-economic label each)."""
        self._call("people", cards)

    def reset(self) -> None:
        self._call("reset")

    def counters(self) -> dict[str, int]:
        result: dict[str, int] = self._call("counters")
        return result

    def stop(self) -> None:
        try:
            self._call("stop")
        finally:
            self._proc.join(timeout=10)


def naive_upload(base_url: str, bodies: list[str]) -> float:
    """Upload ``bodies`` one plain ``requests.post`` at a time (a new connection each, no
    shared session), signed as the client signs; returns the elapsed seconds."""
    key = platform_app_key(TEST_APP_KEY, "as_printed")  # the reading the simulator plays by default
    headers = {"Accept": "application/json", "Content-Type": "application/json;charset=UTF-8", EHRKEY_HEADER[0]: EHRKEY_HEADER[1]}

    def url(endpoint: str) -> str:
        query = signed_query(event_code("test", endpoint), key, int(time.time() * 1000))  # type: ignore[arg-type]
        return f"{base_url}{ENDPOINTS[endpoint].path}?{query}"  # type: ignore[index]

    answer = requests.post(url("login"), json={"username": TEST_USERNAME, "password": TEST_PASSWORD}, headers=headers, timeout=30)
    token = answer.json()["data"]["token"]
    started = time.perf_counter()
    for body in bodies:
        r = requests.post(url("upload"), data=body.encode("utf-8"), headers={**headers, "accesstoken": token}, timeout=30)
        if r.status_code != 200 or r.json().get("code") != 200:
            raise RuntimeError(f"naive upload refused: {r.status_code} {r.text[:200]}")
    return time.perf_counter() - started
