"""Runs that must not lose work, and user errors that must be one line: ``--output_dir`` checked before the
model loads, reused output directories, resuming from the newest *complete* checkpoint after a real SIGKILL
mid-save, file permissions from the umask, leftovers of interrupted saves, a full disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from medcare.cli import main
from tests.cli.conftest import REPO, alpaca_records, check, run_cli, write_jsonl

TRAIN = ["--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
         "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "true",
         "--r", "2", "--num_experts", "2", "--dropout", "0"]


@pytest.fixture
def data_file(tmp_path, demo_examples):
    return write_jsonl(tmp_path / "data.jsonl", alpaca_records(demo_examples["stage1"], 8))


def _stage1(tiny_model_dir, data_file, out, *extra):
    return ["train", "--stage", "1", "--model", str(tiny_model_dir), "--data", str(data_file), "--output_dir",
            str(out), *TRAIN, *extra]


def _one_line_error(capsys, argv, command="train"):
    """Runs ``medcare ARGV`` in this process; returns the single ``error:`` line (and asserts there is one)."""
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 1, captured.err[-3000:]
    lines = [ln for ln in captured.err.splitlines() if ln.startswith(f"medcare {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    return lines[0], captured.out


@contextlib.contextmanager
def _read_only(path):
    """``path`` (a directory) made unwritable, for root too (chattr +i), else by its mode."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a directory read-only for root here (chattr +i failed)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("case", ["file", "under-a-file", "read-only"])
def test_bad_output_dir_is_one_line_before_anything_loads(capsys, tmp_path, tiny_model_dir, data_file, case):
    (tmp_path / "a-file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = {"file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "run",
           "read-only": ro / "run"}[case]
    with _read_only(ro) if case == "read-only" else contextlib.nullcontext():
        line, stdout = _one_line_error(capsys, _stage1(tiny_model_dir, data_file, out))
    assert f"--output_dir {str(out)!r}" in line
    assert {"file": "is a file, not a directory", "under-a-file": "which is a file, not a directory",
            "read-only": "is not writable"}[case] in line
    assert "[medcare]" not in stdout  # not even the data was read: the model never loaded
    assert not (ro / "run").exists()


