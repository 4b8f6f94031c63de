"""Drop-in replacements for a frozen ``nn.Linear``: MoLoRA (stage 1 FFN), LoRA (stage 1 attention) and
base + orth LoRA (stage 2 FFN). Each calls one ``medcare_kernels`` op per forward.

Conventions shared by the three wrappers:

* The wrapped linear's ``weight`` and ``bias`` Parameters are registered on the wrapper *by reference*
  (same Parameter objects, frozen: ``requires_grad=False``), so state-dict keys stay ``<name>.weight`` /
  ``<name>.bias`` and nothing of the base layer's size is allocated or copied.
* Every adapter tensor is a plain ``nn.Parameter`` registered on the wrapper (the router is an
  ``nn.Linear`` submodule ``router``): no views into shared buffers, so DDP, FSDP2 ``fully_shard`` and
  ZeRO-3 see ordinary parameters. The wrappers are ZeRO-3 leaf modules (``_z3_leaf``), and accept a base
  weight that ZeRO-3 partitioned while loading (its full shape is ``ds_shape``): see
  :mod:`medcare.distributed` and ``docs/distributed.md``.
* LoRA init: ``A`` Kaiming-uniform (``a=sqrt(5)``, fan-in ``d_in`` per expert), ``B`` zeros, so a freshly
  wrapped layer computes exactly the base layer. The router has ``nn.Linear``'s default init
  (``U(-1/sqrt(d_in), 1/sqrt(d_in))`` for weight and bias): near-uniform routing at the start.
* Dropout applies to the LoRA input only (``lora_x=dropout(x)``), in training mode with ``dropout > 0``.
* Under ``torch.autocast`` the input, weight and bias are cast to the autocast dtype and the op runs with
  autocast off (the op accumulates the LoRA part in float32 itself).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

import medcare_kernels as mk
from medcare.config import MedCareConfig
from medcare.distributed import param_shape

__all__ = ["LoRALinear", "MoLoRALinear", "OrthLoRALinear"]


def _resolve_config(config: MedCareConfig | None, overrides: dict[str, Any]) -> MedCareConfig:
    if config is not None and not isinstance(config, MedCareConfig):
        raise TypeError(f"config must be a MedCareConfig or None, got {type(config).__name__}")
    config = config or MedCareConfig()
    return config.replace(**overrides) if overrides else config


def _check_base(weight: object, bias: object) -> tuple[nn.Parameter, nn.Parameter | None]:
    # param_shape: a ZeRO-3 weight partitioned while loading (deepspeed.zero.Init) is empty on this rank
    if not isinstance(weight, nn.Parameter) or len(param_shape(weight)) != 2:
        raise TypeError(f"weight must be the 2-D nn.Parameter [d_out, d_in] of an nn.Linear, got "
                        f"{type(weight).__name__}{list(param_shape(weight)) if isinstance(weight, Tensor) else ''}")
    d_out = param_shape(weight)[0]
    if bias is not None and (not isinstance(bias, nn.Parameter) or tuple(param_shape(bias)) != (d_out,)):
        raise TypeError(f"bias must be None or an nn.Parameter of shape [d_out] = [{d_out}], got "
                        f"{type(bias).__name__}{list(param_shape(bias)) if isinstance(bias, Tensor) else ''}")
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    return weight, bias


def _check_linear(linear: object) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return linear


def _kaiming_(t: Tensor) -> Tensor:
    """Kaiming-uniform (a=sqrt(5)) per [r, d_in] matrix: fan-in d_in, as nn.Linear initialises weights."""
    with torch.no_grad():
        if t.dim() == 2:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        else:
            for m in t:
                nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return t


class _AdapterLinear(nn.Module):
    """What the wrappers share: the base weight/bias by reference, LoRA scale, dropout, dtype handling."""

    # DeepSpeed ZeRO-3 "leaf" module (``deepspeed.utils.set_z3_leaf_modules`` sets the same flag): entering
    # the wrapper fetches all its parameters, the router's included. The forward reads ``router.weight``
    # without calling the ``router`` submodule, whose own fetch hook would therefore never run.
    _z3_leaf = True

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: MedCareConfig):
        super().__init__()
        weight, bias = _check_base(weight, bias)
        self.out_features, self.in_features = param_shape(weight)
        self.weight = weight
        self.bias = bias
        self.scaling = config.scaling
        self.backend = config.backend
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _new_param(self, *shape: int, dtype: torch.dtype) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=self.weight.device))

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, contextlib.AbstractContextManager]:
        """(x, weight, bias) in one dtype, the LoRA input, and the context the op runs in."""
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            ctx = torch.autocast(device_type, enabled=False)
        else:
            dt = weight.dtype
        if x.dtype != dt:
            x = x.to(dt)
        if weight.dtype != dt:
            weight = weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        return x, weight, bias, ctx

    def _lora_x(self, x: Tensor) -> Tensor | None:
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            return self.lora_dropout(x)
        return None

    def _base_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding this wrapper's (same) weight and bias Parameters; no allocation."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @torch.no_grad()
    def _fold(self, lora_A: Tensor, lora_B: Tensor) -> None:
        """``W += scaling * B @ A`` (in float32, or float64 for float64 weights), in place."""
        fold_into(self.weight, lora_A, lora_B, self.scaling)


@torch.no_grad()
def fold_into(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
    """In place: ``weight += scaling * lora_B @ lora_A`` computed in float32 (float64 for float64 weights)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_B.to(weight.device, acc) @ lora_A.to(weight.device, acc)
    weight.copy_((weight.to(acc) + scaling * delta).to(weight.dtype))


