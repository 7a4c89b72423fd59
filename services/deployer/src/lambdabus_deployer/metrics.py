"""The deployer's own Prometheus metrics, registered beside the service shell's."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class DeployerMetrics:
    instances_running: Gauge
    restarts: Counter
    oom_kills: Counter
    leader: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> DeployerMetrics:
        registry = registry or CollectorRegistry()
        return cls(
            instances_running=Gauge(
                "lambdabus_deployer_instances_running",
                "instance processes running now",
                registry=registry,
            ),
            restarts=Counter(
                "lambdabus_deployer_instance_restarts",
                "instances restarted after they exited or failed their health check",
                registry=registry,
            ),
            oom_kills=Counter(
                "lambdabus_deployer_instance_oom_kills",
                "instances killed because they used more than their memory limit",
                registry=registry,
            ),
            leader=Gauge(
                "lambdabus_deployer_leader",
                "1 while this deployer replica leads (holds the lease and acts), else 0",
                registry=registry,
            ),
        )
