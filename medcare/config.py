"""``MedCareConfig``: every hyper-parameter of the two MedCare stages, validated, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medcare_kernels.backends import BACKENDS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclasses.dataclass
class MedCareConfig:
    """Hyper-parameters of MedCare (Liao et al., EMNLP 2024 Findings), both stages.

    Stage 1 (:func:`medcare.apply_stage1`): each FFN linear named by ``ffn_targets`` becomes a
    :class:`~medcare.MoLoRALinear` with ``num_experts`` routed LoRA experts of rank ``r`` (``top_k`` per
    token) and one shared LoRA of rank ``r * num_shared`` (the ``num_shared`` always-on experts stored as
    one LoRA); each attention linear named by ``attn_targets`` becomes a :class:`~medcare.LoRALinear` of
    rank ``r``. Stage 2 (:func:`medcare.to_stage2`): the shared LoRA becomes the frozen *base* LoRA of an
    :class:`~medcare.OrthLoRALinear` and a new *orth* LoRA of the same rank trains with the task loss plus
    ``orth_lambda * sum_l sum|A_base_l @ A_orth_l.T|``.

    Attributes:
        r: rank of each routed expert and of the attention LoRA.
        alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) for every
            LoRA of the model, routed, shared, base and orth alike.
        dropout: dropout probability on the LoRA input (the base linear and the router see ``x``).
        num_experts: routed experts per FFN linear (``E``). top_k: experts chosen per token.
        num_shared: shared experts per FFN linear; stored as one LoRA of rank ``r * num_shared``.
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        ffn_targets / attn_targets: which ``nn.Linear`` modules each group wraps, in one of two forms (the
            convention of PEFT's ``target_modules``):

            * a **list or tuple** of module-name *suffixes* (``("gate_proj", "up_proj")``, ``"mlp.gate_proj"``),
              matched at a ``.`` boundary against the linears inside the layers (``layers_pattern``). A
              suffix must name one place per layer: BERT's ``"output.dense"`` also ends
              ``attention.output.dense``, and such a collision is an error at :func:`medcare.apply_stage1`
              naming both places (write the longer suffix, or a regex).
            * a **single string** is a *regular expression* that must match the full module name
              (``re.fullmatch``), against every ``nn.Linear`` of the model (``layers_pattern`` does not apply),
              e.g. ``r"encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense"`` for BERT's FFN. On the
              command line, a value starting with ``re:`` is a regex (``--ffn_targets 're:...'``).

            ``attn_targets=()`` skips attention. A module matched by both groups is an error at
            :func:`medcare.apply_stage1` naming it; every group that matches nothing is reported at once.
        orth_lambda: stage-2 weight of the orthogonality penalty (``MedCareTrainer``).
        aux_loss_coef: stage-1 weight of the Switch-style router load-balancing loss; MedCare uses 0.
        freeze_base: keep the stage-2 base LoRA (the stage-1 shared experts) frozen; only the orth LoRA trains.
        backend: ``medcare_kernels`` backend for every op (``"auto"``, ``"torch"``, ...).
        lora_dtype: dtype of the LoRA and router parameters, ``"float32"`` by default even for bf16 models
            (the authors' choice); ``None`` uses the base weight's dtype.
        layers_pattern: the layer container's name; suffix targets match only under ``<pattern>.<index>.``
            (``model.layers.3.mlp.gate_proj``; ``"layer"`` for BERT's ``encoder.layer.3...``), so ``lm_head``
            or a vision tower are never wrapped.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 2
    use_rslora: bool = False
    ffn_targets: tuple[str, ...] | str = ("gate_proj", "up_proj", "down_proj")
    attn_targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    orth_lambda: float = 1.0
    aux_loss_coef: float = 0.0
    freeze_base: bool = True
    backend: str = "auto"
    lora_dtype: str | None = "float32"
    layers_pattern: str = "layers"

    def __post_init__(self) -> None:
        self.r = _int("r", self.r, 1)
        self.alpha = _real("alpha", self.alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        self.dropout = _real("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must satisfy 0 <= dropout < 1, got {self.dropout}")
        self.num_experts = _int("num_experts", self.num_experts, 1)
        self.top_k = _int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts = {self.num_experts}, got {self.top_k}")
        self.num_shared = _int("num_shared", self.num_shared, 1)
        self.use_rslora = _bool("use_rslora", self.use_rslora)
        self.freeze_base = _bool("freeze_base", self.freeze_base)
        self.ffn_targets = _names("ffn_targets", self.ffn_targets)
        self.attn_targets = _names("attn_targets", self.attn_targets)
        if not self.ffn_targets:
            raise ValueError("ffn_targets must name at least one FFN linear (e.g. ('gate_proj', 'up_proj', "
                             "'down_proj')): MedCare's experts live there")
        # the same suffix (or the same regex) in both groups; overlaps of different patterns are found on the
        # model itself, by apply_stage1
        if isinstance(self.ffn_targets, str) or isinstance(self.attn_targets, str):
            both = [self.ffn_targets] if self.ffn_targets == self.attn_targets else []
        else:
            both = sorted(set(self.ffn_targets) & set(self.attn_targets))
        if both:
            raise ValueError(f"ffn_targets and attn_targets must be disjoint, both contain {both}")
        self.orth_lambda = _real("orth_lambda", self.orth_lambda)
        self.aux_loss_coef = _real("aux_loss_coef", self.aux_loss_coef)
        for name in ("orth_lambda", "aux_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.backend, str) or self.backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {self.backend!r}")
        if self.lora_dtype is not None:
            if isinstance(self.lora_dtype, torch.dtype):
                self.lora_dtype = str(self.lora_dtype).removeprefix("torch.")
            if self.lora_dtype not in _DTYPES:
                raise ValueError(f"lora_dtype must be None or one of {sorted(_DTYPES)}, got {self.lora_dtype!r}")
        if not isinstance(self.layers_pattern, str) or not self.layers_pattern:
            raise ValueError(f"layers_pattern must be a non-empty str (e.g. 'layers'), got {self.layers_pattern!r}")

    @property
    def scaling(self) -> float:
        """The LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def shared_rank(self) -> int:
        """Rank of the shared LoRA (``r_s = r * num_shared``); also the stage-2 base and orth rank."""
        return self.r * self.num_shared

    def param_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of new LoRA/router parameters for a base weight of ``weight_dtype``."""
        return weight_dtype if self.lora_dtype is None else _DTYPES[self.lora_dtype]

    def replace(self, **changes: Any) -> MedCareConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MedCareConfig:
        """Inverse of :meth:`to_dict`. Unknown keys (a newer library's fields) are ignored with a warning."""
        if not isinstance(data, Mapping):
            raise TypeError(f"MedCareConfig.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"MedCareConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _names(name: str, value: object) -> tuple[str, ...] | str:
    """A tuple of module-name suffixes, or a str: a regular expression for the full module name."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must be a list of module-name suffixes or a non-empty regular expression, "
                             f"got ''")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name} is a string, i.e. a regular expression for the full module name, and "
                             f"{value!r} does not compile: {e}") from e
        return value
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of module-name suffixes, or a str (a regular expression "
                        f"for the full module name), got {value!r}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str) or not v or v.startswith(".") or v.endswith("."):
            raise ValueError(f"{name} must hold non-empty module-name suffixes such as 'gate_proj', got {v!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {list(out)}")
    return out
