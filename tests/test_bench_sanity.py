"""The layer table's row checks and caveats (medcare bench --quick), and which methods it times: no timings."""

from __future__ import annotations

import pytest
import torch

from medcare_kernels.bench import runner, sanity


def _row(method="torch", fwd=1.0, both=2.0, flags=(), shape="s", tokens=1):
    return runner.Row(shape, 8, 8, tokens, method, fwd, both, 1.0, 1.0, 0.0, 0.0, 0.0, list(flags))


@pytest.mark.parametrize("fwd, both, flagged", [(1.0, 2.0, False), (2.0, 2.0, False), (2.0, 1.9, True)])
def test_fwd_bwd_faster_than_fwd_is_flagged(fwd, both, flagged):
    flags = sanity.row_flags(fwd_s=fwd, fwd_bwd_s=both)
    assert any(f.startswith("fwd+bwd < fwd") for f in flags) == flagged
    assert sanity.is_meaningful(flags) == (not flagged)


@pytest.mark.parametrize("sample_s, resolution_s, flagged", [(1e-3, 1e-6, False), (5e-5, 1e-6, True),
                                                             (1e-4, 1e-6, False), (1e-4, 2e-6, True)])
def test_a_floor_sample_near_the_timer_resolution_is_flagged(sample_s, resolution_s, flagged):
    flags = sanity.row_flags(fwd_s=1.0, fwd_bwd_s=2.0, floor_sample_s=sample_s, resolution_s=resolution_s)
    assert any(f.startswith("floor sample") for f in flags) == flagged
    assert sanity.is_meaningful(flags) == (not flagged)


@pytest.mark.parametrize("floor_call_s, flagged", [(5e-6, True), (49e-6, True), (51e-6, False), (1e-2, False)])
def test_host_bound_points_are_flagged_but_still_meaningful(floor_call_s, flagged):
    flags = sanity.row_flags(fwd_s=1.0, fwd_bwd_s=2.0, floor_call_s=floor_call_s)
    assert any(f.startswith("host-bound") for f in flags) == flagged
    assert sanity.is_meaningful(flags)


@pytest.mark.parametrize("spread, flagged", [(0.0, False), (0.2, False), (0.21, True), (3.0, True)])
def test_noisy_ratios_are_flagged(spread, flagged):
    assert any(f.startswith("noisy") for f in sanity.row_flags(fwd_s=1, fwd_bwd_s=2, spread=spread)) == flagged


def test_the_interpreter_is_never_a_speed():
    flags = sanity.row_flags(fwd_s=1.0, fwd_bwd_s=2.0, interpreted=True)
    assert flags[0].startswith("Triton interpreter") and not sanity.is_meaningful(flags)


def test_timer_resolution_is_positive_and_counts_the_clock_cost():
    ticks = iter(range(0, 10**6, 3))
    assert sanity.timer_resolution(lambda: next(ticks) * 1e-6, reads=5) == pytest.approx(3e-6)
    assert sanity.timer_resolution() > 0


def test_caveats_say_the_table_is_interleaved_and_name_the_rows_that_mean_nothing():
    rows = [_row("floor", flags=["host-bound: floor 7.0 us/call, ratios are per-call overhead"]),
            _row("torch", 3.0, 2.0, flags=sanity.row_flags(fwd_s=3.0, fwd_bwd_s=2.0, spread=0.5)),
            _row("reference", tokens=256)]
    notes = runner.caveats(rows)
    assert "interleaved" in notes[0]
    assert any("1 of 3 rows are NOT a statement about speed" in n and "s T=1 torch" in n for n in notes)
    assert any(n.startswith("host-bound points") and "s T=1" in n for n in notes)
    assert any("moved more than 20%" in n for n in notes)
    assert runner.caveats([_row("floor"), _row()]) == notes[:1]


def test_table_shows_flags_and_roofline_columns_only_when_present():
    plain = runner.table([_row()])
    assert "flags" not in plain and "roofline" not in plain
    r = _row(flags=["noisy: ratio IQR 30% of its median"])
    r.roofline_ms = 0.5
    t = runner.table([r, _row("floor")])
    head, sep, first, second = t.splitlines()
    assert head.count("|") == sep.count("|") == first.count("|") == second.count("|")
    assert "| 0.500 | 4.00 | noisy" in first and "| - | - | - |" in second
    assert "(not a speed" in " ".join(runner.targets([_row("reference"), _row("triton", 3.0, 2.0,
                                                                              ["fwd+bwd < fwd: noise"])]))


def test_triton_under_the_cpu_interpreter_is_timed_only_when_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    names = [m.name for m in runner.select("cpu")]
    assert names[0] == "floor" and "torch" in names and not any(n.startswith("triton") for n in names)
    assert [m.name for m in runner.select("cpu", only=("triton",))] == ["floor", "triton"]
    assert runner.interpreted(runner.select("cpu", only=("triton",))[1], "cpu")


def test_quick_run_rows_carry_flags_and_say_how_they_were_timed():
    """A real (tiny) quick run: the rows come out interleaved with flags computed; T=1 is host-bound."""
    shapes, _ = runner.quick_config()
    rows = runner.run("cpu", torch.float32, shapes, (1,), progress=False, only=("torch",),
                      timing=runner.Timing(rounds=2, warmup=1, min_sample_s=0.0))
    assert [r.method for r in rows] == ["floor", "torch"]
    assert rows[0].ratio_fwd == rows[0].ratio_fwd_bwd == 1.0
    assert all(r.roofline_ms is None for r in rows)  # no roofline on the CPU unless a GPU is named
    assert all(isinstance(r.flags, list) for r in rows)
    named = runner.run("cpu", torch.float32, shapes, (1,), progress=False, only=("torch",),
                       timing=runner.Timing(rounds=1, warmup=1), roofline_device="h200")
    assert named[0].roofline_ms > 0 and named[1].roofline_ms is None  # floor has a plan, torch none
