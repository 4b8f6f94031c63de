"""The demo's inputs: the embedded data files, the model sizes, the tokenizer and the tiny Qwen2 model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medcare.cli._common import CLIError

__all__ = ["CHAT_TEMPLATE", "DATA_FILES", "HELD_OUT_MC", "SIZES", "SPECIAL_TOKENS", "DemoSize", "build_model",
           "build_tokenizer", "data_file"]

#: ChatML, as Qwen2 chat models use it; the demo tokenizer carries it, so the chat-template path is exercised.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Qwen2's pre-tokenisation pattern (contractions, letters, single digits, punctuation, newlines, spaces).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                r"""|\s+(?!\S)|\s+""")
DATA_FILES = {"stage1": "stage1_knowledge.jsonl", "stage2": "stage2_triage.jsonl", "held_out": "held_out.jsonl"}
#: the held-out multiple-choice set (MedQA-style records, read by medcare.eval, not by medcare train)
HELD_OUT_MC = "held_out_mc.jsonl"


@dataclass(frozen=True)
class DemoSize:
    """Model and schedule of one demo size (``full`` by default, ``quick`` for smoke tests)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    batch_size: int = 16
    max_new_tokens: int = 64


SIZES = {
    # ~3.4M parameters (1.3M frozen base + embeddings, 2M adapter in stage 1)
    "full": DemoSize(hidden_size=256, intermediate_size=688, num_layers=4, vocab_size=2048,
                     stage1_steps=150, stage2_steps=100, stage1_lr=5e-3, stage2_lr=6e-3),
    "quick": DemoSize(hidden_size=64, intermediate_size=160, num_layers=2, vocab_size=1024,
                      stage1_steps=24, stage2_steps=12, stage1_lr=1e-2, stage2_lr=1e-2, batch_size=8,
                      max_new_tokens=24),
}


def data_file(name: str) -> Path:
    """Path of an embedded data file (``stage1_knowledge.jsonl``, ``stage2_triage.jsonl``, ``held_out.jsonl``,
    ``held_out_mc.jsonl``)."""
    path = Path(str(resources.files("medcare.data").joinpath(name)))
    if not path.is_file():
        raise CLIError(f"the embedded demo data {name} is missing from the installation ({path})")
    return path


def build_tokenizer(examples: Sequence[Any], vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on the examples' text, as a ``PreTrainedTokenizerFast`` with ChatML.

    Built like Qwen2's (NFC, Qwen2's split pattern, byte level, so nothing is unknown): transformers 5 loads a
    tokenizer saved next to a Qwen2 config as ``Qwen2Tokenizer``, which rebuilds that pipeline, so a saved
    and reloaded tokenizer encodes exactly as this one. EOS is ``<|im_end|>`` (end of a turn), PAD
    ``<|endoftext|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{m['role']}\n{m['content']}" for ex in examples for m in ex.messages]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"],
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_model(tokenizer: Any, size: DemoSize, seed: int) -> Any:
    """A Qwen2 causal LM from a config, random init (deterministic in ``seed``), float32.

    ``initializer_range=0.1`` (Qwen2's default is 0.02): the embeddings, tied to the LM head, stay frozen in
    both stages, and with 0.02 a unit-RMS hidden state reaches logits of only about +-5, which caps what
    the adapters can learn on a random model.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
