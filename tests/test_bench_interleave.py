"""The interleaved timer's logic (order, calibration, paired ratios) with a fake clock: no timings."""

from __future__ import annotations

import math

import pytest

from medcare_kernels.bench import interleave


class FakeClock:
    """A clock that each call of a candidate advances by that candidate's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _candidates(costs: dict[str, float], clock: FakeClock, log: list[str]):
    def make(name, cost):
        def fn():
            log.append(name)
            clock.now += cost
        return interleave.Candidate(name, fn)
    return [make(n, c) for n, c in costs.items()]


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_rounds_rotate_so_each_candidate_takes_every_position(n, rounds):
    clock, log = FakeClock(), []
    names = [f"m{i}" for i in range(n)]
    t = interleave.measure(_candidates({m: 1e-3 for m in names}, clock, log), rounds=rounds, warmup=2,
                           clock=clock)
    assert log[:2 * n] == [m for m in names for _ in range(2)]  # warm-up: each candidate, back to back
    assert t.order == [interleave.rotated(names, i) for i in range(rounds)]
    assert log[2 * n:] == [m for order in t.order for m in order]  # one call per sample (no min_sample_s)
    for i, order in enumerate(t.order):
        assert sorted(order) == names and order[0] == names[i % n]
    if rounds % n == 0:  # over whole cycles every candidate is first equally often
        firsts = [o[0] for o in t.order]
        assert all(firsts.count(m) == rounds // n for m in names)


def test_calls_per_sample_are_calibrated_and_times_are_per_call():
    clock, log = FakeClock(), []
    costs = {"fast": 1e-5, "slow": 3e-3}
    t = interleave.measure(_candidates(costs, clock, log), rounds=4, warmup=1, min_sample_s=1e-2, clock=clock)
    assert t.number == {"fast": 1000, "slow": math.ceil(1e-2 / 3e-3)}
    for name, cost in costs.items():
        assert t.samples[name] == pytest.approx([cost] * 4)
        assert t.median(name) == pytest.approx(cost)
        assert t.sample_s(name) == pytest.approx(cost * t.number[name])
    assert t.ratio("slow", "fast") == pytest.approx(300.0)
    assert t.spread("slow", "fast") == pytest.approx(0.0, abs=1e-12)
    assert log.count("fast") == 1 + 4 * 1000


def test_max_number_caps_the_calls_per_sample():
    clock, log = FakeClock(), []
    t = interleave.measure(_candidates({"a": 1e-9}, clock, log), rounds=1, warmup=1, min_sample_s=1.0,
                           max_number=7, clock=clock)
    assert t.number["a"] == 7


def test_ratio_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    # a load spike in round 2 hits both methods of that round: the paired ratio stays 2
    a = [2.0, 2.0, 20.0, 2.0, 2.2]
    b = [1.0, 1.0, 10.0, 1.0, 1.1]
    t = interleave.Timings({"a": a, "b": b}, {"a": 1, "b": 1})
    assert t.ratio("a", "b") == pytest.approx(2.0)
    assert interleave.paired_ratios(a, b) == pytest.approx([2.0] * 5)
    assert interleave.relative_iqr([1.0, 1.0, 1.0]) == 0.0
    assert interleave.relative_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError, match="one sample per round"):
        interleave.paired_ratios([1.0], [1.0, 2.0])


def test_context_is_entered_around_every_sample():
    clock, entered = FakeClock(), []

    class Ctx:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    c = interleave.Candidate("a", lambda: None, Ctx)
    interleave.measure([c], rounds=3, warmup=2, clock=clock)
    assert entered == ["in", "out"] * 4  # warm-up once, then each of the 3 samples


@pytest.mark.parametrize("kwargs, match", [({"rounds": 0}, "rounds"), ({"rounds": 1, "warmup": 0}, "warmup")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interleave.measure([interleave.Candidate("a", lambda: None)], **kwargs)


def test_duplicate_names_are_rejected():
    c = interleave.Candidate("a", lambda: None)
    with pytest.raises(ValueError, match="unique"):
        interleave.measure([c, c], rounds=1)
