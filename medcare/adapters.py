"""Adapter files: ``adapter.safetensors`` + ``medcare_config.json`` in one directory.

``adapter.safetensors`` holds the adapter tensors of every MedCare wrapper, keyed ``<module name>.<param>``
(``model.layers.0.mlp.gate_proj.lora_A``, ``...router.weight``, ``...base_A``), and, in its header
metadata (key ``"medcare"``), the same JSON document as ``medcare_config.json``: format version, library
version, stage, base model name, the :class:`MedCareConfig`, one entry per module (kind, sizes, LoRA scale)
and every tensor's shape and dtype. The safetensors file is the authority; the JSON file is its
human-readable copy (a mismatch, e.g. after an interrupted save, only warns).

Module kinds: ``"molora"`` (stage 1 FFN: ``router.weight``, ``router.bias``, ``lora_A``, ``lora_B``,
``shared_A``, ``shared_B``), ``"orth"`` (stage 2 FFN: ``base_A``, ``base_B``, ``orth_A``, ``orth_B``) and
``"lora"`` (attention: ``lora_A``, ``lora_B``; ``"merged": true`` once folded into the base weight: the
adapter keeps it so that a fresh base model can be rebuilt from the adapter alone).

Loading (:func:`load_adapter`) reads and checks everything (file integrity, stage, module names and kinds,
shapes, LoRA scales) before it changes the model; any mismatch raises :class:`AdapterError` listing the
offending keys, and the model is left as it was. Where a module goes:

=============  ======================  ==========================================================
adapter kind   model module            action
=============  ======================  ==========================================================
molora         MoLoRALinear            copy every tensor (resume stage 1)
molora         OrthLoRALinear          base LoRA <- shared experts (stage 1 -> 2); orth untouched
orth           OrthLoRALinear          copy every tensor (resume stage 2)
lora           LoRALinear              copy
lora           nn.Linear               fold ``W += s * B @ A`` unless the same LoRA is already folded
=============  ======================  ==========================================================

Writes are atomic: each file is written to a temporary file in the same directory, flushed and fsynced,
then renamed over the old one; the safetensors rename is the commit point. The files get the permissions
the umask gives (0644 under the usual 022), and the temporary files of a save that was killed are removed
by the next save into the same directory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from medcare.config import MedCareConfig
from medcare.distributed import copy_full_, full_params, gathered, is_global_rank_zero, param_shape
from medcare.modules import LoRALinear, MoLoRALinear, OrthLoRALinear
from medcare.stages import _WRAPPERS, _refresh_cache, fold_recorded, merged_records, model_stage

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterError", "atomic_write", "atomic_write_text",
           "current_umask", "load_adapter", "read_adapter", "remove_interrupted_writes", "save_adapter"]

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "medcare_config.json"
FORMAT = "medcare-adapter"
FORMAT_VERSION = 1

_TENSORS = {
    "molora": ("router.weight", "router.bias", "lora_A", "lora_B", "shared_A", "shared_B"),
    "orth": ("base_A", "base_B", "orth_A", "orth_B"),
    "lora": ("lora_A", "lora_B"),
}


class AdapterError(ValueError):
    """An adapter cannot be read, or does not fit the model. ``keys`` lists the offending keys."""

    def __init__(self, message: str, keys: list[str] | None = None):
        super().__init__(message)
        self.keys = list(keys or [])


# ---- saving -------------------------------------------------------------------------------------------

def _module_entry(m: nn.Module) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    base = {"in_features": m.in_features, "out_features": m.out_features, "scaling": m.scaling}
    if isinstance(m, MoLoRALinear):
        info = {"kind": "molora", **base, "num_experts": m.num_experts, "top_k": m.top_k, "r": m.r,
                "shared_rank": m.shared_rank}
        tensors = {"router.weight": m.router.weight, "router.bias": m.router.bias, "lora_A": m.lora_A,
                   "lora_B": m.lora_B, "shared_A": m.shared_A, "shared_B": m.shared_B}
    elif isinstance(m, OrthLoRALinear):
        info = {"kind": "orth", **base, "rank": m.shared_rank}  # the file's key stays "rank" (format 1)
        tensors = {"base_A": m.base_A, "base_B": m.base_B, "orth_A": m.orth_A, "orth_B": m.orth_B}
    else:
        info = {"kind": "lora", **base, "r": m.r, "merged": False}
        tensors = {"lora_A": m.lora_A, "lora_B": m.lora_B}
    return info["kind"], info, tensors


def _base_model_name(model: nn.Module) -> str:
    """Where the base model was loaded from (``config._name_or_path``): a hub name, or a local directory made
    absolute, so that the adapter finds its base from any working directory (``medcare eval --model DIR``)."""
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc read first)
    os.umask(mask)
    return mask


def remove_interrupted_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted adapter saves left in ``directory``; returns them.

    Only this module's own pattern (``.adapter.safetensors.*.tmp``, ``.medcare_config.json.*.tmp``) is touched.
    """
    d = Path(directory)
    removed = []
    if d.is_dir():
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            for p in d.glob(f".{glob.escape(name)}.*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 ``text``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which gets the umask's
    permissions, is synced and renamed over ``path``; a failure leaves ``path`` as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600; safetensors keeps that mode): give it what the umask gives
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_adapter(model: nn.Module, path: str | os.PathLike, *, config: MedCareConfig | None = None,
                 base_model_name: str | None = None, is_main_process: bool | None = None) -> Path:
    """Write the model's MedCare adapter to the directory ``path`` (created if needed); returns it.

    Saves every wrapper's adapter tensors (frozen ones included: a stage-2 adapter carries its base LoRA)
    and every attention LoRA already folded into the base weights. ``config`` defaults to
    ``model.medcare_config``; ``base_model_name`` to ``model.config._name_or_path`` (a local directory made
    absolute): the base model that ``medcare train --stage 2``, ``medcare merge`` and ``medcare eval`` load. Atomic
    per file.

    Distributed: only the main process writes (``is_main_process``, default:
    :func:`medcare.distributed.is_global_rank_zero`). Sharded parameters (FSDP2, ZeRO-3) are gathered to full
    tensors first, which is a collective: then call it on every rank (``MedCareTrainer`` does). Under DDP any
    rank may call it alone.
    """
    config = config if config is not None else getattr(model, "medcare_config", None)
    if config is not None and not isinstance(config, MedCareConfig):
        raise TypeError(f"config must be a MedCareConfig or None, got {type(config).__name__}")
    stage = model_stage(model)
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, _WRAPPERS):
            _, info, ts = _module_entry(m)
            modules[name] = info
            tensors.update({f"{name}.{k}": v for k, v in ts.items()})
    for name, rec in merged_records(model).items():
        if name in modules:
            continue
        A, B = rec["lora_A"], rec["lora_B"]
        modules[name] = {"kind": "lora", "in_features": A.shape[1], "out_features": B.shape[0],
                         "scaling": rec["scaling"], "r": A.shape[0], "merged": True}
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
    if not modules:
        raise ValueError("the model holds no MedCare layers to save: call apply_stage1 or to_stage2 first")
    names = list(tensors)
    with torch.no_grad():
        full = full_params([tensors[k] for k in names])
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in zip(names, full)}
    if not (is_main_process if is_main_process is not None else is_global_rank_zero()):
        return Path(path)
    from medcare_kernels import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "save_id": uuid.uuid4().hex,
        "stage": stage,
        "base_model": base_model_name if base_model_name is not None else _base_model_name(model),
        "config": None if config is None else config.to_dict(),
        "modules": modules,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(out)  # what a killed save of this directory left behind

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"medcare": text}))
    atomic_write(out / ADAPTER_CONFIG_NAME, write_json)
    return out


