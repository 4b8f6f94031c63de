"""Where the model layer meets the distributed engines: DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3.

The engines do all the distribution; nothing here communicates except through them. Inside a forward pass
the engines hand every module its full parameters (FSDP2 unshards its unit, ZeRO-3 fetches the module's
parameters; the wrappers are ZeRO-3 *leaf* modules, see :mod:`medcare.modules`). Outside a forward pass a
parameter may be a shard, and the model layer reads parameters there in four places, which use the
helpers of this module:

* the stage-2 orthogonality penalty (:func:`medcare.orthogonal_penalty`): :func:`full_params` gathers the
  ``A`` matrices *differentiably* (FSDP2: ``DTensor.full_tensor()``, whose backward hands each rank its
  shard of the gradient; ZeRO-3: ``GatheredParameters`` plus a clone, whose gradient ZeRO-3's own hooks
  reduce-scatter), so the penalty has a real gradient under every engine;
* :func:`medcare.save_adapter`: full tensors on every rank (a collective where sharded), rank 0 writes;
* :func:`medcare.load_adapter` (resume, stage 2 from a stage-1 adapter): :func:`copy_full_` writes a full
  tensor into a parameter whatever its sharding, and folds into ZeRO-3-partitioned base weights gather
  them first (:func:`gathered` with ``modifier_rank=0``);
* the wrappers' constructors read the base weight's shape: :func:`param_shape` (a ZeRO-3 parameter
  partitioned while loading, ``from_pretrained`` under ``deepspeed.zero.Init``, is empty locally).

Under DDP every parameter is whole on every rank, and every helper here is a no-op. A function that
gathers is a collective: under FSDP2/ZeRO-3 call it on every rank (the Trainer does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["copy_full_", "full_params", "gathered", "is_global_rank_zero", "is_sharded", "is_zero3_param",
           "param_shape"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """True for a ``DTensor`` (an FSDP2 ``fully_shard`` parameter outside its forward)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_zero3_param(t: object) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (partitioned or not)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def is_sharded(t: object) -> bool:
    """True when ``t`` may hold only part of its values on this rank (FSDP2 DTensor or ZeRO-3 parameter)."""
    return is_dtensor(t) or is_zero3_param(t)


def param_shape(p: Tensor) -> torch.Size:
    """The full shape of a parameter: ZeRO-3's ``ds_shape`` (the local tensor may be empty), else ``shape``."""
    return torch.Size(p.ds_shape) if is_zero3_param(p) else p.shape


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0, the one that writes files and prints progress.

    The rank of the default process group once one is initialised; before that (a launched process that
    has not set its group up yet, e.g. ``medcare train`` while it parses its arguments) the ``RANK``
    variable that torchrun, accelerate and deepspeed set; True in a plain single process.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def gathered(params: Iterable[Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Inside: every ZeRO-3 parameter among ``params`` holds its full value (``GatheredParameters``).

    ``modifier_rank=0``: what rank 0 writes into them is kept (broadcast and re-partitioned on exit).
    A no-op without ZeRO-3 parameters. A collective when there are: enter it on every rank.
    """
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield


def full_params(params: Sequence[Tensor]) -> list[Tensor]:
    """Full, differentiable values of ``params``, for computations outside a forward pass.

    Plain tensors come back as they are; FSDP2 ``DTensor`` parameters as ``full_tensor()`` (an all-gather
    whose backward gives each rank the slice of the gradient it owns); ZeRO-3 parameters as clones taken
    while gathered (their gradient reaches the parameter, where ZeRO-3's hooks reduce-scatter it).
    A collective when any parameter is sharded: call it on every rank.
    """
    out: list[Tensor] = []
    zero3 = [p for p in params if is_zero3_param(p)]
    with gathered(zero3):
        for p in params:
            if is_dtensor(p):
                out.append(p.full_tensor())
            elif is_zero3_param(p):
                out.append(p.clone())  # keeps the values once ZeRO-3 re-partitions p on exit
            else:
                out.append(p)
    return out


@torch.no_grad()
def copy_full_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for a full ``value``, whatever ``param``'s sharding (no communication for FSDP2).

    For a ZeRO-3 parameter call it inside ``gathered([...], modifier_rank=0)`` on every rank.
    """
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh,
                                  param.placements, src_data_rank=None)
        param.copy_(local)
    else:
        param.copy_(value.to(device=param.device, dtype=param.dtype))
