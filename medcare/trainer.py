"""``MedCareTrainer``: ``transformers.Trainer`` plus the MedCare auxiliary losses and adapter checkpoints."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from medcare.adapters import ADAPTER_WEIGHTS_NAME, AdapterError, load_adapter, read_adapter, save_adapter
from medcare.config import MedCareConfig
from medcare.losses import orthogonal_penalty, router_aux_loss
from medcare.stages import merged_records, model_stage

__all__ = ["MedCareTrainer", "checkpoint_problem", "last_complete_checkpoint"]

_TRAINING_ARGS_NAME = "training_args.bin"
_TRAINER_STATE_NAME = "trainer_state.json"
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` (a ``checkpoint-N`` directory) cannot be resumed, or None when it is complete.

    The Trainer writes ``trainer_state.json`` last (after the model or adapter, optimizer, scheduler and RNG
    states), so a checkpoint is complete when that file is whole JSON; its adapter, when it has one, must
    read back too (:func:`medcare.adapters.read_adapter`).
    """
    path = Path(checkpoint)
    try:
        state = json.loads((path / _TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "global_step" not in state:
            return f"{_TRAINER_STATE_NAME} holds no trainer state"
    except FileNotFoundError:
        return f"no {_TRAINER_STATE_NAME}"
    except (OSError, ValueError) as e:
        return f"{_TRAINER_STATE_NAME} is unreadable ({e})"
    if (path / ADAPTER_WEIGHTS_NAME).exists():
        try:
            read_adapter(path)
        except AdapterError as e:
            return str(e)
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` that a run can resume from (None if there is none).

    Newer ones that an interrupted save left incomplete (:func:`checkpoint_problem`) are skipped, each with
    a warning naming it.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        warnings.warn(f"skipping incomplete checkpoint {path} ({problem}: an interrupted save)", stacklevel=2)
    return None


class MedCareTrainer(Trainer):
    """A ``transformers.Trainer`` for both MedCare stages. Use it as you use ``Trainer``.

    Loss (training only; evaluation reports the task loss alone)::

        stage 2:  loss = task_loss + orth_lambda   * orthogonal_penalty(model)    if orth_lambda > 0
        stage 1:  loss = task_loss + aux_loss_coef * router_aux_loss(model, attention_mask)  if aux_loss_coef > 0

    The stage is read from the model (MoLoRA layers -> 1, OrthLoRA layers -> 2); the coefficients from
    ``medcare_config`` or else ``model.medcare_config``. Each extra term is a per-micro-batch quantity and
    enters the optimiser step with weight 1 overall: it is divided by the number of accumulated
    micro-batches exactly when the installed Trainer does not divide the returned loss itself (i.e. when the
    task loss is already normalised by ``num_items_in_batch``), so gradient accumulation over ``n``
    micro-batches gives the gradient of ``task + coef * mean(extra)``. It is not multiplied by the number of
    processes (unlike the token-normalised task loss): DDP averages its identical per-rank gradient.

    Metrics: ``loss`` is the *task* loss alone (what ``Trainer`` would log for the plain model; the
    gradient still comes from the total), and ``orth_penalty`` (stage 2) and ``router_aux_loss`` (stage 1)
    are logged beside it, unweighted, averaged over the micro-batches since the last log (and over
    processes); the optimised objective is ``loss + coef * term``. The terms are logged even when their
    coefficient is 0 (then computed without gradient). The same numbers reach ``trainer_state.json``.

    Distributed (``torchrun``/``accelerate launch``; see ``docs/distributed.md``): DDP runs without
    ``find_unused_parameters`` (set to False unless given: every expert gets a gradient, zero when it
    received no token); under FSDP2 and ZeRO-3 the penalty and the adapter saves gather the sharded
    parameters (:mod:`medcare.distributed`), so the penalty has its full gradient and rank 0 writes full
    tensors. ``router_aux_loss`` is computed per process on its own tokens (as MoE implementations do).

    Checkpoints: each save writes the adapter (``adapter.safetensors`` + ``medcare_config.json``, via
    :func:`medcare.save_adapter`), the processing class and the training arguments; the full model weights
    only with ``save_full_checkpoint=True``. Resuming (``train(resume_from_checkpoint=...)``) and
    ``load_best_model_at_end`` load the adapter back; ``train(resume_from_checkpoint=True)`` takes the
    newest *complete* ``checkpoint-N`` (:func:`last_complete_checkpoint`: one whose save was interrupted,
    by a kill or a full disk, is skipped with a warning). A model without MedCare layers (after
    ``merge_and_unload``) is saved by the plain Trainer.
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, *rest: Any,
                 medcare_config: MedCareConfig | None = None, save_full_checkpoint: bool = False, **kwargs: Any):
        if (args is not None and getattr(args, "ddp_find_unused_parameters", False) is None and model is not None
                and self._has_adapter_layers(model)):
            # Every trainable MedCare parameter takes part in every forward (an expert that receives no token
            # gets a zero gradient, not none), so DDP needs no search for unused parameters. The Trainer's
            # own default would be True (an extra graph traversal per step).
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *rest, **kwargs)
        if medcare_config is not None and not isinstance(medcare_config, MedCareConfig):
            raise TypeError(f"medcare_config must be a MedCareConfig or None, got {type(medcare_config).__name__}")
        self.medcare_config = medcare_config
        self.save_full_checkpoint = bool(save_full_checkpoint)
        self._medcare_sums: dict[str, Tensor] = {}
        self._medcare_counts: dict[str, int] = {}
        self._medcare_added: Tensor | None = None  # the weighted term compute_loss added (detached)

    # ---- loss ---------------------------------------------------------------------------------------

    def _medcare_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _medcare_cfg(self, model: nn.Module) -> MedCareConfig:
        cfg = self.medcare_config or getattr(model, "medcare_config", None)
        if cfg is None:
            raise ValueError("MedCareTrainer needs a MedCareConfig: pass medcare_config=... or prepare the model with "
                             "apply_stage1/to_stage2")
        return cfg

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer takes the returned loss as already divided over the accumulated micro-batches."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        return bool(scaled)

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _extra_loss_scale(self, num_items_in_batch: Any) -> float:
        """1 / (micro-batches per step) when the Trainer will not divide the returned loss, else 1."""
        return 1.0 / self._accumulation_steps() if self._loss_scaled_for_ga(num_items_in_batch) else 1.0

    def medcare_extra_loss(self, attention_mask: Tensor | None = None) -> Tensor | None:
        """The weighted MedCare term of the current stage (None when its coefficient is 0); records metrics."""
        model = self._medcare_model()
        stage = model_stage(model)
        if stage == 0:
            return None
        cfg = self._medcare_cfg(model)
        name, coef = ("orth_penalty", cfg.orth_lambda) if stage == 2 else ("router_aux_loss", cfg.aux_loss_coef)
        with torch.set_grad_enabled(torch.is_grad_enabled() and coef > 0):
            value = orthogonal_penalty(model) if stage == 2 else router_aux_loss(model, attention_mask)
        self._medcare_sums[name] = self._medcare_sums.get(name, 0) + value.detach().float()
        self._medcare_counts[name] = self._medcare_counts.get(name, 0) + 1
        return coef * value if coef > 0 else None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        attention_mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            extra = self.medcare_extra_loss(attention_mask)
            if extra is not None:
                added = extra.to(loss.dtype) * self._extra_loss_scale(num_items_in_batch)
                self._medcare_added = added.detach()
                loss = loss + added
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None,
                      *args: Any, **kwargs: Any) -> Tensor:
        """``Trainer.training_step`` (backward of task loss + weighted terms); returns the task part alone.

        The Trainer accumulates the returned value into the logged ``loss``; it divides the backward loss
        by the accumulation steps exactly when :meth:`_loss_scaled_for_ga` is false, and so is the weighted
        term subtracted here, so ``loss`` in the logs and ``trainer_state.json`` is the task loss.
        """
        self._medcare_added = None
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        added, self._medcare_added = self._medcare_added, None
        if added is not None:
            if not self._loss_scaled_for_ga(num_items_in_batch):
                added = added / self._accumulation_steps()
            loss = loss - added.to(device=loss.device, dtype=loss.dtype)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._medcare_counts:
            for name, total in self._medcare_sums.items():
                mean = total / self._medcare_counts[name]
                if self.accelerator.num_processes > 1:
                    mean = self.accelerator.reduce(mean.to(self.args.device), reduction="mean")
                logs[name] = float(mean.item())
            self._medcare_sums.clear()
            self._medcare_counts.clear()
        super().log(logs, *args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------------

    def _has_adapter_layers(self, model: nn.Module) -> bool:
        return model_stage(model) != 0 or bool(merged_records(model))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (and, with ``save_full_checkpoint``, what ``Trainer.save_model`` writes).

        Call it on every process, as ``Trainer.save_model``: under FSDP2/ZeRO-3 the adapter's gather is a
        collective. Adapter-only saves skip the Trainer's full-model state-dict gather.
        """
        model = self._medcare_model()
        if self.save_full_checkpoint or not self._has_adapter_layers(model):
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        self._save(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self._medcare_model()
        if not self._has_adapter_layers(model):
            super()._save(output_dir, state_dict=state_dict)
            return
        if self.save_full_checkpoint:
            super()._save(output_dir, state_dict=state_dict)
        # every process: gathering sharded adapter parameters (FSDP2, ZeRO-3) is a collective; one writes
        save_adapter(model, output_dir, config=self.medcare_config, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if not self.save_full_checkpoint:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` picks the newest complete checkpoint."""
        if resume_from_checkpoint is True:
            last = last_complete_checkpoint(self.args.output_dir)
            if last is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
            resume_from_checkpoint = last
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @staticmethod
    def _adapter_only(checkpoint: str | None) -> bool:
        return bool(checkpoint) and os.path.isfile(os.path.join(checkpoint, ADAPTER_WEIGHTS_NAME)) and not any(
            os.path.isfile(os.path.join(checkpoint, n)) for n in _FULL_WEIGHTS)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._adapter_only(resume_from_checkpoint):
            load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model),
                         resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self._adapter_only(self.state.best_model_checkpoint):
            load_adapter(self._medcare_model(), self.state.best_model_checkpoint)
            return
        super()._load_best_model()
