"""Tiny random decoder models built from configs (no downloads) and helpers shared by the model tests."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from medcare import MedCareConfig  # noqa: E402  (after the importorskip)
from medcare.modules import LoRALinear, MoLoRALinear, OrthLoRALinear  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
              tie_word_embeddings=False)

ARCHS = {
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),                                   # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),                       # q/k norms
    "llama": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),  # FFN biases
    "mistral": lambda: transformers.MistralConfig(**COMMON),
}


def tiny_model(arch: str = "qwen2", seed: int = 0) -> torch.nn.Module:
    """A float32 causal LM with random weights, deterministic in ``seed``, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation="eager")
    return model.eval()


def small_config(**changes) -> MedCareConfig:
    base = dict(r=4, alpha=8, dropout=0.0, num_experts=4, top_k=2, num_shared=2)
    return MedCareConfig(**{**base, **changes})


def tokens(batch: int = 2, seq: int = 12, seed: int | None = None) -> torch.Tensor:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.detach().clone()


@torch.no_grad()
def randomize_adapters(model, scale: float = 0.3) -> None:
    """Give every adapter tensor random values (B's are zero after init, which would hide bugs)."""
    for m in model.modules():
        if isinstance(m, (MoLoRALinear, LoRALinear, OrthLoRALinear)):
            for n, p in m.named_parameters(recurse=True):
                if n in ("weight", "bias"):
                    continue
                p.copy_(torch.randn_like(p) * scale / max(p.shape[-1], 1) ** 0.5)


def adapter_params(model) -> dict[str, torch.Tensor]:
    """Every parameter that is not a base weight, by name (detached clones)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_adapter(n)}


def base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not _is_adapter(n)}


def _is_adapter(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return any(k in leaf[-1] for k in ("lora_", "shared_", "base_", "orth_")) or ".router." in name


def clone(model):
    return copy.deepcopy(model)


def quiet_to_stage2(model, cfg):
    """``to_stage2`` on a plain model warns that the base LoRA starts at zero; silence it in tests."""
    from medcare import to_stage2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return to_stage2(model, cfg)


def enable_checkpointing(model, **kwargs):
    """``gradient_checkpointing_enable`` (deprecated alias in recent transformers, kept working)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
