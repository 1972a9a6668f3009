"""Calls to a tracking server that survive it going away.

Logging never stops training: a call that fails for a passing reason is queued, the server is probed again
at most every ``probe_every`` seconds, and the queue is replayed in order (original steps and timestamps)
once it answers. Every second waited on the server counts against ``tracking.time_budget``; past it nothing
more is sent and what is left is reported (the local files keep everything).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedcmi.errors import one_line
from fedcmi.tracking.server import reachable, transient

log = logging.getLogger("fedcmi")
SLOW_CALL_SECONDS = 5.0


class ResilientCalls:
    """An ordered queue of tracking calls against ``uri``, within ``budget`` seconds of waiting in all."""

    def __init__(self, uri: str, budget: float, probe_every: float = 30.0) -> None:
        self.uri = uri
        self.budget = budget
        self.probe_every = probe_every
        self.spent = 0.0  # seconds waited on the server
        self.out_of_time = False
        self._warned_slow = False
        self.errors: list[str] = []  # what failed for good
        self.replayed: list[str] = []  # what failed while the server was away and was logged once it came back
        self.lost = False
        self._last_probe = 0.0
        self._pending: list[tuple[str, Callable[[], Any], Callable[[], None] | None]] = []

    @property
    def unlogged(self) -> list[str]:
        """What the tracking server has not received (yet)."""
        return [what for what, _, _ in self._pending]

    def _spend(self, seconds: float) -> None:
        """Account for time waited on the server: one warning when it is slow, and past the budget nothing
        more is sent."""
        self.spent += seconds
        if seconds >= SLOW_CALL_SECONDS and not self._warned_slow:
            self._warned_slow = True
            log.warning("the tracking server %s is slow (one call took %.0f s); fedcmi waits on it %g s in all "
                        "(tracking.time_budget), then reports what it did not send", self.uri, seconds, self.budget)
        if self.spent > self.budget and not self.out_of_time:
            self.out_of_time = True
            log.warning("tracking.time_budget (%g s) is spent; nothing more goes to %s in this run, and what is "
                        "not sent is reported at the end (the local files keep everything)", self.budget, self.uri)

    def _timed(self, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self._spend(time.monotonic() - t0)

    def probe(self) -> bool:
        self._last_probe = time.monotonic()
        t0 = time.monotonic()
        try:
            return reachable(self.uri)
        finally:
            self._spend(time.monotonic() - t0)

    def flush(self) -> None:
        """Replay queued calls in order; stop (and stay lost) at the first that fails again."""
        while self._pending and not self.out_of_time:
            what, fn, done = self._pending[0]
            try:
                self._timed(fn)
            except Exception as exc:
                if not transient(exc):  # refused for good now that the server answers: report, go on
                    self.errors.append(f"{what}: {one_line(exc, 200)}")
                    self._pending.pop(0)
                    continue
                self.lost = True
                return
            self._pending.pop(0)
            self.replayed.append(what)
            if done is not None:
                done()
        self.lost = bool(self._pending)

    def call(self, what: str, fn: Callable[[], Any], done: Callable[[], None] | None = None) -> Any:
        """Run ``fn`` now, or queue it while the server is away; ``done`` runs once it has succeeded (now or
        on a replay). Returns ``fn``'s result, or None when it did not run now."""
        if self.out_of_time:
            self._pending.append((what, fn, done))
            return None
        if self.lost:  # do not spend the client's retries on every call while the server is away
            if time.monotonic() - self._last_probe >= self.probe_every and self.probe():
                self.flush()
            if self.lost:
                self._pending.append((what, fn, done))
                return None
        try:
            result = self._timed(fn)
        except Exception as exc:  # the server may be gone or failing; training must not stop
            msg = f"{what}: {one_line(exc, 200)}"
            if transient(exc):  # sent again once the server answers, whatever the kind of failure
                log.warning("tracking failed (%s); it is sent again once the server answers", msg)
                self.lost = True
                self._last_probe = time.monotonic()
                self._pending.append((what, fn, done))
            else:  # the server refused the request itself: sending it again would not help
                log.warning("tracking refused (%s); the local files keep everything", msg)
                self.errors.append(msg)
            return None
        if done is not None:
            done()
        return result

    def settle(self, wait: float, every: float = 2.0) -> bool | None:
        """Before the run ends: probe and replay until nothing is queued, ``wait`` seconds pass or the budget
        is spent (a short outage then costs nothing). Returns the last probe's answer (None: no probe)."""
        deadline = time.monotonic() + max(0.0, min(wait, self.budget - self.spent))
        answered: bool | None = None
        while self._pending and not self.out_of_time:
            answered = self.probe()
            if answered:
                self.flush()
                if not self._pending:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pause = min(every, left)
            time.sleep(pause)
            self._spend(pause)
        return answered

    def drain(self) -> None:
        """Send what is queued: one attempt now when the server answers."""
        if self._pending and not self.out_of_time and self.probe():
            self.flush()