def test_user_errors_name_the_flag_in_one_line(capsys, tmp_path, tiny_model_dir, data_file):
    import medcare_kernels as mk

    out = tmp_path / "o"
    line, _ = _one_line_error(capsys, _stage1(tiny_model_dir, data_file, out, "--ffn_targets", "w1,mlp.up_proj",
                                              "--attn_targets", "query"))
    assert "--ffn_targets: ['w1'] match no nn.Linear" in line and "--attn_targets: ['query']" in line
    assert "MedCareConfig" not in line
    if "cuda" not in mk.available_backends():
        line, stdout = _one_line_error(capsys, _stage1(tiny_model_dir, data_file, out, "--backend", "cuda"))
        assert "--backend cuda cannot run on this machine" in line and "[medcare]" not in stdout
    plain = tmp_path / "no-chat-template"  # the tiny model with a tokenizer that has no chat template
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    line, stdout = _one_line_error(capsys, _stage1(plain, data_file, out, "--template", "chat"))
    assert "--template chat: the tokenizer of --model" in line and "has no chat template" in line
    assert not out.exists()


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(capsys, tmp_path, tiny_model_dir, data_file,
                                                               monkeypatch):
    """ENOSPC at the second checkpoint's adapter write (simulated): one line, checkpoint-2 stays resumable."""
    import medcare.adapters
    from medcare.trainer import last_complete_checkpoint

    real, calls = medcare.adapters.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(medcare.adapters, "save_file", save_file)
    out = tmp_path / "o"
    line, _ = _one_line_error(capsys, _stage1(tiny_model_dir, data_file, out, "--max_steps", "4", "--save_steps",
                                              "2"))
    assert "cannot write into --output_dir" in line and "no space left on the device" in line
    assert "--resume_from_checkpoint last" in line
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint-4 .no trainer_state.json"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert not list(out.glob("checkpoint-4/.adapter.safetensors.*.tmp"))  # the failed write cleaned its file

    monkeypatch.setattr(medcare.adapters, "save_file", real)
    s2 = tmp_path / "s2"  # merge's write of the model: the same one line for --output
    assert main(["train", "--stage", "2", "--from-stage1", str(out / "checkpoint-2"), "--data", str(data_file),
                 "--output_dir", str(s2), *TRAIN[:-6], "--max_steps", "1", "--save_strategy", "no"]) == 0
    capsys.readouterr()

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    line, _ = _one_line_error(capsys, ["merge", "--stage2", str(s2), "--output", str(tmp_path / "m")], "merge")
    assert "cannot write --output" in line and "no space left" in line
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def test_a_reused_output_dir_is_refused_unless_overwritten_or_resumed(capsys, tmp_path, tiny_model_dir, data_file):
    from medcare.adapters import read_adapter

    out = tmp_path / "o"
    assert main(_stage1(tiny_model_dir, data_file, out, "--max_steps", "4", "--save_steps", "2", "--seed", "1")) == 0
    capsys.readouterr()
    first, _ = read_adapter(out)
    line, _ = _one_line_error(capsys, _stage1(tiny_model_dir, data_file, out, "--max_steps", "2"))
    assert "holds another run (checkpoint-2, checkpoint-4, adapter.safetensors" in line
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint last" in line

    (out / "checkpoint-2" / ".adapter.safetensors.x1.tmp").write_bytes(b"half")  # an interrupted save's leftover
    assert main(_stage1(tiny_model_dir, data_file, out, "--max_steps", "2", "--save_steps", "1",
                        "--overwrite_output_dir")) == 0
    assert "removed the previous run's 2 checkpoint(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    second, _ = read_adapter(out)
    assert second["save_id"] != first["save_id"] and not list(out.rglob("*.tmp"))
    # resuming the new run continues it (from its own checkpoint-2, the old checkpoint-4 is gone)
    assert main(_stage1(tiny_model_dir, data_file, out, "--max_steps", "3", "--save_steps", "1",
                        "--resume_from_checkpoint", "last")) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_directories_respect_the_umask(tmp_path, umask):
    from medcare import apply_stage1, save_adapter
    from medcare.cli._common import write_dir_atomically
    from tests.model.tiny import small_config, tiny_model

    old = os.umask(umask)
    try:
        model = apply_stage1(tiny_model(), small_config())
        save_adapter(model, tmp_path / "a")
        merged = write_dir_atomically(tmp_path / "merged", lambda d: (d / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    for name in ("adapter.safetensors", "medcare_config.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((merged / "config.json").stat().st_mode) == 0o666 & ~umask


def test_leftovers_of_interrupted_saves_and_merges_are_cleaned(tmp_path):
    from medcare import apply_stage1, save_adapter
    from medcare.cli._common import write_dir_atomically
    from tests.model.tiny import small_config, tiny_model

    a = tmp_path / "a"
    a.mkdir()
    for name in (".adapter.safetensors.k3j.tmp", ".medcare_config.json.q1.tmp", "notes.tmp"):
        (a / name).write_text("partial")
    save_adapter(apply_stage1(tiny_model(), small_config()), a)
    assert sorted(p.name for p in a.iterdir()) == ["adapter.safetensors", "medcare_config.json", "notes.tmp"]

    out = tmp_path / "m"  # a merge killed mid-write: a partial .tmp directory the size of the model
    (tmp_path / ".m.abc.tmp").mkdir()
    (tmp_path / ".m.abc.tmp" / "model.safetensors").write_bytes(b"\0" * 1000)
    write_dir_atomically(out, lambda d: (d / "v1").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m")) == []
    # killed between the two renames of a replacement: the previous directory sits in .m.*.old/m
    (tmp_path / ".m.xyz.old").mkdir()
    os.replace(out, tmp_path / ".m.xyz.old" / "m")
    (tmp_path / ".m.new.tmp").mkdir()
    with pytest.warns(UserWarning, match="restoring"):
        write_dir_atomically(out, lambda d: (d / "v2").write_text("2"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m")) == []
    from medcare.cli._common import CLIError

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CLIError, match=r"--output '.*a-file/m' lies under '.*a-file', which is a file"):
        write_dir_atomically(tmp_path / "a-file" / "m", lambda d: None)


_KILL_DRIVER = textwrap.dedent("""
    # medcare train, SIGKILLed by itself in the middle of writing checkpoint-{kill}/trainer_state.json
    import os, signal, sys
    from transformers.trainer_callback import TrainerState

    real = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if os.path.basename(os.path.dirname(json_path)) == "checkpoint-{kill}":
            text = self.to_json_string() if hasattr(self, "to_json_string") else "{{}}"
            with open(json_path, "w") as f:
                f.write(text[: len(text) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, json_path)

    TrainerState.save_to_json = save_to_json
    from medcare.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_last_after_a_sigkill_mid_save_takes_the_newest_complete_checkpoint(tmp_path, tiny_model_dir,
                                                                                   data_file):
    from medcare.adapters import read_adapter

    args = ["--stage", "1", "--model", str(tiny_model_dir), "--data", str(data_file), *TRAIN, "--max_steps", "6",
            "--save_steps", "2"]
    killed = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(_KILL_DRIVER.format(kill=4))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(driver), *args, "--output_dir", str(killed)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    assert (killed / "checkpoint-4" / "adapter.safetensors").is_file()  # the save was under way
    with pytest.raises(json.JSONDecodeError):
        json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())

    proc = check(run_cli("train", *args, "--output_dir", str(killed), "--resume_from_checkpoint", "last"))
    assert "skipping incomplete checkpoint" in proc.stdout and "checkpoint-4" in proc.stdout
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]

    whole = tmp_path / "whole"  # the same run, never interrupted: the same adapter
    check(run_cli("train", *args, "--output_dir", str(whole)))
    _, a = read_adapter(killed)
    _, b = read_adapter(whole)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    resumed = [h["loss"] for h in state["log_history"] if "loss" in h]
    uninterrupted = [h["loss"] for h in json.loads((whole / "trainer_state.json").read_text())["log_history"]
                     if "loss" in h]
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)
