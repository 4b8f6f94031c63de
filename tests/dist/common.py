"""Shared by the distributed tests and their driver: the tiny model and tokenizer on disk, the data, the launcher.

Every run is ``medcare train`` (:func:`medcare.cli.train.main`): through ``tests/dist/driver.py``, which
adds the recorder and the router skew, or launched as the command itself (``-m medcare train``).

The model is the tiny random Qwen2 of ``tests/model/tiny.py`` with one change that makes routing
*skewed by rank*: token ids below ``SPLIT`` carry a large embedding component along hidden dimension
``FEAT0``, the others along ``FEAT1``. The tokenizer maps the word ``w<i>`` to id ``i`` and its chat template
only joins the turns, so an example's tokens are exactly the ids its words name (no template or special
token). The data places the low-id examples on rank 0 and the high-id ones on rank 1
(``per_device_train_batch_size=2``, two processes, sequential order). ``skew_routers`` then points the last
expert of every stage-1 ``gate_proj``/``up_proj`` router at ``FEAT0`` with a large negative bias: every
rank-0 token takes that expert, no rank-1 token ever does, so on rank 1 the expert's gradient is exactly
zero at every step while rank 0's is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(ROOT, "tests", "dist", "driver.py")

VOCAB, SPLIT, SEQ = 96, 49, 12
PROMPT = 6  # of the SEQ tokens of an example, the user turn's; the rest is the response (the loss's tokens)
FEAT0, FEAT1, FEAT_SIZE = 3, 17, 10.0
ROUTER_GAIN = 50.0


def make_model_dir(path: str) -> str:
    """Save the tiny skewed Qwen2 (float32, random, seed 0) to ``path``; returns ``path``."""
    from tests.model.tiny import tiny_model

    model = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[2:SPLIT, FEAT0] += FEAT_SIZE
        emb[SPLIT:, FEAT1] += FEAT_SIZE
    model.save_pretrained(path)
    return path


def make_tokenizer_dir(path: str) -> str:
    """Save the test tokenizer to ``path`` (passed as ``--tokenizer``); returns ``path``.

    Word-level: ``w<i>`` is id ``i`` (2 <= i < VOCAB), ``<pad>`` 0 and ``<bos>`` 1 as in the model's config.
    Its chat template joins the turns' contents with spaces, so ``medcare train`` (``--template auto``: the
    chat template) tokenises an example to exactly its words' ids, the response's labelled. It lives in its
    own directory: transformers 5 would load a tokenizer saved next to a Qwen2 config as ``Qwen2Tokenizer``
    (a byte-level BPE), not as this one.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_data(path: str, steps: int, global_batch: int = 4, seed: int = 0) -> str:
    """``steps * global_batch`` Alpaca records (JSON lines) of ``SEQ`` tokens each (``PROMPT`` in the
    instruction, the rest in the output): per global batch two low-id then two high-id ones."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(steps):
            for i in range(global_batch):
                lo, hi = (2, SPLIT) if i < global_batch // 2 else (SPLIT, VOCAB)
                ids = torch.randint(lo, hi, (SEQ,), generator=g).tolist()
                f.write(json.dumps({"instruction": words(ids[:PROMPT]), "output": words(ids[PROMPT:])}) + "\n")
    return path


@torch.no_grad()
def skew_routers(model: torch.nn.Module) -> None:
    """Last expert of every stage-1 gate/up router: ``logit = GAIN * x[FEAT0] - GAIN * sqrt(d)/2``."""
    from medcare.modules import MoLoRALinear

    for name, m in model.named_modules():
        if isinstance(m, MoLoRALinear) and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj"):
            w, b = m.router.weight, m.router.bias
            w[-1].zero_()
            w[-1, FEAT0] = ROUTER_GAIN
            b[-1] = -ROUTER_GAIN * (w.shape[1] ** 0.5) / 2


def train_flags(output_dir: str, model_dir: str, tokenizer_dir: str, data: str, stage: int, *, per_device: int,
                steps: int, extra: list[str] | None = None) -> list[str]:
    """The ``medcare train`` command line shared by every run (same seed, order and optimiser)."""
    flags = ["--stage", str(stage), "--model", model_dir, "--tokenizer", tokenizer_dir, "--data", data,
             "--output_dir", output_dir,
             "--per_device_train_batch_size", str(per_device), "--max_steps", str(steps),
             "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
             "--weight_decay", "0", "--seed", "0", "--train_sampling_strategy", "sequential",
             "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
             "--dataloader_num_workers", "0", "--save_strategy", "no",
             # the MedCare config (dropout 0: a dropout mask depends on the rank's RNG stream)
             "--r", "4", "--alpha", "8", "--dropout", "0", "--num_experts", "4", "--top_k", "2",
             "--num_shared", "2", "--orth_lambda", "0.5"]
    extra = list(extra or [])
    if "--deepspeed" not in extra:  # accelerate sets DeepSpeed up only when not told use_cpu (CPU-only here)
        flags.append("--use_cpu")
    return flags + extra


def run_driver(flags: list[str], *, nproc: int, record: str, timeout: float = 240.0, driver_flags=(),
               expect_rc: int = 0, env: dict | None = None, accelerate_config: str | None = None,
               console: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc driver.py --record record [driver_flags] -- flags`` (gloo on CPU;
    plain ``python`` for one process; or ``accelerate launch --config_file accelerate_config``), killed as a
    group after ``timeout``. FSDP and DeepSpeed runs get the driver's CPU set-up flags. The log goes to
    ``record.log``.

    ``console=True`` launches the command itself in place of the driver, ``torchrun ... -m -- medcare train
    flags`` (``python -m medcare train`` for one process): nothing is recorded beyond what the command
    writes to its output directory, and no driver flag applies (DDP only: FSDP and DeepSpeed need the
    driver's CPU set-up).

    A hang (e.g. a DDP reduction waiting for a gradient that never comes) fails the test at the timeout.
    """
    driver_flags = list(driver_flags)
    if console and (driver_flags or "--fsdp" in flags or "--deepspeed" in flags or accelerate_config):
        raise ValueError("console runs are DDP (or one process) without driver flags: FSDP and DeepSpeed on CPU "
                         "need the driver")
    if "--fsdp" in flags or accelerate_config:
        driver_flags.append("--cpu_fsdp")
    if "--deepspeed" in flags:
        driver_flags.append("--cpu_deepspeed")
        flags = [*flags, "--accelerator_config", '{"use_configured_state": true}']
    if accelerate_config:  # the config's own settings, in float32 (CPU) and with nproc processes
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                    "--num_processes", str(nproc), "--mixed_precision", "no"]
    elif nproc == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "--max_restarts=0"]
    if console:
        # torchrun: "--" ends its own options; without it its parser takes a script flag that abbreviates one of
        # its options (here --r: --rdzv-*, --role, ...) as its own (pytorch/pytorch#120601)
        module = ["-m", "--", "medcare"] if launcher[1:3] == ["-m", "torch.distributed.run"] else ["-m", "medcare"]
        cmd = [*launcher, *module, "train", *flags]
    else:
        cmd = [*launcher, DRIVER, "--record", record, *driver_flags, "--", *flags]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **(env or {})}
    full_env.pop("MEDCARE_BACKEND", None)
    for attempt in (1, 2):
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            _keep_log(record, attempt, out)
            raise AssertionError(f"{nproc}-process run hung (> {timeout:.0f} s): {' '.join(cmd)}\n{out[-6000:]}")
        elapsed = time.monotonic() - start
        _keep_log(record, attempt, out)
        if proc.returncode == expect_rc:
            break
        # a port taken between rendezvous and bind, a peer gone during set-up: launch again, once
        if attempt == 1 and any(m in out for m in _TRANSIENT):
            print(f"[{nproc}-process run: transient launch failure, retrying]")
            continue
        raise AssertionError(f"{nproc}-process run exited {proc.returncode} (expected {expect_rc}) after "
                             f"{elapsed:.0f} s (log: {record}.log): {' '.join(cmd)}\n{out[-8000:]}")
    print(f"[{nproc}-process run: {elapsed:.1f} s]")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


_TRANSIENT = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "Connection refused")


def _keep_log(record: str, attempt: int, out: str) -> None:
    with open(f"{record}.log", "a") as f:
        f.write(f"==== attempt {attempt} ====\n{out}\n")


def read_record(prefix: str, rank: int = 0) -> dict:
    with open(f"{prefix}.rank{rank}.json") as f:
        return json.load(f)


def read_state(output_dir: str) -> dict:
    """The ``trainer_state.json`` that ``medcare train`` writes at the end (``log_history``, ``global_step``)."""
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)


def step_logs(record: dict, key: str) -> list[float]:
    return [e[key] for e in record["log_history"] if key in e and "train_runtime" not in e]


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    from medcare.adapters import read_adapter

    return read_adapter(path)[1]
