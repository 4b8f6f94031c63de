"""Routing statistics of a stage-1 model on a data set: which routed experts the tokens go to.

For every MoLoRA linear (``model.layers.3.mlp.gate_proj``): the fraction of the top-k choices each routed
expert receives over all real (non-padding) tokens, which sums to 1 per linear; the mean router entropy per
token ``H = -sum_e p_e log p_e`` of the softmax over the ``E`` router logits (nats; ``log E`` is uniform
routing, 0 a router certain of one expert) and that entropy divided by ``log E``; ``max/mean`` of the load
(1 = perfectly balanced, ``E/k`` = all tokens to the same experts). With ``by``, the same per value of a
record field (e.g. ``subject``), the analysis behind MedCare's claim that the routed experts separate kinds
of data. Each item is routed as a whole conversation: its prompt and its reference answer (gold option
texts for a multiple-choice item), rendered as in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_expert_heatmap", "routing_statistics"]


def _group_value(item: Any, by: str) -> str:
    value = item.record.get(by)
    if value is None:
        return "(missing)"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _layer_summary(counts: torch.Tensor, entropy: float, tokens: int) -> dict[str, Any]:
    total = float(counts.sum())
    load = (counts / total).tolist() if total > 0 else [0.0] * len(counts)
    E = len(counts)
    mean_entropy = entropy / tokens if tokens else float("nan")
    return {"tokens": tokens, "choices": int(total), "load": load,
            "max_over_mean": max(load) * E if total > 0 else float("nan"), "router_entropy": mean_entropy,
            "router_entropy_normalized": mean_entropy / math.log(E) if E > 1 and tokens else float("nan")}


@torch.no_grad()
def routing_statistics(model: Any, tokenizer: Any, items: Sequence[Any], by: str | None = None,
                       batch_size: int = 8, template: str = "auto", max_length: int | None = 2048,
                       bf16: bool = False, progress: bool = True) -> dict[str, Any]:
    """Routing statistics of ``model`` (a stage-1 model: MoLoRA layers) over ``items`` (:class:`EvalItem`).

    Returns ``{"tokens", "items", "layers": {name: {num_experts, top_k, tokens, choices, load[E],
    max_over_mean, router_entropy, router_entropy_normalized}}, "by", "groups": {value: {"items", "tokens",
    "layers": {...}}}}``. Raises ``ValueError`` when the model has no MoLoRA layer.
    """
    from tqdm.auto import tqdm

    import medcare_kernels as mk
    from medcare.data.dataset import tokenize_messages
    from medcare.eval.prompts import full_messages
    from medcare.modules import MoLoRALinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]
    if not layers:
        raise ValueError("the model has no MoLoRA layers: routing statistics need a stage-1 model (routed experts)")
    groups = sorted({_group_value(it, by) for it in items}) if by else ["(all)"]
    gid = {g: i for i, g in enumerate(groups)}
    G = len(groups)
    counts = {n: torch.zeros(G, m.num_experts, dtype=torch.float64) for n, m in layers}
    entropy = {n: torch.zeros(G, dtype=torch.float64) for n, _ in layers}
    tokens = torch.zeros(G, dtype=torch.float64)
    item_counts = torch.zeros(G, dtype=torch.long)
    encoded = []
    for it in items:
        ids = tokenize_messages(full_messages(it), tokenizer, template, max_length, it.where)["input_ids"]
        encoded.append((ids, gid[_group_value(it, by)] if by else 0))
        item_counts[encoded[-1][1]] += 1
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    bar = tqdm(total=len(encoded), desc="routing", unit="item", dynamic_ncols=True, disable=not progress,
               leave=False)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            group = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq, g = encoded[i]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)  # right padding: positions need no care
                mask[r, : len(seq)] = True
                group[r] = g
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type,
                                                                                                  enabled=False)
            with ctx:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            flat_mask = mask.reshape(-1)
            flat_group = group.reshape(-1)[flat_mask]
            tokens += torch.bincount(flat_group, minlength=G).double()
            for n, m in layers:
                logits = m.last_router_logits.reshape(-1, m.num_experts)[flat_mask.to(m.last_router_logits.device)]
                _, idx = mk.route(logits.float(), m.top_k, backend=m.backend)
                flat = (flat_group.to(idx.device)[:, None] * m.num_experts + idx).reshape(-1)
                counts[n] += torch.bincount(flat.cpu(), minlength=G * m.num_experts).double().view(G, m.num_experts)
                logp = torch.log_softmax(logits.float(), dim=-1)
                h = -(logp.exp() * logp).sum(-1)
                entropy[n] += torch.bincount(flat_group, weights=h.double().cpu(), minlength=G)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    result: dict[str, Any] = {
        "tokens": int(tokens.sum()), "items": len(encoded),
        "layers": {n: {"num_experts": m.num_experts, "top_k": m.top_k,
                       **_layer_summary(counts[n].sum(0), float(entropy[n].sum()), int(tokens.sum()))}
                   for n, m in layers},
        "by": by,
    }
    if by:
        result["groups"] = {g: {"items": int(item_counts[i]), "tokens": int(tokens[i]),
                                "layers": {n: _layer_summary(counts[n][i], float(entropy[n][i]), int(tokens[i]))
                                           for n, _ in layers}}
                            for g, i in gid.items()}
    return result


def short_name(name: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``layer 3 gate_proj``."""
    return name.replace("model.layers.", "layer ").replace(".mlp.", " ")


def plot_expert_heatmap(stats: dict[str, Any], path: str | Path, max_groups: int = 8) -> Path | None:
    """A PNG heat map of the expert load (% of the top-k choices): rows are the MoLoRA linears, columns the
    experts; one panel for all tokens and, with groups, one per group (the ``max_groups`` largest). Returns the
    path, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("all tokens", stats["layers"])]
    if stats.get("groups"):
        largest = sorted(stats["groups"].items(), key=lambda kv: -kv[1]["tokens"])[:max_groups]
        panels += [(f"{stats['by']} = {g}", v["layers"]) for g, v in largest]
    names = list(stats["layers"])
    E = max(v["num_experts"] for v in stats["layers"].values())
    fig, axes = plt.subplots(1, len(panels), figsize=(1.8 + (0.45 * E + 0.4) * len(panels), 1.2 + 0.3 * len(names)),
                             squeeze=False, sharey=True)
    vmax = max(100 * max(layer["load"]) for _, ls in panels for layer in ls.values())
    for ax, (title, ls) in zip(axes[0], panels):
        data = np.array([ls[n]["load"] + [np.nan] * (E - len(ls[n]["load"])) for n in names]) * 100
        im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
        ax.set_xticks(range(E), [f"e{i}" for i in range(E)], fontsize=7)
        ax.set_title(title, fontsize=8)
        if len(names) <= 48:
            for (i, j), v in np.ndenumerate(data):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < vmax * 0.6 else "black")
    axes[0][0].set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    fig.suptitle("routed expert load (% of the top-k choices)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
