"""Evaluation as the MedCare paper does it: multiple-choice accuracy and open-ended answers, and routing.

```python
from medcare.eval import EvalOptions, evaluate_items, load_eval_items, load_for_eval, summarize
loaded = load_for_eval("runs/s1")                 # merged checkpoint, stage-1 or stage-2 adapter directory
items = load_eval_items("medqa_test.jsonl")       # MedQA/MedMCQA/list/PubMedQA/instruction records
preds = evaluate_items(loaded.model, loaded.tokenizer, items, EvalOptions(method="loglik"))
results = summarize(preds)                        # accuracy per file and subject, 95% CI, exact match, ROUGE-L
```

Modules: :mod:`~medcare.eval.records` (formats), :mod:`~medcare.eval.prompts`, :mod:`~medcare.eval.scoring`
(batched log-likelihood and greedy generation), :mod:`~medcare.eval.extract` (answer letters),
:mod:`~medcare.eval.metrics`, :mod:`~medcare.eval.runner`, :mod:`~medcare.eval.report`,
:mod:`~medcare.eval.loading`, :mod:`~medcare.eval.experts` (routing statistics of a stage-1 model). The
commands: ``medcare eval`` and ``medcare experts``.
"""

from medcare.eval.extract import extract_letters
from medcare.eval.loading import EvalLoadError, LoadedModel, load_for_eval
from medcare.eval.metrics import exact_match, rouge_l, wilson_interval
from medcare.eval.records import EvalItem, load_eval_items, parse_eval_record
from medcare.eval.report import render_markdown, summarize, write_results
from medcare.eval.runner import EvalOptions, evaluate_items

__all__ = ["EvalItem", "EvalLoadError", "EvalOptions", "LoadedModel", "evaluate_items", "exact_match",
           "extract_letters", "load_eval_items", "load_for_eval", "parse_eval_record", "render_markdown",
           "rouge_l", "summarize", "wilson_interval", "write_results"]
