"""``medcare merge --stage2 DIR --output DIR``: a plain transformers checkpoint from a stage-2 adapter.

Loads the base model (default: the one recorded in the adapter), rebuilds stage 2 from the adapter (the
stage-1 attention LoRA folded into the attention weights, base + orthogonal LoRA on the FFN linears), folds
everything into the weights (:func:`medcare.merge_and_unload`) and writes the model (safetensors) and the
tokenizer. The checkpoint loads with plain ``AutoModelForCausalLM.from_pretrained``: no medcare needed.
The directory is written under a temporary name and renamed when complete (what an interrupted merge left
beside it is cleaned by the next one), with the permissions the umask gives.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medcare.cli._common import (
    DTYPES,
    CLIError,
    check_writable_dir,
    disk_error,
    load_causal_lm,
    quiet_to_stage2,
    say,
    write_dir_atomically,
)

__all__ = ["main", "merge"]


def merge(stage2: str, output: str, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
          overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Merge the stage-2 adapter in ``stage2`` into its base model and write it to ``output``; returns the path."""
    from transformers import AutoTokenizer

    from medcare import MedCareConfig, load_adapter, merge_and_unload
    from medcare.adapters import read_adapter

    meta, _ = read_adapter(stage2)
    if meta.get("stage") == 1:
        raise CLIError(f"--stage2 {stage2!r} holds a stage-1 adapter: its routed experts depend on the token and "
                       f"cannot be folded into the weights; train stage 2 from it first (medcare train --stage 2 "
                       f"--from-stage1 {stage2} ...)")
    if meta.get("stage") != 2:
        raise CLIError(f"--stage2 {stage2!r}: not a stage-2 adapter (stage {meta.get('stage')!r})")
    if meta.get("config") is None:
        raise CLIError(f"--stage2 {stage2!r}: the adapter carries no MedCareConfig")
    if Path(output).resolve() == Path(stage2).resolve():
        raise CLIError("--output must differ from --stage2")
    check_writable_dir(output, "--output")  # before the model loads
    base = model or meta.get("base_model") or ""
    if not base:
        raise CLIError("--model is required: the adapter does not record its base model")
    cfg = MedCareConfig.from_dict(meta["config"])

    net = load_causal_lm(base, dtype, trust_remote_code=trust_remote_code,
                         what="--model" if model else "base model (recorded in the adapter; pass --model)")
    quiet_to_stage2(net, cfg)
    load_adapter(net, stage2)
    merge_and_unload(net)
    tok = None
    for source in ([tokenizer] if tokenizer else [stage2, base]):
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            break
        except (OSError, ValueError) as e:
            if tokenizer:
                raise CLIError(f"cannot load a tokenizer from --tokenizer {tokenizer!r}: {e}") from e

    def write(tmp: Path) -> None:
        net.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)

    try:
        out = write_dir_atomically(output, write, overwrite=overwrite)
    except OSError as e:  # a full disk: one line; the partial directory is already removed
        error = disk_error(e, "--output", output, "nothing was written; free space and rerun")
        if error is None:
            raise
        raise error from e
    say(f"merged {stage2} into {base}: plain transformers checkpoint in {out}"
        + ("" if tok is not None else " (no tokenizer found to copy)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medcare merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage2", required=True, metavar="DIR", help="stage-2 adapter directory (the --output_dir of "
                   "medcare train --stage 2, or one of its checkpoint-* directories)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the merged checkpoint")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the adapter directory's, else the "
                   "base model's)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the written weights (default: the base "
                   "checkpoint's; the LoRA products are folded in float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    merge(args.stage2, args.output, args.model, args.tokenizer, args.dtype, args.overwrite, args.trust_remote_code)
    return 0
