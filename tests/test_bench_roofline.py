"""The roofline model (launch plans as data): totals pinned to the analysis they came from, device lookup,
and the padded widths kept in step with the Triton backend's own layout."""

from __future__ import annotations

import importlib

import pytest

from medcare_kernels.bench import roofline as rl

H200 = rl.DEVICES["h200"]
UP, DOWN = (3584, 18944), (18944, 3584)


@pytest.mark.parametrize("shape", [UP, DOWN], ids=["up", "down"])
@pytest.mark.parametrize("T", [4096, 16384])
def test_floor_is_the_two_gemms_at_the_matmul_rate(shape, T):
    p = rl.Point(*shape, T)
    assert rl.predict_s("floor", p, H200) == pytest.approx(4 * T * shape[0] * shape[1] / H200.mm_flop_s)
    assert rl.predict_s("floor", p, H200, "fwd") == pytest.approx(rl.predict_s("floor", p, H200) / 2)


@pytest.mark.parametrize("shape, T, lora_us", [(UP, 16384, 821), (UP, 4096, 215), (DOWN, 16384, 835),
                                               (DOWN, 4096, 217)])
def test_the_measured_triton_plan_matches_the_launch_analysis(shape, T, lora_us):
    """Pinned to the H200 analysis of the dense cuBLAS-base path as last measured (LoRA launches
    814/207/829/211 us there; here also the rank-space weights' bytes, and the backward reduce only when it
    splits)."""
    p = rl.Point(*shape, T)
    ls = rl.launches("triton-dense-cublas-before", p, H200)
    extra = sum(L.seconds for L in ls if not L.floor)
    assert extra * 1e6 == pytest.approx(lora_us, rel=0.01)
    ratio = rl.predict_s("triton-dense-cublas-before", p, H200) / rl.predict_s("floor", p, H200)
    assert 1.12 < ratio < 1.14
    assert sum(L.floor for L in ls) == 2
    assert {L.phase for L in ls} == {"fwd", "bwd"}


@pytest.mark.parametrize("shape", [UP, DOWN], ids=["up", "down"])
@pytest.mark.parametrize("T", [4096, 16384])
def test_todays_triton_plan_drops_the_avoidable_passes(shape, T):
    """Today's launches (cuBLAS dA/dB, a token block that fills the SMs, dx's router term from dZ): no split-K
    reduce at prefill, LoRA time below the measured plan's, the ratio to the floor 1.10-1.11x on an H200.
    Update these bounds together with PLANS when the launches change."""
    p = rl.Point(*shape, T)
    names = [L.name for L in rl.launches("triton-dense-cublas", p, H200)]
    assert not any("split-K reduce" in n for n in names)
    now = rl.predict_s("triton-dense-cublas", p, H200) / rl.predict_s("floor", p, H200)
    before = rl.predict_s("triton-dense-cublas-before", p, H200) / rl.predict_s("floor", p, H200)
    assert 1.09 < now < 1.115 and now < before - 0.015
    assert rl.block_t(T, 132) * 132 <= T  # every SM gets a token block


def test_split_k_reduce_launches_appear_only_when_the_token_blocks_do_not_fill_the_sms():
    small = [L.name for L in rl.launches("triton-dense-cublas-before", rl.Point(*UP, 4096), H200)]
    assert "shrink fwd split-K reduce" in small and "shrink bwd split-K reduce" in small
    a100_big = [L.name for L in rl.launches("triton-dense-cublas-before", rl.Point(*UP, 16384), rl.DEVICES["a100"])]
    assert not any("split-K reduce" in n for n in a100_big)  # 128 token blocks >= 108 SMs: no split
    assert rl.split_k(tiles=132, k=10**6, sms=132) == 1
    assert rl.split_k(tiles=64, k=3584, sms=132) == 5


def test_padded_widths_of_the_default_config():
    p = rl.Point(*UP, 1)
    assert (p.W, p.WZ, p.WS, p.A_rows, p.lora_cols) == (160, 176, 176, 168, 64)
    lim = rl.flop_limits(p)
    assert lim["dense-masked"] == pytest.approx(1.080, abs=1e-3)
    assert lim["chosen experts"] == pytest.approx(1.032, abs=1e-3)


@pytest.mark.parametrize("E, r, r_s", [(8, 16, 32), (4, 8, 16), (6, 5, 0), (16, 4, 8), (3, 2, 5)])
def test_widths_match_the_triton_backends_layout(E, r, r_s):
    """The plan's copy of the padded rank-space widths against the Triton shrink's own Layout: when the
    kernels' layout changes, this fails until roofline.Point follows."""
    pytest.importorskip("triton")
    L = importlib.import_module("medcare_kernels.backends.triton.shrink").Layout(E, r, r_s, 2, True)
    p = rl.Point(64, 64, 1, E, r, 2, r_s)
    assert (p.E_R, p.R_PAD, p.W, p.EL, p.WZ, p.WS) == (L.E_R, L.R_PAD, L.W, L.EL, L.WZ, L.WS)


@pytest.mark.parametrize("name, key", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("h200", "h200"), ("Tesla T4", None),
                                       (None, None)])
def test_device_lookup_by_cuda_name(name, key):
    assert rl.device_for(name) is (rl.DEVICES[key] if key else None)


@pytest.mark.parametrize("method, T, plan", [("floor", 16, "floor"), ("triton[cublas-base]", 16, "triton-dense-cublas"),
                                             ("triton", 4096, "triton-dense-cublas"), ("triton", 16, None),
                                             ("torch", 4096, None), ("reference", 4096, None)])
def test_methods_map_to_plans(method, T, plan):
    assert rl.plan_for(method, T) == plan


def test_report_lists_every_device_point_and_launch():
    text = rl.report("h200")
    for dev in rl.DEVICES.values():
        assert dev.name in text
    for name, _, _ in rl.SHAPES:
        for T in rl.TOKENS:
            assert f"| {name} | {T} |" in text
    assert "FLOP limit 1.080x" in text and "as last measured" in text and "each operand read once" in text


def test_roofline_cli_prints_the_predictions_without_a_gpu(capsys):
    from medcare_kernels.bench.__main__ import main

    assert main(["--roofline"]) == 0
    assert "Launches of `triton-dense-cublas` on the NVIDIA H200" in capsys.readouterr().out
    assert main(["--roofline", "--roofline-device", "h100"]) == 0
    assert "on the NVIDIA H100 SXM" in capsys.readouterr().out


def test_python_m_benchmarks_entry_point_runs():
    """The README's ``python -m benchmarks ...`` commands go through benchmarks/__main__.py: run it once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--roofline", "--roofline-device", "a100"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "on the NVIDIA A100 SXM 80GB" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--roofline", "--roofline-device", "v100"], cwd=repo,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--roofline-device: unknown 'v100'" in bad.stderr


@pytest.mark.parametrize("T", [1, 16, 64, 1000, 4096, 8192, 16384, 40000])
@pytest.mark.parametrize("sms", [132, 108])
def test_block_t_matches_the_triton_shrink(T, sms, monkeypatch):
    """The plan's token-block rule is the Triton shrink launcher's (compiled mode, a GPU with ``sms`` SMs)."""
    pytest.importorskip("triton")
    shrink = importlib.import_module("medcare_kernels.backends.triton.shrink")
    common = importlib.import_module("medcare_kernels.backends.triton._common")
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(shrink, "num_sms", lambda device: sms)
    import torch
    assert shrink._block_t(T, torch.device("cuda")) == rl.block_t(T, sms)
