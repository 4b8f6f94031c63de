"""medcare: the MedCare two-stage method (Liao et al., EMNLP 2024 Findings) on HuggingFace transformers.

```python
from medcare import MedCareConfig, apply_stage1, merge_lora, to_stage2, merge_and_unload
cfg = MedCareConfig(r=16, alpha=32, num_experts=8, top_k=2, num_shared=2)
model = apply_stage1(model, cfg)        # train stage 1 (MedCareTrainer), save_adapter(model, "s1")
model = to_stage2(merge_lora(model, "attn"), cfg)   # train stage 2 with the orthogonality penalty
model = merge_and_unload(model)         # a plain transformers model: model.save_pretrained("out")
```

In a new process, stage 2 from a stage-1 adapter: ``to_stage2(base_model, cfg)`` then
``load_adapter(base_model, "s1")``. The layers call the fused ops of :mod:`medcare_kernels`.
``MedCareTrainer`` (and transformers) is imported on first use.
"""

try:
    import safetensors  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("the medcare model layer needs its extra dependencies: pip install 'medcare-kernels[model]' "
                      "(transformers, accelerate, safetensors)") from e

from medcare.adapters import load_adapter, save_adapter
from medcare.config import MedCareConfig
from medcare.losses import orthogonal_penalty, router_aux_loss
from medcare.modules import LoRALinear, MoLoRALinear, OrthLoRALinear
from medcare.stages import apply_stage1, merge_and_unload, merge_lora, to_stage2

__all__ = [
    "LoRALinear",
    "MedCareConfig",
    "MedCareTrainer",
    "MoLoRALinear",
    "OrthLoRALinear",
    "apply_stage1",
    "load_adapter",
    "merge_and_unload",
    "merge_lora",
    "orthogonal_penalty",
    "router_aux_loss",
    "save_adapter",
    "to_stage2",
]


def __getattr__(name: str):
    if name == "MedCareTrainer":
        from medcare.trainer import MedCareTrainer

        return MedCareTrainer
    raise AttributeError(f"module 'medcare' has no attribute {name!r}")