# ---- reading ------------------------------------------------------------------------------------------

def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and check an adapter directory (or its ``adapter.safetensors``) -> ``(metadata, tensors)``.

    Raises :class:`AdapterError` for a missing, truncated or corrupt file and for tensors that disagree
    with the metadata. Touches no model.
    """
    p = Path(path)
    file = p / ADAPTER_WEIGHTS_NAME if p.is_dir() else p
    if not file.is_file():
        raise AdapterError(f"no adapter at {p}: expected {ADAPTER_WEIGHTS_NAME} (written by save_adapter)")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise AdapterError(f"cannot read {file}: {e} (truncated, corrupt or not a safetensors file)") from e
    try:
        meta = json.loads(header["medcare"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file} has no MedCare metadata: not an adapter written by save_adapter") from e
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise AdapterError(f"{file}: unknown adapter format {meta.get('format')!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise AdapterError(f"{file}: adapter format version {meta['format_version']} is newer than this library's "
                           f"({FORMAT_VERSION}); upgrade medcare-kernels")
    expected = meta.get("tensors", {})
    bad = sorted(set(expected) ^ set(tensors))
    bad += sorted(k for k in set(expected) & set(tensors) if list(tensors[k].shape) != expected[k]["shape"])
    for name, info in meta.get("modules", {}).items():
        kind = info.get("kind")
        if kind not in _TENSORS:
            bad.append(f"{name} (unknown module kind {kind!r})")
            continue
        bad += [f"{name}.{t}" for t in _TENSORS[kind] if f"{name}.{t}" not in tensors]
    if bad:
        raise AdapterError(f"{file} is inconsistent with its own metadata at keys {bad}", bad)
    json_file = file.parent / ADAPTER_CONFIG_NAME
    if json_file.is_file():
        try:
            side = json.loads(json_file.read_text(encoding="utf-8"))
            if side.get("save_id") != meta.get("save_id"):
                warnings.warn(f"{json_file} is from another save than {file.name} (an interrupted save?); "
                              f"using the metadata inside {file.name}", stacklevel=2)
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"{json_file} is unreadable; using the metadata inside {file.name}", stacklevel=2)
    return meta, tensors


# ---- loading ------------------------------------------------------------------------------------------

def _scaling_ok(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load an adapter written by :func:`save_adapter` into ``model``; returns the adapter's metadata.

    * stage-1 adapter into a stage-1 model (``apply_stage1``): every tensor is restored.
    * stage-1 adapter into a stage-2 model (``to_stage2``): each OrthLoRA base LoRA is initialised from the
      shared experts; attention LoRAs are folded into plain attention weights. This is how a new process
      builds stage 2 from a stage-1 run: ``to_stage2(model, cfg)`` then ``load_adapter(model, stage1_dir)``.
    * stage-2 adapter into a stage-2 model: every tensor is restored (base, orth, folded attention).

    Everything is checked before the model changes; a mismatch raises :class:`AdapterError` listing the
    offending keys and leaves the model untouched. Tensors are cast to the parameters' dtype and device.
    """
    meta, tensors = read_adapter(path)
    a_stage, m_stage = meta.get("stage"), model_stage(model)
    if m_stage == 0:
        raise AdapterError(f"the model holds no MedCare layers: call apply_stage1(model, cfg) or to_stage2(model, cfg) "
                           f"before loading a stage-{a_stage} adapter")
    if a_stage == 2 and m_stage == 1:
        raise AdapterError("this is a stage-2 adapter and the model is in stage 1: call to_stage2(model, cfg) first")
    a_base, m_base = meta.get("base_model") or "", _base_model_name(model)
    if a_base and m_base and a_base != m_base:
        warnings.warn(f"adapter was saved from base model {a_base!r}, loading into {m_base!r}", stacklevel=2)

    modules = dict(model.named_modules())
    records = merged_records(model)
    problems: list[str] = []
    keys: list[str] = []
    copies: list[tuple[Tensor, Tensor]] = []
    folds: list[tuple[str, Tensor, Tensor, float]] = []
    covered: set[str] = set()

    def want(param: Tensor, name: str, key: str) -> None:
        t = tensors[f"{name}.{key}"]
        if tuple(t.shape) != tuple(param_shape(param)):
            problems.append(f"{name}.{key}: adapter shape {list(t.shape)}, model expects {list(param_shape(param))}")
            keys.append(f"{name}.{key}")
        else:
            copies.append((param, t))

    for name, info in meta["modules"].items():
        kind, m = info["kind"], modules.get(name)
        if m is None:
            problems.append(f"{name}: no such module in the model")
            keys.append(name)
            continue
        if isinstance(m, _WRAPPERS) and not _scaling_ok(info["scaling"], m.scaling):
            problems.append(f"{name}: adapter LoRA scale {info['scaling']:g} != model's {m.scaling:g} (alpha/r)")
            keys.append(name)
            continue
        if kind == "molora" and isinstance(m, MoLoRALinear):
            for key, p in zip(_TENSORS["molora"], (m.router.weight, m.router.bias, m.lora_A, m.lora_B, m.shared_A,
                                                   m.shared_B)):
                want(p, name, key)
        elif kind == "molora" and isinstance(m, OrthLoRALinear):
            want(m.base_A, name, "shared_A")
            want(m.base_B, name, "shared_B")
        elif kind == "orth" and isinstance(m, OrthLoRALinear):
            for key, p in zip(_TENSORS["orth"], (m.base_A, m.base_B, m.orth_A, m.orth_B)):
                want(p, name, key)
        elif kind == "lora" and isinstance(m, LoRALinear):
            want(m.lora_A, name, "lora_A")
            want(m.lora_B, name, "lora_B")
        elif kind == "lora" and type(m) is nn.Linear:
            A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            if A.shape[1] != m.in_features or B.shape[0] != m.out_features or A.shape[0] != B.shape[1]:
                problems.append(f"{name}.lora_A/lora_B: adapter shapes {list(A.shape)}/{list(B.shape)} do not fit "
                                f"nn.Linear({m.in_features}, {m.out_features})")
                keys.append(f"{name}.lora_A")
            elif name in records:
                rec = records[name]
                same = (rec["lora_A"].shape == A.shape and rec["lora_B"].shape == B.shape
                        and torch.equal(rec["lora_A"].to(A.dtype), A) and torch.equal(rec["lora_B"].to(B.dtype), B)
                        and _scaling_ok(rec["scaling"], info["scaling"]))
                if not same:
                    problems.append(f"{name}: another attention LoRA is already folded into this weight")
                    keys.append(f"{name}.lora_A")
            else:
                folds.append((name, A, B, float(info["scaling"])))
        else:
            problems.append(f"{name}: adapter module of kind {kind!r} does not fit the model's {type(m).__name__}")
            keys.append(name)
            continue
        covered.add(name)
    for name, m in modules.items():
        if isinstance(m, _WRAPPERS) and name not in covered and name not in meta["modules"]:
            problems.append(f"{name}: the model's {type(m).__name__} is missing from the adapter")
            keys.append(name)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterError(f"adapter {path} (stage {a_stage}) does not fit the model (stage {m_stage}); "
                           f"the model is unchanged:\n  {shown}", keys)

    # Sharded parameters (resume under FSDP2, stage 2 under ZeRO-3): each rank writes its part; ZeRO-3
    # weights are gathered around the write (a collective: every rank loads the adapter).
    with torch.no_grad():
        with gathered([p for p, _ in copies], modifier_rank=0):
            for p, t in copies:
                copy_full_(p, t)
        for name, A, B, s in folds:
            with gathered([model.get_submodule(name).weight], modifier_rank=0):
                fold_recorded(model, name, A, B, s)
    if getattr(model, "medcare_config", None) is None and meta.get("config") is not None:
        model.medcare_config = MedCareConfig.from_dict(meta["config"])
    _refresh_cache(model)
    return meta
