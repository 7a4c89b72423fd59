"""The builder's Prometheus metrics, registered on the service's registry (`GET /metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("succeeded", "failed", "stale")


@dataclass(frozen=True)
class BuildMetrics:
    builds: Counter  # by outcome: succeeded, failed, stale (dropped: the function moved on)
    failures: Counter  # by reason
    duration: Histogram  # seconds from start (a free slot) to the result, by outcome
    dependency_cache: Counter  # by result: hit, miss
    queued: Gauge  # builds waiting for a slot
    running: Gauge  # builds holding a slot
    takeovers: Counter  # builds taken over from a replica whose claim ran out
    reused: Counter  # builds answered by the artifact of an earlier build of the same inputs

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BuildMetrics:
        metrics = cls(
            builds=Counter("lambdabus_builds", "finished builds", ["outcome"], registry=registry),
            failures=Counter(
                "lambdabus_build_failures", "failed builds", ["reason"], registry=registry
            ),
            duration=Histogram(
                "lambdabus_build_duration_seconds",
                "build duration, queue wait excluded",
                ["outcome"],
                registry=registry,
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            ),
            dependency_cache=Counter(
                "lambdabus_build_dependency_cache",
                "dependency environments found (hit) or made (miss)",
                ["result"],
                registry=registry,
            ),
            queued=Gauge("lambdabus_builds_queued", "builds waiting for a slot", registry=registry),
            running=Gauge("lambdabus_builds_running", "builds in progress", registry=registry),
            takeovers=Counter(
                "lambdabus_build_takeovers",
                "builds taken over from a replica whose claim ran out",
                registry=registry,
            ),
            reused=Counter(
                "lambdabus_builds_reused",
                "builds answered by the artifact of an earlier build of the same inputs",
                registry=registry,
            ),
        )
        for outcome in OUTCOMES:  # every series shows from the start, at 0
            metrics.builds.labels(outcome)
        for result in ("hit", "miss"):
            metrics.dependency_cache.labels(result)
        return metrics
