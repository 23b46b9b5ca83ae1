"""The built-in simulator in a process of its own, so that its request handling does not
share the benchmark's GIL (the real platform is another machine)."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any


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

