"""Loading a model to evaluate: a merged (plain transformers) checkpoint, a stage-1 or a stage-2 adapter.

* ``model`` a plain checkpoint directory or hub name (``medcare merge`` output, any causal LM): loaded as is.
* ``model`` an adapter directory (``adapter.safetensors``: a ``medcare train`` output or one of its
  ``checkpoint-*``, the demo's ``stage1/``/``stage2/``): its base model is the one the adapter records
  (``base_model`` in ``medcare_config.json``); stage 1 is rebuilt with the routed experts active
  (:func:`~medcare.apply_stage1` + :func:`~medcare.load_adapter`), stage 2 with the stage-1 attention LoRA
  folded and base + orthogonal LoRA on the FFN linears (:func:`~medcare.to_stage2` + ``load_adapter``).
* ``model`` a base model and ``adapter`` an adapter directory: the same, with that base.

The tokenizer comes from ``tokenizer``, else the adapter directory when it holds one (the trainer saves it
there), else the base model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EvalLoadError", "LoadedModel", "is_adapter_dir", "load_for_eval"]


class EvalLoadError(ValueError):
    """The model, adapter or tokenizer to evaluate cannot be loaded (the message names the argument)."""


@dataclass
class LoadedModel:
    """A model ready to evaluate (eval mode, on its device) with its tokenizer and what it was built from."""

    model: Any
    tokenizer: Any
    kind: str  # "merged" (a plain checkpoint), "stage1" or "stage2"
    base: str
    adapter: str | None = None

    @property
    def description(self) -> str:
        if self.adapter is None:
            return f"{self.base} (plain checkpoint)"
        return f"{self.adapter} (stage-{self.kind[-1]} adapter on {self.base})"


def is_adapter_dir(path: str) -> bool:
    """True when ``path`` is a directory holding a MedCare adapter (``adapter.safetensors``)."""
    from medcare.adapters import ADAPTER_WEIGHTS_NAME

    return Path(path).is_dir() and (Path(path) / ADAPTER_WEIGHTS_NAME).is_file()


def _local(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def _load_causal_lm(path: str, dtype: Any, trust_remote_code: bool, what: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(_local(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalLoadError(f"cannot load a causal LM from {what} {path!r}: {e}") from e


def _load_tokenizer(sources: list[tuple[str, str]], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    errors = []
    for path, what in sources:
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in ("tokenizer.json",
                                                                               "tokenizer_config.json")):
            continue
        try:
            return AutoTokenizer.from_pretrained(_local(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            errors.append(f"{what} {path!r}: {e}")
    raise EvalLoadError("cannot load a tokenizer from " + ("; ".join(errors) or " or ".join(
        f"{what} {path!r}" for path, what in sources)) + " (pass --tokenizer)")


def load_for_eval(model: str, adapter: str | None = None, tokenizer: str | None = None, bf16: bool = False,
                  device: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load what ``medcare eval --model MODEL [--adapter ADAPTER]`` evaluates (see the module doc).

    ``bf16``: the base weights in bfloat16 (the adapter keeps its own dtype); otherwise the checkpoint's dtype.
    ``device``: default ``cuda`` when available, else ``cpu``. Raises :class:`EvalLoadError` or
    :class:`~medcare.adapters.AdapterError` naming what could not be loaded.
    """
    import torch

    from medcare import MedCareConfig, apply_stage1, load_adapter, to_stage2
    from medcare.adapters import read_adapter

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalLoadError(f"--device {device}: no CUDA device is visible to torch")
    dtype = torch.bfloat16 if bf16 else "auto"
    if adapter is not None and is_adapter_dir(model):
        raise EvalLoadError(f"--model {model!r} is itself an adapter directory; --adapter goes with a base model")
    if adapter is None and not is_adapter_dir(model):
        if Path(model).is_dir() and not (Path(model) / "config.json").is_file():
            raise EvalLoadError(f"--model {model!r} holds neither a model (config.json) nor a MedCare adapter "
                                "(adapter.safetensors)")
        net = _load_causal_lm(model, dtype, trust_remote_code, "--model")
        tok = _load_tokenizer([(tokenizer, "--tokenizer")] if tokenizer else [(model, "--model")], trust_remote_code)
        return LoadedModel(net.to(device).eval(), tok, "merged", model)

    adapter_dir = adapter if adapter is not None else model
    what = "--adapter" if adapter is not None else "--model"
    if adapter is not None and not is_adapter_dir(adapter):
        raise EvalLoadError(f"--adapter {adapter!r} is not a MedCare adapter directory (no adapter.safetensors)")
    meta, _ = read_adapter(adapter_dir)
    stage, config = meta.get("stage"), meta.get("config")
    if stage not in (1, 2) or config is None:
        raise EvalLoadError(f"{what} {adapter_dir!r}: the adapter has no stage or MedCareConfig "
                            f"(stage {stage!r}); was it written by medcare train or save_adapter?")
    if adapter is not None:
        base, base_what = model, "--model"
    else:
        base = meta.get("base_model") or ""
        base_what = f"the base model recorded in {adapter_dir}/medcare_config.json"
        if not base:
            raise EvalLoadError(f"--model {model!r}: the adapter does not record its base model; pass the base "
                                f"model and the adapter: --model BASE --adapter {model}")
    net = _load_causal_lm(base, dtype, trust_remote_code, base_what)
    cfg = MedCareConfig.from_dict(config)
    if stage == 1:
        apply_stage1(net, cfg)
    else:
        with warnings.catch_warnings():  # the zero base LoRA is filled by load_adapter right after
            warnings.filterwarnings("ignore", message="to_stage2: the model has no stage-1 MoLoRA layers")
            to_stage2(net, cfg)
    load_adapter(net, adapter_dir)
    sources = [(tokenizer, "--tokenizer")] if tokenizer else [(adapter_dir, what), (base, base_what)]
    tok = _load_tokenizer(sources, trust_remote_code)
    return LoadedModel(net.to(device).eval(), tok, f"stage{stage}", base, str(adapter_dir))
