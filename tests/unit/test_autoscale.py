"""The autoscaler's pure decision (Knative's KPA): windows, panic, bounds, idle and wake."""

from __future__ import annotations

from lambdabus_deployer.autoscale import Autoscaler, Decision, ScalePolicy


def scaler(**policy: float) -> Autoscaler:
    values: dict[str, float] = {"min": 0, "max": 20, "target": 10, "idle_seconds": 60}
    values.update(policy)
    return Autoscaler(
        ScalePolicy(
            min=int(values.pop("min")),
            max=int(values.pop("max")),
            **values,
        ),
        started=0.0,
    )


def run(
    a: Autoscaler, start: float, end: float, concurrency: float, ready: int, *, follow: bool = True
) -> tuple[int, Decision]:
    """Tick once a second from `start` to `end` (exclusive) with a steady load; the instances
    follow the decisions at once when `follow`. The instances ready at the end, and the last
    decision."""
    t = start
    decision = None
    while t < end:
        a.observe(t, concurrency, int(concurrency > 0))
        decision = a.decide(t, ready)
        if follow:
            ready = decision.desired
        t += 1.0
    assert decision is not None
    return ready, decision


def test_a_steady_load_gets_ceil_of_load_over_target() -> None:
    a = scaler()
    ready, decision = run(a, 0, 120, 35.0, 4)
    assert (ready, decision.reason) == (4, "Stable")
    assert decision.stable == 35.0


def test_a_steady_load_grows_gradually_below_the_panic_threshold() -> None:
    a = scaler()
    # 15 in flight over 1 instance of target 10: panic wants 2 = 2x1 → panic; 3 does not reach 2x2.
    ready, _ = run(a, 0, 3, 15.0, 1)
    assert ready == 2


def test_demand_past_twice_the_capacity_panics_within_the_panic_window() -> None:
    a = scaler(max=50)
    run(a, 0, 60, 10.0, 1)  # one instance at its target for a minute
    # 200 in flight: the 6 s average passes 2x capacity on the first tick.
    a.observe(60, 200.0, 50)
    decision = a.decide(60, 1)
    assert decision.panicking
    assert decision.reason == "Panic"
    # The panic average over 6 s (5 quiet-ish samples and one at 200) already asks for more
    # than the stable one would (a 60 s average barely moved).
    assert decision.desired > 2
    ready, decision = run(a, 61, 67, 200.0, decision.desired)
    assert ready == 20  # ceil(200 / 10) once the panic window is full of it
    assert decision.panicking


def test_panic_never_scales_down_and_ends_after_a_stable_window_below_the_threshold() -> None:
    a = scaler(max=50)
    ready, _ = run(a, 0, 10, 200.0, 1)
    assert ready == 20
    # The threshold was last passed at t=0 (200 in flight over 1 instance). Load drops to 20 in
    # flight: the panic count (2) is far below 20, yet panic holds 20...
    ready, decision = run(a, 10, 60, 20.0, ready)
    assert (ready, decision.reason) == (20, "Panic")
    # ...until a whole stable window passed since the threshold was last passed.
    ready, decision = run(a, 60, 61, 20.0, ready)
    assert not decision.panicking
    # The recommendations of the last window still hold the burst: scale-down waits for it.
    assert ready == 20
    ready, decision = run(a, 61, 200, 20.0, ready)
    assert (ready, decision.reason) == (2, "Stable")


def test_a_scale_down_takes_effect_only_after_it_held_for_a_stable_window() -> None:
    a = scaler()
    ready, _ = run(a, 0, 120, 40.0, 4)
    assert ready == 4
    # The load halves at t=120; the stable average decays over the next 60 s, and the lower
    # count must then hold for another window of recommendations.
    seen: list[tuple[float, int]] = []
    for t in range(120, 300):
        a.observe(t, 20.0, 20)
        decision = a.decide(t, ready)
        if decision.desired != ready:
            seen.append((t, decision.desired))
        ready = decision.desired
    assert ready == 2
    first_down = seen[0][0]
    assert first_down >= 120 + 60  # not before a whole stable window after the drop
    assert all(n < 4 for _, n in seen)  # never up meanwhile


