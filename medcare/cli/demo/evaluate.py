"""Measurements of the demo's models: loss per response token, expert load, greedy generations."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "generate"]


def evaluate(model: Any, dataset: Any, collator: Any, batch_size: int = 32,
             expert_load: bool = False) -> tuple[float, dict[str, list[float]] | None]:
    """Mean loss per response token over ``dataset`` (eval mode, no dropout) and, with ``expert_load``, the
    fraction of the top-k choices each routed expert received per MoLoRA layer (padding excluded)."""
    import torch

    import medcare_kernels as mk
    from medcare.modules import MoLoRALinear

    device = next(model.parameters()).device
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)] if expert_load else []
    counts = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            n_tokens += int((labels != -100).sum())
            mask = batch["attention_mask"].reshape(-1).bool()
            for n, m in layers:
                _, idx = mk.route(m.last_router_logits[mask], m.top_k, backend=m.backend)
                counts[n] += torch.bincount(idx.reshape(-1).cpu(), minlength=m.num_experts).double()
    model.train(was_training)
    load = {n: (c / c.sum()).tolist() for n, c in counts.items()} if expert_load else None
    return total / max(n_tokens, 1), load


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy reply of ``model`` to ``messages`` (ending with a user turn), special tokens stripped."""
    import torch

    from medcare.data.dataset import prompt_text

    device = next(model.parameters()).device
    enc = tokenizer(prompt_text(messages, tokenizer), return_tensors="pt", add_special_tokens=False)
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate_held_out(models: dict[str, Any], device: str, max_new_tokens: int, out: Any) -> dict[str, Any]:
    """``medcare eval`` on the demo's saved models (``{label: directory}``; adapters load through the base model
    they record): the held-out multiple-choice set by loglik and the held-out triage note by exact match and
    ROUGE-L. Writes each model's ``results.json``/``results.md``/``predictions.jsonl`` under ``out/<label>``."""
    from medcare.cli.demo.model import DATA_FILES, HELD_OUT_MC, data_file
    from medcare.eval import EvalOptions, evaluate_items, load_eval_items, load_for_eval, summarize, write_results

    mc_file, note_file = data_file(HELD_OUT_MC), data_file(DATA_FILES["held_out"])
    mc = load_eval_items(mc_file)
    note = [it for it in load_eval_items(note_file) if it.reference.startswith("TRIAGE NOTE")]
    result: dict[str, Any] = {"mc_items": len(mc), "mc_method": "loglik", "models": {}}
    for label, path in models.items():
        loaded = load_for_eval(str(path), device=device)
        preds = evaluate_items(loaded.model, loaded.tokenizer, mc, EvalOptions(method="loglik"), desc=label)
        preds += evaluate_items(loaded.model, loaded.tokenizer, note,
                                EvalOptions(max_new_tokens=max_new_tokens), desc=label)
        res = summarize(preds, [str(mc_file), str(note_file)], {"model": loaded.description, "kind": loaded.kind})
        write_results(out / label, res, preds)
        choice, opened = res["files"][str(mc_file)]["choice"], res["files"][str(note_file)]["open"]
        result["models"][label] = {
            "model": loaded.description, "accuracy": choice["accuracy"], "correct": choice["correct"],
            "n": choice["n"], "ci95": choice["ci95"],
            "subjects": {s: [a["correct"], a["n"]] for s, a in res["files"][str(mc_file)]["subjects"].items()},
            "triage_exact_match": bool(opened["exact_match_count"]), "triage_rouge_l": opened["rouge_l"],
            "triage_reply": preds[-1]["output"]}
    return result
