"""The model-facing part of evaluation: batched log-likelihoods of continuations, batched greedy generation.

Log-likelihood follows lm-evaluation-harness (``HFLM.loglikelihood``) so the two agree item for item:

* a request is ``(context, continuation)``; trailing whitespace of the context moves to the continuation;
  ``context + continuation`` is tokenised whole and split at the length of the tokenised context;
* the model reads the whole sequence but its last token, and the log-probabilities of the continuation's
  tokens are summed (``is_greedy``: each of them is the argmax). Over-long inputs keep their last
  ``max_length + 1`` tokens.

Batches are left-padded with explicit ``position_ids`` so every row ends at the last position and only the
last ``max(continuation length)`` logits are computed (``logits_to_keep``): ``[B, k, V]``, not ``[B, T, V]``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Loglik", "encode_pair", "generate_greedy", "loglikelihoods", "stop_token_ids"]

#: end-of-turn markers of common chat templates, used as extra stop tokens when the vocabulary has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Loglik:
    """Sum of the continuation's token log-probabilities, its token count, and whether greedy decoding
    would have produced it."""

    logprob: float
    tokens: int
    is_greedy: bool


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: Any, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(model).type, dtype=dtype)


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=not progress, leave=False)


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-evaluation-harness encodes a pair (see the module doc)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} adds no token to its context")
    return whole[: len(ctx)], cont


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   add_special_tokens: bool = False, max_length: int | None = None,
                   autocast_dtype: torch.dtype | None = None, progress: bool = False,
                   desc: str = "loglik") -> list[Loglik]:
    """:class:`Loglik` of each ``(context, continuation)`` request, in request order.

    ``batch_size`` rows per forward (longest first, as lm-evaluation-harness); ``max_length``: the model's
    window (default: its ``max_position_embeddings``); ``autocast_dtype``: e.g. ``torch.bfloat16``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    limit = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, add_special_tokens)
        whole = (ctx + cont)[-(limit + 1):]
        encoded.append((whole[:-1], cont))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    keep_arg = _accepts(model, "logits_to_keep")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    results: list[Loglik | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = _bar(len(encoded), desc, progress)
    try:
        for rows in _batches(order, batch_size):
            inputs = [encoded[i][0] for i in rows]
            conts = [encoded[i][1] for i in rows]
            width = max(map(len, inputs))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, seq in enumerate(inputs):
                ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            k = max(map(len, conts))
            kwargs = {"logits_to_keep": k} if keep_arg else {}
            with _autocast(model, autocast_dtype):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=False, **kwargs).logits
            logprobs = torch.log_softmax(logits[:, -k:].float(), dim=-1)
            for r, (i, cont) in enumerate(zip(rows, conts)):
                lp = logprobs[r, k - len(cont):]
                target = torch.tensor(cont, device=lp.device)
                chosen = lp.gather(-1, target[:, None])[:, 0]
                results[i] = Loglik(float(chosen.double().sum()), len(cont), bool((lp.argmax(-1) == target).all()))
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """EOS of the tokenizer and the model's generation config, and the end-of-turn markers in the vocabulary."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int)]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and t in getattr(tokenizer, "all_special_tokens", [])]
    return sorted(set(ids))


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 128,
                    batch_size: int = 8, add_special_tokens: bool = False,
                    autocast_dtype: torch.dtype | None = None, progress: bool = False,
                    desc: str = "generate") -> list[str]:
    """Greedy replies to ``prompts`` (in order), stopped at EOS or an end-of-turn token, special tokens
    stripped. Batched with left padding (longest prompts first)."""
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _device(model)
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=pad)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[str | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = _bar(len(encoded), desc, progress)
    try:
        for rows in _batches(order, batch_size):
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, width - len(encoded[i]):] = 1
            with _autocast(model, autocast_dtype):
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
            for r, i in enumerate(rows):
                new = gen[r, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]
