"""Launched by the distributed tests (``torchrun ... tests/dist/driver.py [driver flags] -- <train flags>``).

Runs ``medcare train <train flags>`` in each process: :func:`medcare.cli.train.main`, the command's own
entry point (what ``torchrun ... -m medcare train`` runs), with two test-only additions passed through its
``model_hook`` and ``callbacks`` arguments. It records, per rank, what the tests compare: the Trainer's log
history, the expert token counts of the first MoLoRA layer per step, how the engine holds the parameters,
a checksum of the frozen base before and after training; and optionally stops every process hard
(``os._exit``) right after the checkpoint of step N (``--kill_at N``).

Driver flags: ``--record PREFIX`` (writes ``PREFIX.rank<r>.json``), ``--kill_at N``, ``--cpu_deepspeed``
and ``--cpu_fsdp`` (the engines on CPU: see below; test-only, no ``medcare train`` option), ``--skew``
(router of the stage-1 ``gate_proj``/``up_proj`` layers sends every token carrying the skew feature, and
only those, to the last expert: see ``tests/dist/common.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from medcare.cli.train import main as medcare_train  # noqa: E402  (the `medcare train` command)
from medcare.distributed import full_params  # noqa: E402
from medcare.modules import MoLoRALinear  # noqa: E402
from tests.dist.common import skew_routers  # noqa: E402


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Recorder(TrainerCallback):
    def __init__(self, prefix: str | None, kill_at: int | None):
        self.prefix, self.kill_at = prefix, kill_at
        self.counts: list[list[int]] = []
        self.module: MoLoRALinear | None = None
        self.seen: dict | None = None
        self.frozen_begin = self.frozen_end = None

    def attach(self, model: torch.nn.Module) -> None:
        molora = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
        if molora:
            self.module = molora[0]
            self.module.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        if module.training and module.last_router_logits is not None:
            idx = module.last_router_logits.detach().float().topk(module.top_k, dim=-1).indices
            self.counts.append(torch.bincount(idx.reshape(-1), minlength=module.num_experts).tolist())

    @staticmethod
    def frozen_checksum(model) -> tuple[float, int]:
        """(sum of |x| over every frozen parameter, number of trainable parameters): the base stays frozen."""
        frozen = [p for p in model.parameters() if not p.requires_grad]
        with torch.no_grad():
            total = sum(float(t.double().abs().sum()) for t in full_params(frozen))
        return total, sum(1 for p in model.parameters() if p.requires_grad)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.frozen_begin = self.frozen_checksum(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.seen:
            # how the engine holds the parameters during training (DTensor under FSDP2, ZeRO-3 partitions)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p.data)
                    self.seen = {"param": name, "type": type(p).__name__, "full_numel": p.numel() if not
                                 hasattr(p, "ds_numel") else p.ds_numel, "local_numel": local.numel(),
                                 "zero3": hasattr(p, "ds_id"), "model_class": type(model).__name__}
                    break

    def dump(self, state) -> None:
        if self.prefix:
            with open(f"{self.prefix}.rank{rank()}.json", "w") as f:
                json.dump({"log_history": state.log_history, "expert_counts": self.counts,
                           "global_step": state.global_step, "param_info": self.seen,
                           "frozen_begin": self.frozen_begin, "frozen_end": self.frozen_end}, f)

    def on_save(self, args, state, control, **kwargs):
        if self.kill_at is not None and state.global_step == self.kill_at:
            self.dump(state)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank's part of the checkpoint is on disk
            sys.stdout.flush()
            os._exit(17)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.frozen_end = self.frozen_checksum(model)
        self.dump(state)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--record")
    p.add_argument("--kill_at", type=int)
    p.add_argument("--skew", action="store_true")
    p.add_argument("--cpu_deepspeed", action="store_true")
    p.add_argument("--cpu_fsdp", action="store_true")
    opts = p.parse_args(argv[:split])
    if opts.cpu_fsdp:
        # CPU only: accelerate turns an FSDP plugin into DistributedType.FSDP only on accelerators; on
        # CPU (MULTI_CPU, gloo) it would silently run plain DDP. Let the Trainer's own FSDP plugin through.
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        init = AcceleratorState.__init__

        def fsdp_on_cpu(self, *a, fsdp_plugin=None, **kw):
            init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin

        AcceleratorState.__init__ = fsdp_on_cpu
    if opts.cpu_deepspeed:
        # CPU only: accelerate sets DeepSpeed up with a communication backend only for accelerators
        # (CUDA, XPU, ...); without one it would run every rank on the whole data (one process to it). Set
        # the state up with gloo first; the run passes --accelerator_config '{"use_configured_state": true}'.
        import deepspeed.comm.torch  # noqa: F401
        from accelerate.state import PartialState

        # and no JIT build of DeepSpeed's CPU shared-memory collective (about 100 s of C++ compiling on a
        # fresh machine): gloo carries every collective
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    rec = Recorder(opts.record, opts.kill_at)

    def hook(model):
        if opts.skew:
            skew_routers(model)
        rec.attach(model)

    raise SystemExit(medcare_train(argv[split + 1:], model_hook=hook, callbacks=[rec]))


if __name__ == "__main__":
    main()
