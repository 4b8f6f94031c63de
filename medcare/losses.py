"""The two auxiliary losses: the stage-2 orthogonality penalty and a stage-1 router load-balancing loss."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import medcare_kernels as mk
from medcare.distributed import full_params
from medcare.modules import MoLoRALinear, OrthLoRALinear
from medcare.stages import wrapper_modules

__all__ = ["orthogonal_penalty", "router_aux_loss"]


def _layers(model_or_layers: nn.Module | Sequence[nn.Module], cls: type, what: str) -> Sequence[nn.Module]:
    if isinstance(model_or_layers, cls):
        return (model_or_layers,)
    if isinstance(model_or_layers, nn.Module):
        layers = wrapper_modules(model_or_layers, cls)
    elif isinstance(model_or_layers, Sequence):
        layers = model_or_layers
        bad = [type(m).__name__ for m in layers if not isinstance(m, cls)]
        if bad:
            raise TypeError(f"expected a model or a sequence of {cls.__name__}, got elements of type {bad[:3]}")
    else:
        raise TypeError(f"expected a model or a sequence of {cls.__name__}, got {type(model_or_layers).__name__}")
    if not layers:
        raise ValueError(f"the model holds no {cls.__name__} layers: {what}")
    return layers


def orthogonal_penalty(model: nn.Module | Sequence[OrthLoRALinear], *, backend: str | None = None) -> Tensor:
    """``P = sum_l sum(abs(A_base_l @ A_orth_l.T))`` over every :class:`OrthLoRALinear` layer.

    One fused ``medcare_kernels.orthogonal_penalty`` call over all layers (ragged ``d_in``). The layers are
    collected once per stage change (cached on the model), or pass the sequence of layers yourself.
    Returns a float32 scalar, differentiable w.r.t. the orth ``A``'s (and the base ``A``'s if trainable).
    ``backend`` defaults to the layers' own (``MedCareConfig.backend``). Under FSDP2 or ZeRO-3 the ``A``'s are
    gathered first (:func:`medcare.distributed.full_params`), gradient included: call it on every rank.
    """
    layers = _layers(model, OrthLoRALinear, "call to_stage2(model, config) first")
    be = layers[0].backend if backend is None else backend
    # Sharded parameters (FSDP2, ZeRO-3) are gathered differentiably: the penalty and its gradient are
    # those of the full matrices on every rank (a collective then: every rank computes the penalty).
    A = full_params([m.base_A for m in layers] + [m.orth_A for m in layers])
    return mk.orthogonal_penalty(A[:len(layers)], A[len(layers):], backend=be)


_warned_no_grad = False


def router_aux_loss(model: nn.Module | Sequence[MoLoRALinear], attention_mask: Tensor | None = None) -> Tensor:
    """Switch-style load-balancing loss over the router logits of the last forward, averaged over layers.

    Per :class:`MoLoRALinear` layer with ``E`` experts and top-k routing over ``T`` tokens::

        f_e = (token slots routed to e) / (T * k)      # fraction of the k*T choices (no gradient)
        P_e = mean_t softmax(logits_t)[e]               # mean router probability (differentiable)
        loss_l = E * sum_e f_e * P_e                    # 1.0 when perfectly balanced

    ``attention_mask`` (``[batch, seq]``, the forward's) excludes padding tokens. The logits are those the
    layers kept from the last forward (``MoLoRALinear.last_router_logits``), so call this after the forward
    and before the next one; with gradient checkpointing use the non-reentrant kind (transformers' default),
    whose first forward builds the graph the loss backpropagates through. Returns a float32 scalar.
    """
    global _warned_no_grad
    layers = _layers(model, MoLoRALinear, "router_aux_loss needs a stage-1 model (apply_stage1)")
    mask = None
    losses = []
    for m in layers:
        logits = m.last_router_logits
        if logits is None:
            raise ValueError("router_aux_loss: no router logits recorded; run a forward pass of the model first")
        if attention_mask is not None and mask is None:
            mask = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
            if mask.numel() != logits.shape[0]:
                raise ValueError(f"attention_mask has {mask.numel()} entries but the last forward routed "
                                 f"{logits.shape[0]} tokens")
        if mask is not None:
            logits = logits[mask]
        E, k = logits.shape[-1], m.top_k
        probs = torch.softmax(logits.float(), dim=-1)
        _, idx = mk.route(logits.detach(), k, backend=m.backend)
        counts = torch.zeros(E, dtype=torch.float32, device=logits.device)
        counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float32, device=logits.device))
        n = max(int(logits.shape[0]), 1)
        f = counts / (n * k)
        losses.append(E * (f * probs.sum(0) / n).sum())
    loss = torch.stack(losses).mean()
    if (torch.is_grad_enabled() and not loss.requires_grad and not _warned_no_grad
            and any(m.router.weight.requires_grad and m.training for m in layers)):
        _warned_no_grad = True
        warnings.warn("router_aux_loss: the recorded router logits carry no gradient (reentrant gradient "
                      "checkpointing runs its first forward without autograd); enable checkpointing with "
                      "gradient_checkpointing_kwargs={'use_reentrant': False}", stacklevel=2)
    return loss