class MoLoRALinear(_AdapterLinear):
    """Stage-1 FFN linear: frozen ``W, b`` + ``E`` routed LoRA experts (top-k per token) + a shared LoRA.

    ``y = x @ W.T + b + sum_j w_j * s * (lx @ A[i_j].T @ B[i_j].T) + s * (lx @ A_s.T @ B_s.T)`` with
    ``(w, i) = route(router(x), k)`` (softmax, top-k, renormalised) and ``lx = dropout(x)``.

    Parameters: ``router`` (``nn.Linear``: weight ``[E, d_in]``, bias ``[E]``), ``lora_A [E, r, d_in]``,
    ``lora_B [E, d_out, r]``, ``shared_A [r_s, d_in]``, ``shared_B [d_out, r_s]`` with ``r_s = r*num_shared``.

    ``last_router_logits`` holds the float32 ``[T, E]`` router logits of the last forward for
    :func:`medcare.router_aux_loss`: part of the autograd graph in training mode, detached in eval mode.
    A plain attribute assignment in ``forward``: ``torch.compile(fullgraph=True)`` traces it, and with
    (non-reentrant) gradient checkpointing the first forward's logits carry the graph.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: MedCareConfig | None = None,
                 **overrides: Any):
        config = _resolve_config(config, overrides)
        super().__init__(weight, bias, config)
        E, r, r_s = config.num_experts, config.r, config.shared_rank
        d_out, d_in = self.out_features, self.in_features
        dtype = config.param_dtype(weight.dtype)
        self.num_experts, self.top_k, self.r, self.shared_rank = E, config.top_k, r, r_s
        self.router = nn.Linear(d_in, E, bias=True, device=weight.device, dtype=dtype)
        self.lora_A = self._new_param(E, r, d_in, dtype=dtype)
        self.lora_B = self._new_param(E, d_out, r, dtype=dtype)
        self.shared_A = self._new_param(r_s, d_in, dtype=dtype)
        self.shared_B = self._new_param(d_out, r_s, dtype=dtype)
        self.last_router_logits: Tensor | None = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: MedCareConfig | None = None, **overrides: Any) -> MoLoRALinear:
        """Wrap ``linear`` (its weight and bias are shared, and frozen). ``overrides`` replace config fields."""
        linear = _check_linear(linear)
        return cls(linear.weight, linear.bias, config, **overrides)

    def reset_lora_parameters(self) -> None:
        """A's Kaiming-uniform, B's zero, router as ``nn.Linear``'s default."""
        self.router.reset_parameters()
        _kaiming_(self.lora_A)
        _kaiming_(self.shared_A)
        with torch.no_grad():
            self.lora_B.zero_()
            self.shared_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, ctx = self._inputs(x)
        with ctx:
            y, logits = mk.molora_linear(x, weight, bias, self.router.weight, self.router.bias, self.lora_A,
                                         self.lora_B, self.shared_A, self.shared_B, top_k=self.top_k,
                                         scaling=self.scaling, lora_x=self._lora_x(x), backend=self.backend)
        # kept for router_aux_loss; outside training without the graph (nothing to backpropagate into)
        self.last_router_logits = logits if self.training else logits.detach()
        return y

    def extra_repr(self) -> str:
        return (f"{self._base_repr()}, E={self.num_experts}, k={self.top_k}, r={self.r}, r_s={self.shared_rank}, "
                f"scaling={self.scaling:g}")


