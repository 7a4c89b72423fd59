"""The routers' load samples (`lambdabus_platform.load`): a router's accumulator and the
deployer's sum over routers."""

from __future__ import annotations

from lambdabus_platform.load import LoadReader, LoadSample, LoadWindow

A = ("ns", "a")
B = ("ns", "b")


def test_a_period_averages_the_sampled_in_flight_counts_and_counts_arrivals() -> None:
    window = LoadWindow()
    for n in (4, 2, 0, 2):
        window.sample([(A, n), (B, 0)])
    window.arrived(A)
    window.arrived(A)
    samples = window.take(100.0, 1.0)
    assert samples == {A: LoadSample(concurrency=2.0, requests=2, at=100.0, period=1.0)}


def test_a_function_whose_load_stopped_gets_one_zero_sample_then_none() -> None:
    window = LoadWindow()
    window.sample([(A, 3)])
    assert window.take(1.0, 1.0)[A].concurrency == 3.0
    window.sample([(A, 0)])
    assert window.take(2.0, 1.0) == {A: LoadSample(concurrency=0.0, requests=0, at=2.0, period=1.0)}
    window.sample([(A, 0)])
    assert window.take(3.0, 1.0) == {}


def entry(key: str, concurrency: float, requests: int, at: float) -> tuple[str, bytes]:
    sample = LoadSample(concurrency=concurrency, requests=requests, at=at, period=1.0)
    return key, sample.model_dump_json().encode()


def test_the_reader_sums_fresh_samples_of_every_router_and_counts_requests_once() -> None:
    reader = LoadReader(max_age=5.0)
    entries = [entry("ns.a.r1", 2.0, 3, 100.0), entry("ns.a.r2", 1.5, 1, 99.0)]
    assert reader.read(entries, 100.5) == {A: (3.5, 4)}
    # The same samples read again: their concurrency still counts, their requests not twice.
    assert reader.read(entries, 101.0) == {A: (3.5, 0)}
    # r2 is gone (its last sample too old): only r1 counts.
    entries = [entry("ns.a.r1", 1.0, 2, 101.0), entry("ns.a.r2", 1.5, 1, 99.0)]
    assert reader.read(entries, 104.5) == {A: (1.0, 2)}


def test_the_reader_skips_what_is_not_a_sample() -> None:
    reader = LoadReader(max_age=5.0)
    entries = [
        ("ns.a", b"{}"),
        ("ns.a.r1", b"not json"),
        ("ns.a.r2", b""),
        entry("ns.b.r1", 1, 1, 1),
    ]
    assert reader.read(entries, 1.0) == {B: (1.0, 1)}


def test_in_flight_counts_per_revision_are_averaged_too_and_old_readers_still_read() -> None:
    window = LoadWindow()
    for v1, v2 in ((3, 1), (1, 1), (2, 0), (2, 0)):
        window.sample([(A, v1 + v2)], [((A, "a-00001"), v1), ((A, "a-00002"), v2), ((A, ""), 9)])
    sample = window.take(100.0, 1.0)[A]
    assert sample.concurrency == 2.5
    assert sample.revisions == {"a-00001": 2.0, "a-00002": 0.5}  # no name: not a revision
    # The deployer's reader reads the function's sum, with or without the per-revision part.
    reader = LoadReader(max_age=5.0)
    old = b'{"concurrency": 2.5, "requests": 0, "at": 100.0, "period": 1.0}'
    entries = [("ns.a.r1", sample.model_dump_json().encode()), ("ns.a.r2", old)]
    assert reader.read(entries, 100.5) == {A: (5.0, 0)}
    # The next period starts empty.
    window.sample([(A, 0)], [((A, "a-00001"), 0)])
    assert window.take(101.0, 1.0)[A].revisions == {}
