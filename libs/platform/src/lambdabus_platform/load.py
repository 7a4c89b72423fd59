"""Load samples for the autoscaler: each router writes, per function, the requests it had in
flight (averaged over its sampling period) and the requests it took, to the `function-load`
KV bucket under `<ns>.<fn>.<router id>`; the deployer leader adds them up across routers.

`LoadSample` is the value; `LoadWindow` (pure) is a router's accumulator, `LoadReader` (pure
but for the entries it is given) the deployer's sum over the routers' newest samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

FunctionId = tuple[str, str]


class LoadSample(BaseModel):
    """One router's load of one function over one period."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    concurrency: float = Field(ge=0, description="requests in flight, averaged over the period")
    requests: int = Field(ge=0, description="requests that arrived in the period")
    at: float = Field(description="the end of the period (the router's wall clock, seconds)")
    period: float = Field(gt=0, description="seconds")
    revisions: dict[str, float] = Field(
        default_factory=dict,
        description="requests in flight per revision (`<name>-00001`), averaged over the period",
    )


@dataclass
class LoadWindow:
    """A router's accumulator: in-flight counts sampled often, arrivals counted on the request
    path (one dict increment), both emptied into samples once a period."""

    _sum: defaultdict[FunctionId, float] = field(default_factory=lambda: defaultdict(float))
    _arrived: defaultdict[FunctionId, int] = field(default_factory=lambda: defaultdict(int))
    _by_revision: defaultdict[tuple[FunctionId, str], float] = field(
        default_factory=lambda: defaultdict(float)
    )
    _ticks: int = 0
    _busy: set[FunctionId] = field(default_factory=set)  # non-zero in the last period

    def arrived(self, fid: FunctionId) -> None:
        self._arrived[fid] += 1

    def sample(
        self,
        in_flight: Iterable[tuple[FunctionId, int]],
        by_revision: Iterable[tuple[tuple[FunctionId, str], int]] = (),
    ) -> None:
        """Record the in-flight counts now (called every sampling interval): per function, and
        per (function, revision) of the requests sent to a revision's instance."""
        self._ticks += 1
        for fid, n in in_flight:
            if n:
                self._sum[fid] += n
        for key, n in by_revision:
            if n and key[1]:
                self._by_revision[key] += n

    def take(self, at: float, period: float) -> dict[FunctionId, LoadSample]:
        """The samples of the period just ended: every function with load in it, and those
        that had load in the one before (one zero, so the reader sees the load stop)."""
        ticks = max(self._ticks, 1)
        busy = set(self._sum) | set(self._arrived)
        revisions: defaultdict[FunctionId, dict[str, float]] = defaultdict(dict)
        for (fid, revision), total in self._by_revision.items():
            revisions[fid][revision] = total / ticks
        samples = {
            fid: LoadSample(
                concurrency=self._sum.get(fid, 0.0) / ticks,
                requests=self._arrived.get(fid, 0),
                at=at,
                period=period,
                revisions=revisions.get(fid, {}),
            )
            for fid in busy | self._busy
        }
        self._busy = busy
        self._sum.clear()
        self._arrived.clear()
        self._by_revision.clear()
        self._ticks = 0
        return samples


@dataclass
class LoadReader:
    """The deployer's view: the newest sample of every router, per function. A sample counts
    its concurrency while it is fresh, and its requests once."""

    max_age: float
    _seen: dict[str, float] = field(default_factory=dict)  # key → `at` of the sample counted

    def read(
        self, entries: Iterable[tuple[str, bytes]], now: float
    ) -> dict[FunctionId, tuple[float, int]]:
        """(concurrency, new requests) per function, summed over the routers."""
        out: dict[FunctionId, tuple[float, int]] = {}
        seen: dict[str, float] = {}
        for key, value in entries:
            parts = key.split(".")
            if len(parts) != 3 or not value:
                continue
            try:
                sample = LoadSample.model_validate_json(value)
            except ValueError:
                continue
            fid = (parts[0], parts[1])
            seen[key] = sample.at
            fresh = now - sample.at <= self.max_age
            new = self._seen.get(key) != sample.at
            concurrency, requests = out.get(fid, (0.0, 0))
            out[fid] = (
                concurrency + (sample.concurrency if fresh else 0.0),
                requests + (sample.requests if new and fresh else 0),
            )
        self._seen = seen
        return out
