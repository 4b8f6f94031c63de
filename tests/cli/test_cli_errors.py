"""The dispatcher and the commands' argument errors, in-process (no training): clear one-line messages that
name the argument, file line or adapter, exit status 1 (argparse usage errors: 2)."""

from __future__ import annotations

import json

import pytest

from medcare import MedCareConfig, apply_stage1, save_adapter
from medcare.cli import main
from medcare.cli._common import CLIError, write_dir_atomically
from medcare.cli.train import MedCareArguments, build_config
from tests.cli.conftest import write_jsonl


def _error(capsys, argv):
    status = main(argv)
    err = capsys.readouterr().err
    return status, err


def test_usage_help_version_and_unknown_commands(capsys):
    assert main([]) == 2
    assert "usage: medcare <command>" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "merge", "bench", "info", "demo"):
        assert f"  {cmd}" in out
    assert main(["--version"]) == 0
    assert "medcare-kernels" in capsys.readouterr().out
    status, err = _error(capsys, ["fly"])
    assert status == 2 and "unknown command 'fly'" in err


def test_paper_defaults_and_stage2_inherits_the_stage1_shapes():
    cfg = build_config(MedCareArguments())
    assert (cfg.r, cfg.alpha, cfg.num_experts, cfg.top_k, cfg.num_shared, cfg.orth_lambda) == (16, 32.0, 8, 2, 2, 1.0)
    cfg = build_config(MedCareArguments(r=4, attn_targets="none", ffn_targets="gate_proj, up_proj", lora_dtype="none"))
    assert cfg.r == 4 and cfg.attn_targets == () and cfg.ffn_targets == ("gate_proj", "up_proj")
    assert cfg.lora_dtype is None
    stage1 = MedCareConfig(r=4, alpha=8, num_shared=3, orth_lambda=0.5).to_dict()
    cfg = build_config(MedCareArguments(orth_lambda=2.0, r=4), stage1, "s1")
    assert (cfg.r, cfg.alpha, cfg.num_shared, cfg.orth_lambda) == (4, 8.0, 3, 2.0)
    with pytest.raises(CLIError, match=r"--r 8 differs from the stage-1 adapter's r=4 \(s1\).*leave --r out"):
        build_config(MedCareArguments(r=8), stage1, "s1")
    with pytest.raises(CLIError, match="--ffn_targets gate_proj differs"):
        build_config(MedCareArguments(ffn_targets="gate_proj"), stage1, "s1")
    with pytest.raises(CLIError, match="invalid MedCare option: top_k must satisfy"):
        build_config(MedCareArguments(top_k=9))


@pytest.fixture
def data_file(tmp_path, demo_examples):
    from tests.cli.conftest import alpaca_records

    return write_jsonl(tmp_path / "data.jsonl", alpaca_records(demo_examples["stage1"], 8))


def test_train_argument_errors(capsys, tmp_path, tiny_model_dir, data_file):
    base = ["train", "--data", str(data_file), "--use_cpu"]
    status, err = _error(capsys, [*base, "--stage", "1", "--model", str(tiny_model_dir)])
    assert status == 1 and "--output_dir is required" in err
    out = ["--output_dir", str(tmp_path / "o")]
    status, err = _error(capsys, [*base, "--stage", "1", *out])
    assert status == 1 and "--model is required for --stage 1" in err
    status, err = _error(capsys, [*base, "--stage", "2", *out])
    assert status == 1 and "--stage 2 needs --from-stage1" in err
    status, err = _error(capsys, [*base, "--stage", "1", "--model", str(tiny_model_dir), "--from-stage1", "x", *out])
    assert status == 1 and "--from-stage1 is for --stage 2" in err
    status, err = _error(capsys, [*base, "--stage", "2", "--from-stage1", str(tmp_path / "nothing"), *out])
    assert status == 1 and "no adapter at" in err
    status, err = _error(capsys, [*base, "--stage", "1", "--model", str(tmp_path / "no-model"), *out])
    assert status == 1 and "cannot load a tokenizer from --model" in err
    status, err = _error(capsys, [*base, "--stage", "1", "--model", str(tiny_model_dir), *out, "--bogus", "1"])
    assert status == 1 and "not used by the HfArgumentParser: ['--bogus', '1']" in err
    status, err = _error(capsys, [*base, "--stage", "1", "--model", str(tiny_model_dir), *out, "--eval_strategy",
                                  "steps", "--r", "2", "--num_experts", "2"])
    assert status == 1 and "eval_dataset" in err
    with pytest.raises(SystemExit) as info:  # argparse: not a valid choice
        main([*base, "--stage", "3", *out])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_rejects_malformed_data_before_loading_the_model(capsys, tmp_path, tiny_model_dir, data_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text() + '{"conversations": [{"from": "human", "value": "Q"}]}\n')
    status, err = _error(capsys, ["train", "--stage", "1", "--model", str(tiny_model_dir), "--data", str(bad),
                                  "--output_dir", str(tmp_path / "o"), "--use_cpu"])
    assert status == 1
    assert err.strip() == f"medcare train: error: {bad}:9: \"conversations\" has no assistant turn (from " \
                          f"\"gpt\"/\"assistant\"): nothing to learn"


