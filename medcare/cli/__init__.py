"""The ``medcare`` command line (also ``python -m medcare``)::

    medcare train --stage 1 --model PATH --data FILE --output_dir DIR [TrainingArguments] [MedCare options]
    medcare train --stage 2 --from-stage1 DIR --data FILE --output_dir DIR [...]
    medcare merge --stage2 DIR --output DIR
    medcare eval --model DIR --data FILE [--data FILE ...] [--output DIR]
    medcare experts --model STAGE1_DIR --data FILE [--by FIELD] [--output DIR]
    medcare bench [--quick] [--json FILE] [--plot FILE.png]
    medcare info [--json]
    medcare demo [--output DIR]

One module per command (``medcare.cli.<command>``, each with ``main(argv) -> int``), imported on use.
``medcare.cli.train.main`` also takes ``callbacks`` and ``model_hook`` (running the command from Python).
Errors the user can fix (bad arguments, malformed data, an adapter that does not fit) print one line
``medcare <command>: error: ...`` on stderr and exit with status 1 (argparse usage errors: 2).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: command -> one-line description (the module is ``medcare.cli.<command>``).
COMMANDS = {
    "train": "train one MedCare stage on a transformers causal LM (stage 1: MoLoRA; stage 2: orthogonal LoRA)",
    "merge": "fold a stage-2 adapter into its base model and write a plain transformers checkpoint",
    "eval": "accuracy of a merged, stage-1 or stage-2 model on multiple-choice and open-ended medical data",
    "experts": "which routed experts a stage-1 model sends a data set's tokens to (load, entropy, heat map)",
    "bench": "the MoLoRA kernel benchmark table on this machine's device",
    "info": "versions, GPU, compiled CUDA architectures and the backends that run here",
    "demo": "both stages end to end on a tiny model and the embedded medical data (no downloads)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: medcare <command> [options]   (medcare <command> --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medcare <command> ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from medcare_kernels import __version__

        print(f"medcare (medcare-kernels) {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{_usage()}\n\nmedcare: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    from medcare.cli._common import USER_ERRORS

    module = importlib.import_module(f"medcare.cli.{command}")
    try:
        return int(module.main(rest) or 0)
    except USER_ERRORS as e:
        print(f"medcare {command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `medcare info | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