class LoRALinear(_AdapterLinear):
    """Stage-1 attention linear: ``y = x @ W.T + b + s * (dropout(x) @ A.T) @ B.T``.

    Parameters: ``lora_A [r, d_in]`` (Kaiming-uniform), ``lora_B [d_out, r]`` (zeros).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: MedCareConfig | None = None,
                 **overrides: Any):
        config = _resolve_config(config, overrides)
        super().__init__(weight, bias, config)
        dtype = config.param_dtype(weight.dtype)
        self.r = config.r
        self.lora_A = self._new_param(self.r, self.in_features, dtype=dtype)
        self.lora_B = self._new_param(self.out_features, self.r, dtype=dtype)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: MedCareConfig | None = None, **overrides: Any) -> LoRALinear:
        """Wrap ``linear`` (its weight and bias are shared, and frozen). ``overrides`` replace config fields."""
        linear = _check_linear(linear)
        return cls(linear.weight, linear.bias, config, **overrides)

    def reset_lora_parameters(self) -> None:
        _kaiming_(self.lora_A)
        with torch.no_grad():
            self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, ctx = self._inputs(x)
        with ctx:
            return mk.lora_linear(x, weight, bias, self.lora_A, self.lora_B, scaling=self.scaling,
                                  lora_x=self._lora_x(x), backend=self.backend)

    def merge(self) -> nn.Linear:
        """Fold the LoRA into the (shared) base weight in place and return the plain ``nn.Linear``."""
        self._fold(self.lora_A, self.lora_B)
        return self.to_linear()

    def extra_repr(self) -> str:
        return f"{self._base_repr()}, r={self.r}, scaling={self.scaling:g}"


class OrthLoRALinear(_AdapterLinear):
    """Stage-2 FFN linear: frozen base LoRA (the stage-1 shared experts) + trainable orth LoRA, same rank.

    ``y = x @ W.T + b + s * (lx @ A_base.T @ B_base.T) + s * (lx @ A_orth.T @ B_orth.T)``, computed as one
    ``lora_linear`` call on ``[A_base; A_orth]`` and ``[B_base | B_orth]``; gradients reach only the orth
    half when the base pair is frozen (``freeze_base``).

    Parameters: ``base_A [r_s, d_in]``, ``base_B [d_out, r_s]``, ``orth_A [r_s, d_in]`` (Kaiming-uniform),
    ``orth_B [d_out, r_s]`` (zeros). ``shared_rank`` is ``r_s``, as on :class:`MoLoRALinear` (whose shared
    LoRA the base LoRA is).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: MedCareConfig | None = None, *,
                 base_A: Tensor | None = None, base_B: Tensor | None = None, **overrides: Any):
        config = _resolve_config(config, overrides)
        super().__init__(weight, bias, config)
        d_out, d_in = self.out_features, self.in_features
        if (base_A is None) != (base_B is None):
            raise ValueError("base_A and base_B must be given together (or neither: a zero base LoRA)")
        if base_A is not None:
            if base_A.dim() != 2 or base_A.shape[1] != d_in:
                raise ValueError(f"base_A must have shape [r_s, d_in] = [r_s, {d_in}], got {list(base_A.shape)}")
            r_s = base_A.shape[0]
            if tuple(base_B.shape) != (d_out, r_s):
                raise ValueError(f"base_B must have shape [d_out, r_s] = [{d_out}, {r_s}], got {list(base_B.shape)}")
            dtype = base_A.dtype
        else:
            r_s, dtype = config.shared_rank, config.param_dtype(weight.dtype)
        self.shared_rank = r_s
        self.base_A = self._new_param(r_s, d_in, dtype=dtype)
        self.base_B = self._new_param(d_out, r_s, dtype=dtype)
        self.orth_A = self._new_param(r_s, d_in, dtype=dtype)
        self.orth_B = self._new_param(d_out, r_s, dtype=dtype)
        with torch.no_grad():
            if base_A is not None:
                self.base_A.copy_(base_A)
                self.base_B.copy_(base_B)
        self.reset_lora_parameters()
        self.base_A.requires_grad_(not config.freeze_base)
        self.base_B.requires_grad_(not config.freeze_base)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: MedCareConfig | None = None, *, base_A: Tensor | None = None,
                    base_B: Tensor | None = None, **overrides: Any) -> OrthLoRALinear:
        """Wrap ``linear``; the base LoRA is ``(base_A, base_B)`` or zeros (to fill with ``load_adapter``)."""
        linear = _check_linear(linear)
        return cls(linear.weight, linear.bias, config, base_A=base_A, base_B=base_B, **overrides)

    @classmethod
    def from_molora(cls, module: MoLoRALinear, config: MedCareConfig | None = None,
                    **overrides: Any) -> OrthLoRALinear:
        """Stage 1 -> 2: the routed experts and router are dropped; the shared LoRA becomes the base LoRA.

        The LoRA scale must be the stage-1 module's (the base LoRA keeps its contribution exactly).
        """
        if not isinstance(module, MoLoRALinear):
            raise TypeError(f"module must be a MoLoRALinear, got {type(module).__name__}")
        config = _resolve_config(config, overrides)
        if not math.isclose(config.scaling, module.scaling, rel_tol=1e-12):
            raise ValueError(f"the stage-2 LoRA scale (alpha/r = {config.scaling:g}) must equal the stage-1 "
                             f"module's ({module.scaling:g}): use the stage-1 r, alpha and use_rslora")
        return cls(module.weight, module.bias, config, base_A=module.shared_A.detach(),
                   base_B=module.shared_B.detach())

    def reset_lora_parameters(self) -> None:
        """Reset the orth pair only (A Kaiming-uniform, B zeros); the base pair is left as it is."""
        _kaiming_(self.orth_A)
        with torch.no_grad():
            self.orth_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, ctx = self._inputs(x)
        lora_A = torch.cat([self.base_A, self.orth_A], dim=0)
        lora_B = torch.cat([self.base_B, self.orth_B], dim=1)
        with ctx:
            return mk.lora_linear(x, weight, bias, lora_A, lora_B, scaling=self.scaling, lora_x=self._lora_x(x),
                                  backend=self.backend)

    def merge(self) -> nn.Linear:
        """Fold base and orth LoRA into the (shared) base weight in place; return the plain ``nn.Linear``."""
        self._fold(torch.cat([self.base_A, self.orth_A], 0), torch.cat([self.base_B, self.orth_B], 1))
        return self.to_linear()

    @property
    def rank(self) -> int:
        """Deprecated alias of :attr:`shared_rank` (the name ``MoLoRALinear`` and ``MedCareConfig`` use)."""
        warnings.warn("OrthLoRALinear.rank is deprecated: use OrthLoRALinear.shared_rank (the same number)",
                      DeprecationWarning, stacklevel=2)
        return self.shared_rank

    def extra_repr(self) -> str:
        frozen = "frozen" if not self.base_A.requires_grad else "trainable"
        return (f"{self._base_repr()}, r_s={self.shared_rank} (base, {frozen}) + {self.shared_rank} (orth), "
                f"scaling={self.scaling:g}")