def test_a_short_lull_keeps_the_instances() -> None:
    a = scaler()
    ready, _ = run(a, 0, 120, 40.0, 4)
    ready, decision = run(a, 120, 150, 5.0, ready)  # 30 s lull, under the stable window
    assert (ready, decision.reason) == (4, "Held")
    ready, _ = run(a, 150, 200, 40.0, ready)
    assert ready == 4


def test_never_above_max_nor_below_min() -> None:
    a = scaler(min=2, max=3)
    ready, decision = run(a, 0, 30, 500.0, 2)
    assert (ready, decision.reason) == (3, "Bounds")
    b = scaler(min=2, max=3)
    ready, decision = run(b, 0, 300, 0.0, 3)
    assert (ready, decision.reason) == (2, "Bounds")


def test_min_zero_scales_to_zero_after_idle_seconds_without_requests() -> None:
    a = scaler(idle_seconds=3)
    ready, _ = run(a, 0, 10, 40.0, 1)
    assert ready == 4
    # The load stops at t=10: the stable average still remembers it, yet after 3 s without a
    # request (last one at t=9) nothing is needed.
    decisions = []
    for t in range(10, 16):
        a.observe(t, 0.0, 0)
        decisions.append(a.decide(t, ready))
        ready = decisions[-1].desired
    assert [d.desired for d in decisions][:2] == [4, 4]
    zero = next(t for t, d in zip(range(10, 16), decisions, strict=True) if d.desired == 0)
    assert zero == 12  # 3 s after the last request at t=9
    assert decisions[2].reason == "Idle"
    assert "no request for 3.0 s" in decisions[2].message


def test_a_request_in_flight_is_not_idle() -> None:
    a = scaler(idle_seconds=3)
    ready, _ = run(a, 0, 30, 0.5, 1)  # one long request in flight half the time, no new ones
    assert ready == 1


def test_a_request_at_zero_wakes_one_instance() -> None:
    a = scaler(idle_seconds=3)
    ready, _ = run(a, 0, 10, 0.0, 1)
    assert ready == 0
    a.observe(10, 0.0, 1)  # a request counted while nothing runs (held by the router)
    decision = a.decide(10, 0)
    assert (decision.desired, decision.reason) == (1, "Woken")


def test_a_function_never_called_scales_to_zero_after_idle_seconds_from_its_start() -> None:
    a = scaler(idle_seconds=5)
    a.observe(4, 0.0, 0)
    assert a.decide(4, 1).desired == 1
    a.observe(5, 0.0, 0)
    assert a.decide(5, 1).desired == 0
    b = scaler(idle_seconds=5, min=1)
    b.observe(5, 0.0, 0)
    assert b.decide(5, 1).desired == 1


def test_a_fractional_target_scales_on_the_same_rule() -> None:
    a = scaler(target=2)
    ready, _ = run(a, 0, 120, 7.0, 4)
    assert ready == 4  # ceil(7 / 2)


def test_the_message_says_what_led_to_the_decision() -> None:
    a = scaler(max=5)
    _, decision = run(a, 0, 10, 300.0, 1)
    assert "-> 5 instances (Bounds)" in decision.message
    assert "bounded to [0, 5]" in decision.message


def test_a_new_autoscaler_keeps_what_it_found_for_a_stable_window_unless_idle() -> None:
    a = scaler(idle_seconds=600)  # a new leader, started at 0, finding 4 instances
    ready, decision = run(a, 0, 59, 5.0, 4)
    assert (ready, decision.reason) == (4, "Held")
    ready, _ = run(a, 59, 130, 5.0, ready)
    assert ready == 1  # ceil(5 / 10), once it saw a whole window
    b = scaler(idle_seconds=3)
    ready, decision = run(b, 0, 5, 0.0, 4)
    assert (ready, decision.reason) == (0, "Idle")
