"""``medcare bench --quick`` prints numbers that say what they mean: how they were timed, and a flag on
every row whose numbers are not a statement about speed (checked on the run's own rows, not on timings)."""

from __future__ import annotations

import json

import torch

from medcare_kernels.bench import runner


def test_medcare_bench_quick_says_how_it_timed_and_flags_what_it_must(tmp_path, capsys):
    from medcare.cli.bench import main

    out = tmp_path / "quick.json"
    threads = torch.get_num_threads()
    assert main(["--quick", "--no-progress", "--rounds", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NOTE: ratios are medians of per-round ratios, measured interleaved" in text
    rows = [runner.Row(**r) for r in json.loads(out.read_text())["rows"]]
    assert {r.method for r in rows} >= {"floor", "reference", "torch"}
    assert not any(r.method.startswith("triton") for r in rows)  # never the interpreter, unless named
    for r in rows:
        if r.fwd_bwd_ms < r.fwd_ms:
            assert any(f.startswith("fwd+bwd < fwd") for f in r.flags), r
        floor = next(f for f in rows if f.method == "floor" and f.tokens == r.tokens)
        assert any(f.startswith("host-bound") for f in r.flags) == (floor.fwd_ms < 0.05), r
    flagged = [r for r in rows if r.flags]
    if flagged:
        assert "flags |" in text.splitlines()[[i for i, line in enumerate(text.splitlines())
                                                if line.startswith("| shape |")][0]]
    # one host-bound decode point (T=1) and one where the arithmetic shows
    assert {r.tokens for r in rows} == {1, 256}
    assert torch.get_num_threads() == threads  # --quick's 1 thread does not leak into the caller
