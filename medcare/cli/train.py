"""``medcare train``: one MedCare stage on a transformers causal LM, trained with :class:`~medcare.MedCareTrainer`.

    medcare train --stage 1 --model PATH --data FILE --output_dir DIR [options]
    medcare train --stage 2 --from-stage1 DIR --data FILE --output_dir DIR [--model PATH] [options]
    medcare train options.json | options.yaml        (the same options in a file)

Stage 1 (knowledge aggregation) loads the model and tokenizer, turns every FFN linear into a MoLoRA layer and
every attention linear into a LoRA layer (:func:`medcare.apply_stage1`), trains, and saves the adapter in
``--output_dir``. Stage 2 (alignment) loads the *original* base model (default: the one recorded in the
stage-1 adapter), folds the stage-1 attention LoRA into it, makes the stage-1 shared experts the frozen base
LoRA of each FFN linear (:func:`medcare.to_stage2` + :func:`medcare.load_adapter`), and trains the orthogonal
LoRA with ``orth_lambda * orthogonal_penalty``. ``medcare merge`` then writes a plain checkpoint.

Options: the data and model options below, the MedCare options (:class:`medcare.MedCareConfig`, the paper's
defaults; in stage 2 the stage-1 adapter's values), and every ``transformers.TrainingArguments`` flag
(``--bf16``, ``--gradient_checkpointing``, ``--gradient_accumulation_steps``, ``--lr_scheduler_type``,
``--logging_steps``, ``--save_steps``, ``--resume_from_checkpoint DIR|last``, ...), parsed with
``HfArgumentParser``. Several GPUs: ``torchrun --nproc_per_node N -m -- medcare train ...``, ``accelerate launch
[--config_file FILE] -m medcare train ...`` (FSDP2: ``--fsdp``; ZeRO-3: ``--deepspeed configs/zero3.json``).
"""

# No ``from __future__ import annotations`` here: HfArgumentParser reads these dataclasses' field types
# (``X | None`` is read as an optional X by transformers 4.57 and 5.x alike).
import argparse
import dataclasses
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medcare.cli._common import (
    DTYPES,
    CLIError,
    check_writable_dir,
    count,
    disk_error,
    load_causal_lm,
    load_tokenizer,
    local_path,
    quiet_to_stage2,
    say,
    target_error,
)
from medcare.config import MedCareConfig
from medcare.distributed import is_global_rank_zero
from medcare.stages import TargetError

__all__ = ["DataModelArguments", "MedCareArguments", "build_config", "main", "parse_args"]

_DEFAULTS = MedCareConfig()
#: MedCare options that fix the shapes and scale of the stage-1 adapter: stage 2 must keep them.
STRUCTURAL = ("r", "alpha", "num_shared", "use_rslora", "ffn_targets", "layers_pattern")


@dataclass
class DataModelArguments:
    """What to train on, and from where."""

    stage: int = field(metadata={"help": "1: knowledge aggregation (MoLoRA experts); 2: alignment (orthogonal LoRA "
                                         "on the stage-1 shared experts, needs --from-stage1)", "choices": [1, 2]})
    data: str = field(metadata={"help": "training data: a JSON or JSONL file of ShareGPT-style 'conversations' "
                                        "(from/value turns) or Alpaca-style 'instruction'/'input'/'output' records"})
    model: str | None = field(default=None, metadata={
        "help": "base causal LM: a local directory (or a hub name). Stage 2: the same base model as stage 1 "
                "(default: the one recorded in the stage-1 adapter)"})
    from_stage1: str | None = field(default=None, metadata={
        "help": "stage 2: the stage-1 output directory (its adapter)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer (default: --model's)"})
    eval_data: str | None = field(default=None, metadata={
        "help": "evaluation data in the same formats; evaluated at the end and on --eval_strategy"})
    template: str = field(default="auto", metadata={
        "help": "prompt format: the tokenizer's chat template ('chat'), a plain '### Instruction/### Response' "
                "template ('plain'), or 'auto' (chat when the tokenizer has one)",
        "choices": ["auto", "chat", "plain"]})
    max_length: int = field(default=2048, metadata={"help": "examples are truncated to this many tokens"})
    model_dtype: str = field(default="auto", metadata={
        "help": "dtype to load the base weights in ('auto': the checkpoint's)", "choices": list(DTYPES)})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention kernel for the model ('eager', 'sdpa', 'flash_attention_2', ...)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the checkpoint"})
    save_full_checkpoint: bool = field(default=False, metadata={
        "help": "checkpoints hold the full model weights too, not only the adapter"})


