"""The router's own metrics: invocations by function and status, and their latency.

Labelled children are cached per (namespace, function, status), so counting an invocation is
two dict lookups and two increments. Requests that name no existing function (400, 404) are
counted under empty labels: a caller cannot grow the series by inventing names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class InvocationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._invocations = Counter(
            "lambdabus_router_invocations",
            "invocations answered by the router, by function and HTTP status",
            ["namespace", "function", "status"],
            registry=registry,
        )
        self._duration = Histogram(
            "lambdabus_router_invocation_duration_seconds",
            "time from the request's arrival to the end of the relayed response",
            ["namespace", "function"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._retries = Counter(
            "lambdabus_router_connect_retries",
            "invocations sent to a second instance after the first refused the connection",
            registry=registry,
        )
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def observe(self, namespace: str, name: str, status: int, seconds: float) -> None:
        key = (namespace, name, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._invocations.labels(namespace, name, str(status))
        counter.inc()
        fkey = (namespace, name)
        histogram = self._histograms.get(fkey)
        if histogram is None:
            histogram = self._histograms[fkey] = self._duration.labels(namespace, name)
        histogram.observe(seconds)

    def retried(self) -> None:
        self._retries.inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop the series of a deleted function."""
        for key in [k for k in self._counters if k[:2] == (namespace, name)]:
            del self._counters[key]
            self._invocations.remove(namespace, name, str(key[2]))
        if self._histograms.pop((namespace, name), None) is not None:
            self._duration.remove(namespace, name)
