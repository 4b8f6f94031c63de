"""Each scoring method on each record format, on a bigram model whose logits the test sets, against the
log-probabilities and greedy replies the table implies; batching and padding change nothing."""

from __future__ import annotations

import random

import pytest
import torch

from medcare.eval import EvalOptions, evaluate_items, parse_eval_record, summarize
from medcare.eval.prompts import prompt_for
from medcare.eval.scoring import generate_greedy, loglikelihoods
from tests.eval.conftest import Bigram, chain

OPTS = {"A": "zq", "B": "C.", "C": "C", "D": "xy"}
RECORDS = {
    "medqa": {"question": "Pick one.", "options": OPTS, "answer_idx": "B", "subject": "s1"},
    "medmcqa": {"question": "Pick one.", "opa": "zq", "opb": "C.", "opc": "C", "opd": "xy", "cop": 2,
                "subject_name": "s2"},
    "list": {"question": "Pick one.", "choices": list(OPTS.values()), "answer": 2},
    "pubmedqa": {"question": "Is it?", "context": "Some context.", "final_decision": "maybe"},
}


def _items(names=RECORDS):
    return [parse_eval_record(RECORDS[n], f"t.jsonl:{i + 1}", cop_base=0) for i, n in enumerate(names)]


def _expected_scores(b: Bigram, item, normalize: str, target: str) -> dict[str, float]:
    """The oracle: the chat prompt ends with "assistant\\n"; as lm-evaluation-harness does, that newline moves
    to the continuation, which the bigram reads after the context's last character, "t"."""
    out = {}
    for letter, text in item.options:
        cont = letter if target == "letter" else text
        lp = b.logprob("t", "\n" + cont)
        out[letter] = lp / {"chars": len(cont), "tokens": len(cont) + 1, "none": 1}[normalize]
    return out


@pytest.mark.parametrize("normalize", ["chars", "tokens", "none"])
@pytest.mark.parametrize("target", ["text", "letter"])
def test_loglik_picks_the_option_the_table_prefers(normalize, target):
    b = Bigram({**chain("C."), ("\n", "x"): 2.0, ("x", "y"): 9.0, ("t", "\n"): 1.0})
    items = _items()
    assert prompt_for(items[0], b.tokenizer).endswith("<|im_start|>assistant\n")
    preds = evaluate_items(b.model, b.tokenizer, items, EvalOptions(method="loglik", normalize=normalize,
                                                                    loglik_target=target, batch_size=3,
                                                                    progress=False))
    for item, pred in zip(items, preds):
        want = _expected_scores(b, item, normalize, target)
        assert pred["method"] == "loglik"
        assert pred["scores"] == pytest.approx(want, abs=1e-3)
        best = max(want, key=want.get)
        assert pred["pred"] == best and pred["correct"] == ((best,) == item.answer)
    if target == "text":  # the normalisation decides between "C." (gold of medqa) and "C" (gold of medmcqa, list)
        assert [p["pred"] for p in preds[:3]] == (["C"] * 3 if normalize == "none" else ["B"] * 3)


@pytest.mark.parametrize("reply, correct", [("C.", [False, True, True, True]), ("B", [True, False, False, False])])
def test_generate_extracts_the_greedy_reply_letter(reply, correct):
    b = Bigram(chain(reply))
    items = _items()
    preds = evaluate_items(b.model, b.tokenizer, items, EvalOptions(method="generate", max_new_tokens=6,
                                                                    batch_size=2, progress=False))
    assert [p["output"] for p in preds] == [reply] * 4
    assert [p["pred"] for p in preds] == [reply[0]] * 4
    assert [p["correct"] for p in preds] == correct


def test_multi_answer_items_are_generated_and_need_the_exact_set():
    b = Bigram(chain("ACD"))
    records = [{"question": "Q", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}, "answer": gold}
               for gold in ("ACD", "AC", "ABCD", "C")]
    items = [parse_eval_record(r, f"m.jsonl:{i}") for i, r in enumerate(records, 1)]
    preds = evaluate_items(b.model, b.tokenizer, items, EvalOptions(method="loglik", max_new_tokens=5,
                                                                    progress=False))
    # multi-answer items are generated even under loglik; the single-answer "C" is scored by loglik
    assert [p["method"] for p in preds] == ["generate", "generate", "generate", "loglik"]
    assert [p["pred"] for p in preds[:3]] == ["ACD"] * 3
    assert [p["correct"] for p in preds] == [True, False, False, preds[3]["pred"] == "C"]


def test_open_ended_records_score_exact_match_and_rouge_l():
    b = Bigram(chain("ok."))
    records = [{"instruction": "Say it.", "output": "ok."},
               {"conversations": [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "ok. then"}]},
               {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "no"}]}]
    items = [parse_eval_record(r, f"o.jsonl:{i}") for i, r in enumerate(records, 1)]
    preds = evaluate_items(b.model, b.tokenizer, items, EvalOptions(max_new_tokens=8, progress=False))
    assert [p["method"] for p in preds] == ["open"] * 3 and [p["output"] for p in preds] == ["ok."] * 3
    assert [p["exact_match"] for p in preds] == [True, False, False]
    assert [p["rouge_l"] for p in preds] == pytest.approx([1.0, 2 / 3, 0.0])  # ["ok"] vs ["ok", "then"]: P=1, R=1/2
    summary = summarize(preds)["files"]["o.jsonl"]["open"]
    assert summary["n"] == 3 and summary["exact_match_count"] == 1
    assert summary["rouge_l"] == pytest.approx(5 / 9)


def test_summary_counts_per_file_and_subject_with_intervals():
    b = Bigram(chain("C."))
    items = _items()
    preds = evaluate_items(b.model, b.tokenizer, items, EvalOptions(method="generate", max_new_tokens=4,
                                                                    progress=False))
    res = summarize(preds)
    c = res["files"]["t.jsonl"]["choice"]
    assert (c["n"], c["correct"], c["method"]) == (4, 3, "generate") and c["accuracy"] == 0.75
    assert 0 < c["ci95"][0] < 0.75 < c["ci95"][1] <= 1
    assert set(res["files"]["t.jsonl"]["subjects"]) == {"s1", "s2"}
    assert res["files"]["t.jsonl"]["subjects"]["s1"]["correct"] == 0


def test_batching_and_left_padding_change_no_score(tiny_model_dir):
    """A random Qwen2 (real attention, BPE tokenizer): loglik and greedy replies are the same one by one and
    in padded batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    words = "warfarin heparin chest pain fever cough the a of is what which drug class used for".split()
    contexts = [" ".join(rng.choices(words, k=rng.randint(2, 25))) + "\n" for _ in range(7)]
    requests = [(c, " ".join(rng.choices(words, k=rng.randint(1, 6)))) for c in contexts]
    one = loglikelihoods(model, tok, requests, batch_size=1)
    many = loglikelihoods(model, tok, requests, batch_size=4)
    assert [r.tokens for r in one] == [r.tokens for r in many]
    assert torch.allclose(torch.tensor([r.logprob for r in one]), torch.tensor([r.logprob for r in many]), atol=1e-4)
    with torch.no_grad():  # and the first request against a plain forward
        ctx = tok(contexts[0].rstrip(), add_special_tokens=False)["input_ids"]
        whole = tok(contexts[0] + requests[0][1], add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
        direct = sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))
    assert one[0].logprob == pytest.approx(direct, abs=1e-4)
    assert generate_greedy(model, tok, contexts, 6, batch_size=1) == generate_greedy(model, tok, contexts, 6,
                                                                                      batch_size=4)