def _help(text: str, name: str, stage2: str = "the stage-1 adapter's") -> dict[str, str]:
    default = getattr(_DEFAULTS, name)
    if isinstance(default, tuple):
        default = ",".join(default)
    return {"help": f"{text} (default: {default}; stage 2: {stage2})"}


@dataclass
class MedCareArguments:
    """MedCareConfig fields; left out, they take the paper's defaults (stage 1) or the stage-1 adapter's (stage 2)."""

    r: int | None = field(default=None, metadata=_help("rank of each routed expert and of the attention LoRA", "r"))
    alpha: float | None = field(default=None, metadata=_help("LoRA alpha; scale alpha/r", "alpha"))
    dropout: float | None = field(default=None, metadata=_help("dropout on the LoRA input", "dropout"))
    num_experts: int | None = field(default=None, metadata=_help("routed experts per FFN linear (E)",
                                                                     "num_experts"))
    top_k: int | None = field(default=None, metadata=_help("experts chosen per token", "top_k"))
    num_shared: int | None = field(default=None, metadata=_help(
        "shared experts per FFN linear (one LoRA of rank r*num_shared; the stage-2 base and orth rank)", "num_shared"))
    use_rslora: bool | None = field(default=None, metadata={**_help("rank-stabilised scale alpha/sqrt(r)",
                                                                         "use_rslora"), "nargs": "?", "const": True})
    ffn_targets: str | None = field(default=None, metadata=_help(
        "FFN linears (MoLoRA in stage 1, orthogonal LoRA in stage 2): comma-separated module-name suffixes "
        "matched inside the layers, or 're:REGEX', a regular expression for the full module name", "ffn_targets"))
    attn_targets: str | None = field(default=None, metadata=_help(
        "attention linears for the stage-1 LoRA, in the same forms; 'none' for no attention LoRA", "attn_targets",
        "unused"))
    orth_lambda: float | None = field(default=None, metadata=_help(
        "weight of the stage-2 orthogonality penalty (lambda)", "orth_lambda"))
    aux_loss_coef: float | None = field(default=None, metadata=_help(
        "weight of a stage-1 router load-balancing loss (MedCare uses 0)", "aux_loss_coef"))
    freeze_base: bool | None = field(default=None, metadata={**_help(
        "stage 2: keep the base LoRA (the stage-1 shared experts) frozen", "freeze_base"), "nargs": "?", "const": True})
    backend: str | None = field(default=None, metadata=_help(
        "medcare_kernels backend ('auto', 'torch', 'triton', 'cuda', 'reference')", "backend"))
    lora_dtype: str | None = field(default=None, metadata=_help(
        "dtype of the adapter parameters ('float32', 'bfloat16', ...; 'none': the base weights')", "lora_dtype"))
    layers_pattern: str | None = field(default=None, metadata=_help(
        "name of the numbered layer list (suffix targets match only inside it: layers, or layer for BERT)",
        "layers_pattern"))


def _names(value: str) -> tuple[str, ...] | str:
    """``a,b`` -> suffixes ``("a", "b")``; ``re:PATTERN`` -> the regex ``PATTERN`` (no comma splitting)."""
    if value.startswith("re:"):
        return value[3:]
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _shown(targets: tuple[str, ...] | str) -> str:
    return f"re:{targets}" if isinstance(targets, str) else ",".join(targets)


