"""Fixtures for the evaluation tests: a character-level bigram LM whose logits the test sets (a real Qwen2
with its layers zeroed), and the tiny random Qwen2 of the CLI tests."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch

pytest.importorskip("transformers")

from tests.cli.conftest import demo_examples, demo_tokenizer, tiny_model_dir, write_jsonl  # noqa: F401

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]
HIDDEN = 128


def char_tokenizer():
    """One token per character (printable ASCII), ChatML specials, the demo's chat template; EOS <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medcare.cli.demo import CHAT_TEMPLATE

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


class Bigram:
    """A next-character logit table ``L[prev, next]`` (0 everywhere but the ``strong`` transitions), the model
    that computes exactly it, and the log-probabilities it implies (the tests' oracle)."""

    def __init__(self, transitions: dict[tuple[str, str], float]):
        import transformers

        self.tokenizer = char_tokenizer()
        self.vocab = self.tokenizer.get_vocab()
        V = len(self.vocab)
        assert V <= HIDDEN
        self.L = torch.zeros(V, V, dtype=torch.float64)
        for (a, b), value in transitions.items():
            self.L[self.vocab[a], self.vocab[b]] = value
        config = transformers.Qwen2Config(
            vocab_size=V, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-12, tie_word_embeddings=False,
            pad_token_id=self.vocab["<|endoftext|>"], eos_token_id=self.vocab["<|im_end|>"], bos_token_id=None)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            # the residual stream stays the one-hot embedding (attention and MLP outputs are zero); the final
            # RMSNorm scales it to sqrt(HIDDEN), so logits[v] = sqrt(HIDDEN) * lm_head[v, prev]
            model.model.embed_tokens.weight[:, :V] = torch.eye(V)
            model.model.norm.weight.fill_(1.0)
            model.lm_head.weight[:, :V] = (self.L.T / math.sqrt(HIDDEN)).float()
        model.generation_config.pad_token_id = config.pad_token_id
        model.generation_config.eos_token_id = config.eos_token_id
        self.model = model.eval()

    def logprob(self, prev: str, text: str) -> float:
        """log p(text | previous character ``prev``) under the table."""
        total, a = 0.0, prev
        for b in text:
            row = self.L[self.vocab[a]]
            total += float(row[self.vocab[b]] - torch.logsumexp(row, 0))
            a = b
        return total


def chain(reply: str, strength: float = 12.0) -> dict[tuple[str, str], float]:
    """Transitions that make greedy decoding after a newline write ``reply`` (distinct characters), then EOS."""
    assert len(set(reply)) == len(reply) and "\n" not in reply
    steps = ["\n", *reply, "<|im_end|>"]
    return {(a, b): strength for a, b in itertools.pairwise(steps)}


@pytest.fixture
def bigram():
    return Bigram


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: these models are tiny, and OpenMP threads waiting on each other slow tiny ops down tens of
    times on a busy 2-core machine (as the demo and the CLI tests run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
