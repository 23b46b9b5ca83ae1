"""Named crash points for the crash-safety tests.

``CROWD_SYNC_CRASH_AT=name[:n]`` makes the process kill itself with SIGKILL the
n-th time (default 1st) it passes the point ``name``: no cleanup, no flush, as
a power cut or the OOM killer would. Unset (always, in production) it costs one
dictionary look-up.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "CROWD_SYNC_CRASH_AT"

# Where the tests crash the daemon, and why each matters:
POINTS = {
    "after_upload_accepted": "the platform accepted an upload that the outbox has not recorded yet",
    "mid_enqueue": "inside the transaction that records a batch of HIS rows",
    "before_cursor_move": "after reading a window of the HIS, before the cursor moves",
    "during_login": "after the login request was sent, before the token is stored",
}

_lock = threading.Lock()
_seen: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return name, int(n) if n.isdigit() else 1


def crash_point(name: str) -> None:
    target = _target()
    if target is None or target[0] != name:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        hit = _seen[name] == target[1]
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
