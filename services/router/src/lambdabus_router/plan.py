"""What to do after one delivery attempt: the delivery plan. Pure, no I/O.

`next_action` turns the outcome of an attempt (an HTTP status, or the kind of error that kept
one from coming back) and the number of attempts made so far into one of three actions:

- `Ack`: a 2xx answer; the delivery is done.
- `Retry(delay)`: a 5xx, a 429, a timeout or a failed connection while retries remain; the
  next attempt comes after the back-off (or after the answer's `Retry-After`, when it has one).
- `DeadLetter(reason)`: any other answer (a 4xx but 429, a 3xx), or retries spent.

`attempts` counts the attempt just made: with `retries: R`, attempts 1..R are retried and
attempt 1+R is the last.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from lambdabus_events.models import DeliveryPolicy

ErrorKind = Literal["timeout", "connection_refused", "connection_error", "invalid_request"]
Outcome = int | ErrorKind

DEFAULT_MAX_DELAY: Final = 3600.0


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    message: str


Action = Ack | Retry | DeadLetter

ACK: Final = Ack()


def reason_of(outcome: Outcome) -> str:
    """The reason a failed outcome is recorded under: `http_status_<n>` or the error kind."""
    return f"http_status_{outcome}" if isinstance(outcome, int) else outcome


def is_retryable(outcome: Outcome) -> bool:
    """5xx, 429 and every error that kept an answer from coming back, but a request that
    cannot be sent at all."""
    if isinstance(outcome, int):
        return outcome >= 500 or outcome == 429
    return outcome != "invalid_request"


def backoff(policy: DeliveryPolicy, attempts: int, max_delay: float = DEFAULT_MAX_DELAY) -> float:
    """Seconds before the attempt after attempt number `attempts` (1 for the first retry):
    `backoff_delay` times 2^(attempts-1) (exponential) or times `attempts` (linear), at most
    `max_delay`."""
    n = max(1, attempts)
    if policy.backoff == "linear":
        delay = policy.backoff_delay * n
    else:
        delay = policy.backoff_delay * 2.0 ** min(n - 1, 64)
    return min(delay, max_delay)


def next_action(
    outcome: Outcome,
    attempts: int,
    policy: DeliveryPolicy,
    retry_after: float | None = None,
    *,
    max_delay: float = DEFAULT_MAX_DELAY,
) -> Action:
    """The action after attempt number `attempts` ended with `outcome`; `retry_after` is the
    delay the answer asked for (see `parse_retry_after`), honoured instead of the back-off."""
    if isinstance(outcome, int) and 200 <= outcome < 300:
        return ACK
    reason = reason_of(outcome)
    if not is_retryable(outcome):
        return DeadLetter(reason, f"{_describe(outcome)}; not retried")
    if attempts > policy.retries:
        noun = "attempt" if attempts == 1 else "attempts"
        return DeadLetter(reason, f"{_describe(outcome)}; gave up after {attempts} {noun}")
    if retry_after is not None:
        return Retry(min(max(retry_after, 0.0), max_delay), reason)
    return Retry(backoff(policy, attempts, max_delay), reason)


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, int):
        return f"the function answered {outcome}"
    return {
        "timeout": "the function did not answer in time",
        "connection_refused": "the function's instance refused the connection",
        "connection_error": "the connection to the function's instance broke",
        "invalid_request": "the request cannot be sent over HTTP",
    }[outcome]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """A `Retry-After` header as seconds from `now`: delay-seconds, or an HTTP date (a date in
    the past is 0). None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