def test_stage2_from_a_stage1_adapter_with_other_shapes(capsys, tmp_path, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    model = apply_stage1(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MedCareConfig(r=4, num_experts=4))
    save_adapter(model, tmp_path / "s1")
    status, err = _error(capsys, ["train", "--stage", "2", "--from-stage1", str(tmp_path / "s1"), "--r", "8",
                                  "--data", str(data_file), "--output_dir", str(tmp_path / "o"), "--use_cpu"])
    assert status == 1 and "--r 8 differs from the stage-1 adapter's r=4" in err
    status, err = _error(capsys, ["merge", "--stage2", str(tmp_path / "s1"), "--output", str(tmp_path / "m")])
    assert status == 1 and "holds a stage-1 adapter" in err and "train stage 2 from it first" in err
    # a stage-1 adapter from a model that no longer exists: the recorded base path is named
    meta = json.loads((tmp_path / "s1" / "medcare_config.json").read_text())
    assert meta["stage"] == 1


def test_merge_argument_errors(capsys, tmp_path):
    status, err = _error(capsys, ["merge", "--stage2", str(tmp_path / "none"), "--output", str(tmp_path / "m")])
    assert status == 1 and "no adapter at" in err
    with pytest.raises(SystemExit):
        main(["merge", "--output", str(tmp_path / "m")])
    assert "--stage2" in capsys.readouterr().err


def test_demo_argument_errors(capsys, tmp_path):
    status, err = _error(capsys, ["demo", "--stage1-steps", "0", "--output", str(tmp_path / "d")])
    assert status == 1 and "--stage1-steps must be >= 1" in err


def test_directories_are_written_atomically(tmp_path):
    out = tmp_path / "out"

    def fail(d):
        (d / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_dir_atomically(out, fail)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_dir_atomically(out, lambda d: (d / "a").write_text("1"))
    with pytest.raises(CLIError, match="already exists"):
        write_dir_atomically(out, lambda d: None)
    with pytest.raises(RuntimeError):
        write_dir_atomically(out, fail, overwrite=True)
    assert (out / "a").read_text() == "1"  # the old directory survives a failed replacement
    write_dir_atomically(out, lambda d: (d / "b").write_text("2"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_options_from_a_json_file(tmp_path):
    from medcare.cli.train import parse_args

    path = tmp_path / "options.json"
    path.write_text(json.dumps({"stage": 2, "data": "d.jsonl", "from_stage1": "s1", "output_dir": str(tmp_path / "o"),
                                "r": 8, "bf16": False, "gradient_accumulation_steps": 4}))
    dargs, margs, targs = parse_args([str(path)])
    assert (dargs.stage, dargs.from_stage1, margs.r, margs.alpha) == (2, "s1", 8, None)
    assert targs.gradient_accumulation_steps == 4
    path.write_text(json.dumps({"stage": 1, "data": "d.jsonl"}))
    with pytest.raises(CLIError, match="--output_dir is required"):
        parse_args([str(path)])
    with pytest.raises(CLIError, match="options file .* does not exist"):
        parse_args([str(tmp_path / "none.yaml")])


def test_target_flags_take_suffixes_or_a_re_prefixed_regex():
    cfg = build_config(MedCareArguments(ffn_targets=r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj", attn_targets="none"))
    assert cfg.ffn_targets == r"model\.layers\.\d+\.mlp\.(gate|up)_proj" and cfg.attn_targets == ()
    cfg = build_config(MedCareArguments(ffn_targets="re:.*\\.dense{1,2}", attn_targets="q_proj, v_proj"))
    assert cfg.ffn_targets == ".*\\.dense{1,2}" and cfg.attn_targets == ("q_proj", "v_proj")  # no comma split
    with pytest.raises(CLIError, match="invalid MedCare option: ffn_targets is a string, i.e. a regular expression"):
        build_config(MedCareArguments(ffn_targets="re:mlp.(gate"))
    stage1 = MedCareConfig(ffn_targets=r"model\.layers\.\d+\.mlp\.up_proj").to_dict()
    with pytest.raises(CLIError, match=r"--ffn_targets gate_proj differs from the stage-1 adapter's "
                                       r"ffn_targets=re:model"):
        build_config(MedCareArguments(ffn_targets="gate_proj"), stage1, "s1")
    assert build_config(MedCareArguments(), stage1, "s1").ffn_targets == r"model\.layers\.\d+\.mlp\.up_proj"
