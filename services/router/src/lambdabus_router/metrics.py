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
        self._released = Counter(
            "lambdabus_router_held_released",
            "requests held for a function without an instance, released to one: `announced` "
            "(the deployer said where it would listen, and it accepted) or `state` (the "
            "deployments state named it)",
            ["by"],
            registry=registry,
        )
        self._released_announced = self._released.labels("announced")
        self._released_state = self._released.labels("state")
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

    def released(self, *, announced: bool) -> None:
        (self._released_announced if announced else self._released_state).inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop the series of a deleted function."""
        for key in [k for k in self._counters if k[:2] == (namespace, name)]:
            del self._counters[key]
            self._invocations.remove(namespace, name, str(key[2]))
        if self._histograms.pop((namespace, name), None) is not None:
            self._duration.remove(namespace, name)


class DeliveryMetrics:
    """Event deliveries by trigger and outcome, attempts, dead letters and latency (from the
    time the event was stored to the 2xx answer), replies, and asynchronous invocations.

    Children are cached per label values like `InvocationMetrics`; a deleted trigger's series
    are dropped with `forget`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._deliveries = Counter(
            "lambdabus_router_deliveries",
            "messages of trigger consumers handled, by outcome: delivered, retried, "
            "deadlettered, skipped (filter did not match), waiting (no ready instance)",
            ["namespace", "trigger", "outcome"],
            registry=registry,
        )
        self._attempts = Counter(
            "lambdabus_router_delivery_attempts",
            "delivery attempts, by the function's HTTP status or the error that kept one back",
            ["namespace", "trigger", "result"],
            registry=registry,
        )
        self._dead_letters = Counter(
            "lambdabus_router_dead_letters",
            "events given up on and put in the DLQ stream, by reason",
            ["namespace", "trigger", "reason"],
            registry=registry,
        )
        self._latency = Histogram(
            "lambdabus_router_delivery_latency_seconds",
            "from the event's storing in EVENTS to its delivery (a 2xx answer)",
            ["namespace", "trigger"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._replies = Counter(
            "lambdabus_router_replies",
            "CloudEvents found in functions' answers: published, invalid, or failed to publish",
            ["outcome"],
            registry=registry,
        )
        self._async = Counter(
            "lambdabus_router_async_invocations",
            "asynchronous invocations by outcome: succeeded, failed, retried, waiting",
            ["namespace", "function", "outcome"],
            registry=registry,
        )
        self._callbacks = Counter(
            "lambdabus_router_callbacks",
            "result callbacks of asynchronous invocations: delivered or failed",
            ["outcome"],
            registry=registry,
        )
        self._per_trigger = (self._deliveries, self._attempts, self._dead_letters)
        self._counters: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self._latencies: dict[tuple[str, str], Histogram] = {}

    def _inc(self, metric: Counter, *labels: str) -> None:
        key = (id(metric), labels)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metric.labels(*labels)
        child.inc()

    def delivery(self, namespace: str, trigger: str, outcome: str) -> None:
        self._inc(self._deliveries, namespace, trigger, outcome)

    def attempt(self, namespace: str, trigger: str, result: str) -> None:
        self._inc(self._attempts, namespace, trigger, result)

    def dead_letter(self, namespace: str, trigger: str, reason: str) -> None:
        self._inc(self._dead_letters, namespace, trigger, reason)

    def delivered_after(self, namespace: str, trigger: str, seconds: float) -> None:
        child = self._latencies.get((namespace, trigger))
        if child is None:
            child = self._latencies[(namespace, trigger)] = self._latency.labels(namespace, trigger)
        child.observe(seconds)

    def reply(self, outcome: str) -> None:
        self._inc(self._replies, outcome)

    def invocation(self, namespace: str, function: str, outcome: str) -> None:
        self._inc(self._async, namespace, function, outcome)

    def callback(self, outcome: str) -> None:
        self._inc(self._callbacks, outcome)

    def forget(self, namespace: str, trigger: str) -> None:
        """Drop the series of a deleted trigger."""
        for metric in self._per_trigger:
            for key in [k for k in self._counters if k[0] == id(metric)]:
                labels = key[1]
                if labels[:2] == (namespace, trigger):
                    del self._counters[key]
                    metric.remove(*labels)
        if self._latencies.pop((namespace, trigger), None) is not None:
            self._latency.remove(namespace, trigger)
