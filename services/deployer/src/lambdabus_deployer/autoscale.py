"""The autoscaler's pure decision: how many instances a function should run, from the
concurrency its routers observe. Modelled on Knative Serving's KPA (`pkg/autoscaler/scaling`):

- Every tick the observed concurrency (requests in flight, summed over the routers, averaged
  over their sampling interval) is recorded. The *stable* value is its average over the stable
  window (60 s), the *panic* value its average over the panic window (6 s, a tenth of it).
- The desired count is `ceil(value / target)` for each: stable and panic.
- Panic mode starts when the panic count reaches `panic_threshold` (2.0) times the instances
  ready now (demand passed twice the capacity): the panic count is used then, and nothing is
  ever scaled down while panicking. Panic ends when the threshold has not been passed for a
  whole stable window.
- Outside panic, a scale-down takes effect only once it held for a whole stable window: the
  count applied is the highest recommended over the last stable window (Knative's
  scale-down delay), so a lull shorter than the window keeps the instances; nothing is scaled
  down before the autoscaler observed a whole stable window (a new deployer leader keeps the
  instances it adopted), but for idleness.
- `min: 0`: the function scales to zero once no request came for `idle_seconds` (and none is in
  flight); a request observed while at zero wakes it at once to at least one instance.
- Never above `max`, never below `min`.

`Autoscaler.decide` is the whole decision; the deployer leader feeds it and applies its answer.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

STABLE_WINDOW = 60.0
PANIC_WINDOW_FRACTION = 0.1  # the panic window is 6 s of a 60 s stable window
PANIC_THRESHOLD = 2.0


@dataclass(frozen=True)
class ScalePolicy:
    """A function's `scale` spec, and the windows (settings) it is judged over."""

    min: int
    max: int
    target: float = 10.0
    idle_seconds: float = 60.0
    stable_window: float = STABLE_WINDOW
    panic_window: float = STABLE_WINDOW * PANIC_WINDOW_FRACTION
    panic_threshold: float = PANIC_THRESHOLD


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # a word: Panic, Stable, Idle, Woken, Bounds, Held
    message: str  # for a person: the values that led to it
    stable: float
    panic: float
    panicking: bool


@dataclass
class Autoscaler:
    """The decision state of one function (its samples and recommendations over the windows)."""

    policy: ScalePolicy
    started: float
    _samples: collections.deque[tuple[float, float]] = field(
        default_factory=collections.deque, repr=False
    )
    _recommended: collections.deque[tuple[float, int]] = field(
        default_factory=collections.deque, repr=False
    )
    last_request: float | None = None
    panic_since: float | None = None  # when the threshold was last passed, while panicking
    max_panic: int = 0

    def observe(self, now: float, concurrency: float, requests: int) -> None:
        """Record one tick: the average concurrency the routers saw and the requests they took
        since the last tick."""
        self._samples.append((now, max(0.0, concurrency)))
        if requests > 0 or concurrency > 0:
            self.last_request = now
        oldest = now - self.policy.stable_window
        while self._samples and self._samples[0][0] <= oldest:
            self._samples.popleft()

    def _average(self, now: float, window: float) -> float:
        values = [c for t, c in self._samples if t > now - window]
        return sum(values) / len(values) if values else 0.0

    def decide(self, now: float, ready: int) -> Decision:
        """The instances the function should run now, given `ready` instances."""
        p = self.policy
        stable = self._average(now, p.stable_window)
        panic = self._average(now, p.panic_window)
        stable_count = math.ceil(stable / p.target)
        panic_count = math.ceil(panic / p.target)
        over = panic_count >= p.panic_threshold * max(ready, 1) and panic_count > ready
        if over:
            self.panic_since = now
        elif self.panic_since is not None and now - self.panic_since >= p.stable_window:
            self.panic_since = None
            self.max_panic = 0
        values = f"stable {stable:.2f}, panic {panic:.2f} in flight; target {p.target:g}"
        if self.panic_since is not None:
            # Panicking: follow the panic window up, never down.
            self.max_panic = max(self.max_panic, panic_count, ready)
            wanted, reason = self.max_panic, "Panic"
        else:
            wanted, reason = stable_count, "Stable"
        self._recommended.append((now, wanted))
        while self._recommended and self._recommended[0][0] <= now - p.stable_window:
            self._recommended.popleft()
        if reason == "Stable" and wanted < ready:
            # A scale-down only once it held for a whole stable window; and none before this
            # autoscaler saw a whole one (a new leader keeps what it found meanwhile).
            held = max(n for _, n in self._recommended)
            if now - self.started < p.stable_window:
                held = max(held, ready)
            if held > wanted:
                wanted, reason = held, "Held"
        idle_for = now - (self.last_request if self.last_request is not None else self.started)
        if idle_for >= p.idle_seconds:
            # No request for idle_seconds (and none in flight): nothing is needed (min decides).
            wanted, reason = 0, "Idle"
            values = f"no request for {idle_for:.1f} s (idle_seconds {p.idle_seconds:g})"
            self.panic_since, self.max_panic = None, 0
        elif wanted < 1:
            # A request came within idle_seconds: keep (or wake) one instance.
            wanted, reason = 1, ("Woken" if ready == 0 else "Held")
        bounded = min(p.max, max(p.min, wanted))
        if bounded != wanted:
            reason = "Bounds"
            values += f"; {wanted} bounded to [{p.min}, {p.max}]"
        message = f"{ready} -> {bounded} instances ({reason}): {values}"
        return Decision(bounded, reason, message, stable, panic, self.panic_since is not None)
