"""What the commands share: user-facing errors, model/tokenizer loading, atomic directory writes."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcare.adapters import AdapterError, current_umask
from medcare.data.formats import DataFormatError
from medcare.distributed import is_global_rank_zero
from medcare.stages import TargetError

__all__ = ["USER_ERRORS", "CLIError", "check_writable_dir", "count", "disk_error", "load_causal_lm", "load_tokenizer",
           "quiet_to_stage2", "say", "target_error", "write_dir_atomically"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(ValueError):
    """A problem the user can fix from the command line (the message names the argument or file)."""


#: Exceptions printed as one ``error:`` line instead of a traceback.
USER_ERRORS = (CLIError, DataFormatError, AdapterError, TargetError)


def say(message: str) -> None:
    """A progress line on stdout (global rank 0 only)."""
    if is_global_rank_zero():
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


def target_error(e: TargetError) -> CLIError:
    """A :class:`~medcare.stages.TargetError` as a CLI error naming the flags (``--ffn_targets``, ...)."""
    return CLIError(e.render(lambda field: f"--{field}"))


#: errno values of a write that fails for want of space or permission (named in one line, not a traceback).
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def disk_error(e: OSError, what: str, path: str | os.PathLike, advice: str = "") -> CLIError | None:
    """A CLI error for a write that failed for want of space or permission (None for other errors)."""
    if e.errno not in _DISK_ERRNOS:
        return None
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return CLIError(f"cannot write {what} {str(path)!r}: {_DISK_ERRNOS[e.errno]}{where}" + (f"; {advice}" if advice
                                                                                             else ""))


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Before any model loads: ``path`` is a directory we can write, or one we can create; returns it.

    Raises :class:`CLIError` naming ``what`` (the flag) when ``path`` is a file, lies under a file, or is not
    writable. Creates nothing: the probe file goes in the nearest existing directory and is removed.
    """
    out = Path(path).absolute()
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"lies under {str(probe)!r}, which is a file"
        raise CLIError(f"{what} {str(path)!r} {where}, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".medcare-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = _DISK_ERRNOS.get(e.errno, e.strerror or str(e))
        raise CLIError(f"{what} {str(path)!r} is not writable ({str(probe)!r}: {reason})") from e
    return out


def _clean_interrupted(out: Path) -> None:
    """Remove what an interrupted :func:`write_dir_atomically` of ``out`` left beside it.

    ``.<name>.*.tmp``: a partial new directory. ``.<name>.*.old/<name>``: the previous ``out`` set aside for
    the rename; if ``out`` itself is missing the process died between the two renames, and the previous
    directory is put back (the new one may be incomplete), else it is removed.
    """
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.old"):
        kept = p / out.name
        if kept.is_dir() and not out.exists():
            warnings.warn(f"restoring {out} from {kept} (an interrupted replacement)", stacklevel=3)
            os.replace(kept, out)
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def write_dir_atomically(output: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                         what: str = "--output") -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory next to ``output``, then rename it to ``output``.

    An interrupted write leaves ``output`` as it was (and no partial directory under its name); what it left
    beside it (``.<name>.*.tmp`` / ``.old``) is cleaned by the next call. An existing ``output`` is an error
    unless ``overwrite``; then it is replaced only after the new one is complete. The directory gets the
    permissions the umask gives (``mkdtemp`` alone would make it private: 0700).
    """
    out = Path(output).absolute()
    check_writable_dir(out, what)
    out = out.resolve()
    _clean_interrupted(out)
    if out.exists() and not overwrite:
        raise CLIError(f"{what} {str(output)!r} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"{what} {str(output)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
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
