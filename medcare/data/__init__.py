"""Instruction data for ``medcare train`` and the embedded demo data set.

* :mod:`medcare.data.formats`: JSON/JSONL files in the ShareGPT (``conversations``) or Alpaca
  (``instruction``/``input``/``output``) format, read into chat messages; :class:`DataFormatError` names the
  line or record of malformed input.
* :mod:`medcare.data.dataset`: chat template (or a plain template) rendering, tokenisation with the loss on
  response tokens only, and the padding collator.
* ``stage1_knowledge.jsonl``, ``stage2_triage.jsonl``, ``held_out.jsonl``: the demo data (see ``README.md``);
  ``held_out_mc.jsonl``: the demo's held-out multiple-choice set (MedQA-style, read by :mod:`medcare.eval`).
"""

from medcare.data.dataset import IGNORE_INDEX, SFTDataset, build_dataset, make_collator, prompt_text, tokenize_messages
from medcare.data.formats import DataFormatError, Example, load_records, parse_record

__all__ = ["IGNORE_INDEX", "DataFormatError", "Example", "SFTDataset", "build_dataset", "load_records",
           "make_collator", "parse_record", "prompt_text", "tokenize_messages"]