def build_config(margs: MedCareArguments, stage1: dict | None = None, stage1_dir: str = "") -> MedCareConfig:
    """The run's :class:`MedCareConfig`: the given options over the paper's defaults (stage 1) or over the
    stage-1 adapter's config (stage 2), where the options in :data:`STRUCTURAL` must not change."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(margs):
        value = getattr(margs, f.name)
        if value is None:
            continue
        if f.name in ("ffn_targets", "attn_targets"):
            value = _names(value)
        elif f.name == "lora_dtype" and value.lower() == "none":
            value = None
        given[f.name] = value
    values: dict[str, Any] = {}
    if stage1 is not None:
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stage1.items()}
        for key in STRUCTURAL:
            if key in given and key in values and given[key] != values[key]:
                shown = _shown(values[key]) if key.endswith("_targets") else values[key]
                raise CLIError(f"--{key} {getattr(margs, key)} differs from the stage-1 adapter's {key}={shown} "
                               f"({stage1_dir}); stage 2 keeps the stage-1 value: leave --{key} out")
    values.update(given)
    try:
        if stage1 is not None:
            return MedCareConfig.from_dict(values)
        return MedCareConfig(**values)
    except (TypeError, ValueError) as e:
        raise CLIError(f"invalid MedCare option: {e}") from e


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; '(default: X)' after each option's help, except for None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _compat_arguments(training_arguments: type) -> type:
    """Flags that this transformers' ``TrainingArguments`` lacks, so one command line works on 4.x and 5.x.

    ``--warmup_ratio`` (transformers 5 folded it into ``--warmup_steps``: a float below 1 is a ratio there)
    and ``--overwrite_output_dir`` (gone in 5; ``medcare train`` uses it to allow a reused ``--output_dir``).
    """
    have = {f.name for f in dataclasses.fields(training_arguments)}
    fields: list[tuple[str, Any, Any]] = []
    if "warmup_ratio" not in have:
        fields.append(("warmup_ratio", float | None, field(default=None, metadata={
            "help": "warmup over this fraction of the training steps, 0 <= ratio < 1 (the same as --warmup_steps "
                    "with a float below 1)"})))
    if "overwrite_output_dir" not in have:
        fields.append(("overwrite_output_dir", bool, field(default=False, metadata={
            "help": "train into an --output_dir that holds another run's files (its checkpoint-* directories "
                    "are deleted first, so --resume_from_checkpoint last cannot pick them up)"})))
    return dataclasses.make_dataclass("CompatArguments", fields)


def _apply_compat(extra: Any, targs: Any) -> None:
    ratio = getattr(extra, "warmup_ratio", None)
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise CLIError(f"--warmup_ratio must satisfy 0 <= ratio < 1, got {ratio}")
        if targs.warmup_steps:
            raise CLIError("give --warmup_ratio or --warmup_steps, not both")
        targs.warmup_steps = ratio  # transformers 5: a warmup_steps below 1 is a ratio of the total steps
    if hasattr(extra, "overwrite_output_dir"):
        targs.overwrite_output_dir = extra.overwrite_output_dir


def parse_args(argv: list[str]) -> tuple[DataModelArguments, MedCareArguments, Any]:
    """``(data/model, MedCare, TrainingArguments)`` from the command line or one JSON/YAML options file.

    The ``TrainingArguments`` always has ``overwrite_output_dir`` (an attribute set here where transformers
    5 dropped the field), and ``--warmup_ratio`` works on every supported transformers.
    """
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((DataModelArguments, MedCareArguments, TrainingArguments,
                               _compat_arguments(TrainingArguments)),
                              prog="medcare train", description=__doc__, formatter_class=_HelpFormatter)
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            path = os.path.abspath(argv[0])
            if not os.path.isfile(path):
                raise CLIError(f"options file {argv[0]!r} does not exist")
            if path.endswith(".json"):
                dargs, margs, targs, extra = parser.parse_json_file(path)
            else:
                dargs, margs, targs, extra = parser.parse_yaml_file(path)
            given_output = targs.output_dir not in (None, "trainer_output")
        else:
            dargs, margs, targs, extra = parser.parse_args_into_dataclasses(args=argv)
            given_output = any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv)
    except ValueError as e:  # TrainingArguments.__post_init__ and the options file's own checks
        raise CLIError(str(e)) from e
    _apply_compat(extra, targs)
    if not given_output:
        raise CLIError("--output_dir is required (where the adapter and checkpoints are written)")
    return dargs, margs, targs


def _resuming(targs: Any) -> bool:
    return bool(targs.resume_from_checkpoint)


def _resume_checkpoint(targs: Any) -> str | None:
    """The checkpoint to resume: ``last`` is the newest *complete* ``checkpoint-N`` of ``--output_dir``."""
    from medcare.trainer import checkpoint_problem, last_complete_checkpoint

    value = targs.resume_from_checkpoint
    if not value:
        return None
    if str(value).lower() in ("last", "latest", "true"):
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            last = last_complete_checkpoint(targs.output_dir)
        for w in skipped:
            say(str(w.message))
        if last is None:
            raise CLIError(f"--resume_from_checkpoint {value}: no complete checkpoint-* directory in --output_dir "
                           f"{targs.output_dir!r}" + (f" ({len(skipped)} incomplete)" if skipped else ""))
        return last
    if not os.path.isdir(value):
        raise CLIError(f"--resume_from_checkpoint {value!r} is not a directory")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise CLIError(f"--resume_from_checkpoint {value!r} is incomplete ({problem}: an interrupted save); "
                       f"pass an earlier checkpoint or 'last'")
    return value


#: What a training run writes at the top of its --output_dir (a directory holding any of them is a run's).
_RUN_FILES = ("adapter.safetensors", "medcare_config.json", "trainer_state.json", "training_args.bin",
              "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "train_results.json")


def _prepare_output_dir(targs: Any) -> None:
    """Before anything loads: ``--output_dir`` is writable and holds no other run, unless told otherwise.

    A directory with another run's files (:data:`_RUN_FILES`, ``checkpoint-N/``) is refused unless the run
    resumes (``--resume_from_checkpoint``) or ``--overwrite_output_dir`` is given; then the old
    ``checkpoint-N/`` are deleted (rank 0), so ``--resume_from_checkpoint last`` can never take the old run's.
    The temporary files of interrupted adapter saves are removed.
    """
    from medcare.adapters import remove_interrupted_writes

    out = check_writable_dir(targs.output_dir, "--output_dir")
    if not out.is_dir():
        return
    checkpoints = sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name))
    found = [p.name for p in checkpoints] + [n for n in _RUN_FILES if (out / n).exists()]
    if found and not _resuming(targs):
        if not getattr(targs, "overwrite_output_dir", False):
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise CLIError(f"--output_dir {targs.output_dir!r} holds another run ({shown}): pass "
                           f"--resume_from_checkpoint last to continue it, --overwrite_output_dir to replace it, "
                           f"or choose a new --output_dir")
        if is_global_rank_zero():
            for p in checkpoints:
                shutil.rmtree(p)
            say(f"--overwrite_output_dir: removed the previous run's {len(checkpoints)} checkpoint(s) from {out}")
    if is_global_rank_zero():
        for d in [out, *checkpoints]:
            if d.is_dir():
                remove_interrupted_writes(d)


def _check_backend(backend: str, targs: Any) -> None:
    """``--backend NAME`` must run on this machine: checked before the model loads, not at the first step."""
    if backend == "auto":
        return
    import torch

    import medcare_kernels as mk

    device = "cpu" if getattr(targs, "use_cpu", False) or not torch.cuda.is_available() else "cuda"
    available = mk.available_backends(device)
    if backend not in available:
        raise CLIError(f"--backend {backend} cannot run on this machine's {device} (available here: "
                       f"{', '.join(available)}; `medcare info` says why): choose one of those or 'auto'")


def main(argv: list[str] | None = None, *, callbacks: Sequence[Any] | None = None,
         model_hook: Callable[[Any], None] | None = None) -> int:
    """Run ``medcare train ARGV`` in this process; returns the exit status (0).

    This is the command itself (``medcare train``, ``python -m medcare train``, and each process that
    ``torchrun``/``accelerate launch`` starts with ``-m medcare train``), callable from Python with two
    additions for experiments and tests:

    * ``callbacks``: ``transformers.TrainerCallback`` instances (or classes) added to the Trainer's own.
    * ``model_hook(model)``: called once on the prepared model (stage 1 applied, or stage 2 with the stage-1
      adapter loaded), before the Trainer and the distributed engine wrap it; it may edit the model in place.

    User errors raise :class:`~medcare.cli._common.CLIError` (and the data and adapter errors in
    ``medcare.cli._common.USER_ERRORS``); the ``medcare`` entry point prints those as one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    dargs, margs, targs = parse_args(argv)
    _prepare_output_dir(targs)

    import transformers

    from medcare import MedCareTrainer, apply_stage1, load_adapter
    from medcare.adapters import read_adapter
    from medcare.data.dataset import build_dataset, make_collator

    transformers.utils.logging.set_verbosity(targs.get_process_log_level())
    stage1_meta = None
    if dargs.stage == 1:
        if dargs.from_stage1:
            raise CLIError("--from-stage1 is for --stage 2; stage 1 starts from --model")
        if not dargs.model:
            raise CLIError("--model is required for --stage 1 (a transformers causal LM directory)")
        model_path = dargs.model
    else:
        if not dargs.from_stage1:
            raise CLIError("--stage 2 needs --from-stage1 DIR (the output directory of medcare train --stage 1)")
        stage1_meta, _ = read_adapter(dargs.from_stage1)
        if stage1_meta.get("stage") != 1:
            raise CLIError(f"--from-stage1 {dargs.from_stage1!r} holds a stage-{stage1_meta.get('stage')} adapter; "
                           "stage 2 starts from a stage-1 adapter")
        if stage1_meta.get("config") is None:
            raise CLIError(f"--from-stage1 {dargs.from_stage1!r}: the adapter carries no MedCareConfig")
        model_path = dargs.model or stage1_meta.get("base_model") or ""
        if not model_path:
            raise CLIError("--model is required: the stage-1 adapter does not record its base model")
    cfg = build_config(margs, stage1_meta["config"] if stage1_meta else None, dargs.from_stage1 or "")
    if dargs.max_length < 2:
        raise CLIError(f"--max_length must be >= 2, got {dargs.max_length}")
    _check_backend(cfg.backend, targs)

    # data first: a malformed file fails before a large model loads
    tokenizer = load_tokenizer(dargs.tokenizer or local_path(model_path), dargs.trust_remote_code,
                               "--tokenizer" if dargs.tokenizer else "--model")
    if dargs.template == "chat" and not getattr(tokenizer, "chat_template", None):
        source = f"--tokenizer {dargs.tokenizer!r}" if dargs.tokenizer else f"--model {model_path!r}"
        raise CLIError(f"--template chat: the tokenizer of {source} has no chat template; use --template plain "
                       f"(or auto, which picks plain here)")
    train_ds = build_dataset(dargs.data, tokenizer, dargs.template, dargs.max_length)
    eval_ds = build_dataset(dargs.eval_data, tokenizer, dargs.template, dargs.max_length) if dargs.eval_data else None
    say(f"data: {len(train_ds)} examples, {train_ds.num_tokens} tokens ({train_ds.num_response_tokens} in responses"
        f"{f', {train_ds.num_truncated} truncated to {dargs.max_length}' if train_ds.num_truncated else ''}) "
        f"from {dargs.data}")

    transformers.set_seed(targs.seed)  # the adapters' initialisation
    # the process group first (torchrun / accelerate launch): under ZeRO-3 from_pretrained partitions the
    # weights while it loads (deepspeed.zero.Init), which needs the group
    _ = targs.device
    model = load_causal_lm(model_path, dargs.model_dtype, dargs.attn_implementation, dargs.trust_remote_code)
    try:
        if dargs.stage == 1:
            apply_stage1(model, cfg)
        else:
            quiet_to_stage2(model, cfg)
            load_adapter(model, dargs.from_stage1)
    except TargetError as e:
        raise target_error(e) from e
    if model_hook is not None:
        model_hook(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    what = (f"MoLoRA (E={cfg.num_experts}, r={cfg.r}, top-{cfg.top_k}, {cfg.num_shared} shared) on "
            f"{_shown(cfg.ffn_targets)}, LoRA on {_shown(cfg.attn_targets) or 'nothing'}" if dargs.stage == 1 else
            f"orthogonal LoRA (rank {cfg.shared_rank}, lambda={cfg.orth_lambda:g}) on {_shown(cfg.ffn_targets)} "
            f"over the stage-1 shared experts of {dargs.from_stage1}")
    say(f"stage {dargs.stage}: {model_path}: {what}; {count(trainable)} of {count(total)} parameters train")

    try:
        trainer = MedCareTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                                 data_collator=make_collator(tokenizer), processing_class=tokenizer,
                                 medcare_config=cfg, save_full_checkpoint=dargs.save_full_checkpoint,
                                 callbacks=list(callbacks) if callbacks else None)
    except ValueError as e:  # the Trainer's checks of the arguments, e.g. --eval_strategy without --eval_data
        raise CLIError(str(e)) from e
    try:
        result = trainer.train(resume_from_checkpoint=_resume_checkpoint(targs))
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if eval_ds is not None:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
    except OSError as e:  # a full disk or a permission change mid-run: one line, and how to go on
        error = disk_error(e, "into --output_dir", targs.output_dir, "the last complete checkpoint is kept: free "
                           "space (or fix the permissions) and rerun with --resume_from_checkpoint last")
        if error is None:
            raise
        raise error from e
    out = targs.output_dir
    if dargs.stage == 1:
        say(f"stage-1 adapter written to {out}; next: medcare train --stage 2 --from-stage1 {out} --data FILE "
            f"--output_dir DIR")
    else:
        say(f"stage-2 adapter written to {out}; next: medcare merge --stage2 {out} --output DIR")
    return 0
