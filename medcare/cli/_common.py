"""What the commands share: user-facing errors, model/tokenizer loading, atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcare.adapters import AdapterError
from medcare.data.formats import DataFormatError

__all__ = ["USER_ERRORS", "CLIError", "count", "is_main_process", "load_causal_lm", "load_tokenizer", "quiet_to_stage2",
           "say", "write_dir_atomically"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(ValueError):
    """A problem the user can fix from the command line (the message names the argument or file)."""


#: Exceptions printed as one ``error:`` line instead of a traceback.
USER_ERRORS = (CLIError, DataFormatError, AdapterError)


def is_main_process() -> bool:
    """True outside distributed runs and on global rank 0 (torchrun / accelerate set ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """A progress line on stdout (rank 0 only)."""
    if is_main_process():
        print(f"[medcare] {message}", flush=True)


def _torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise CLIError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def local_path(name: str) -> str:
    """An existing local directory as an absolute path (recorded in adapters); anything else unchanged."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def load_tokenizer(path: str, trust_remote_code: bool = False, what: str = "--model") -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load a tokenizer from {what} {path!r}: {e}") from e


def load_causal_lm(path: str, dtype: str = "auto", attn_implementation: str | None = None,
                   trust_remote_code: bool = False, what: str = "--model") -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with the error naming the argument."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(local_path(path), **kwargs)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load a causal LM from {what} {path!r}: {e}") from e


def quiet_to_stage2(model: Any, config: Any) -> Any:
    """``to_stage2`` on a plain model; its warning (base LoRA starts at zero) is moot: ``load_adapter`` follows."""
    from medcare import to_stage2

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="to_stage2: the model has no stage-1 MoLoRA layers")
        return to_stage2(model, config)


def write_dir_atomically(output: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                         what: str = "--output") -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory next to ``output``, then rename it to ``output``.

    An interrupted write leaves ``output`` as it was (and no partial directory under its name). An existing
    ``output`` is an error unless ``overwrite``; then it is replaced only after the new one is complete.
    """
    out = Path(output).resolve()
    if out.exists() and not overwrite:
        raise CLIError(f"{what} {str(output)!r} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"{what} {str(output)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


def count(n: int) -> str:
    """``1234567`` -> ``"1.23M"`` (parameter counts in messages)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
