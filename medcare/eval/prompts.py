"""Prompts for evaluation items: the user turn, rendered with the tokenizer's chat template when it has one.

A multiple-choice item's user turn (PubMedQA's context first)::

    Context: <context>

    <question>

    A. <option A>
    B. <option B>
    ...

    Answer with the letter of the correct option.        (generate and letter-loglik; "letters of all the
                                                          correct options" for multi-answer items)

The rendering is :func:`medcare.data.dataset.prompt_text`, as in training: the chat template with the
generation prompt (``template="auto"`` when the tokenizer has one), else the plain ``### Instruction`` /
``### Response`` template. Earlier turns of an instruction record (system prompt, previous turns) come first.
"""

from __future__ import annotations

from typing import Any

from medcare.data.dataset import prompt_text, resolve_template
from medcare.eval.records import EvalItem

__all__ = ["INSTRUCTION_MULTI", "INSTRUCTION_SINGLE", "full_messages", "prompt_for", "user_turn"]

INSTRUCTION_SINGLE = "Answer with the letter of the correct option."
INSTRUCTION_MULTI = "Answer with the letters of all the correct options."


def user_turn(item: EvalItem, instruction: bool = True) -> str:
    """The question as the user asks it: context, question, lettered options, and (``instruction``) the
    answer instruction of a multiple-choice item. An instruction record's user turn unchanged."""
    if not item.is_choice:
        return item.question
    parts = []
    if item.context:
        parts.append(f"Context: {item.context}")
    parts.append(item.question)
    parts.append("\n".join(f"{letter}. {text}" for letter, text in item.options))
    if instruction:
        parts.append(INSTRUCTION_MULTI if item.is_multi else INSTRUCTION_SINGLE)
    return "\n\n".join(parts)


def _messages(item: EvalItem, system: str | None, instruction: bool) -> list[dict[str, str]]:
    messages = list(item.messages)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    messages.append({"role": "user", "content": user_turn(item, instruction)})
    return messages


def prompt_for(item: EvalItem, tokenizer: Any, template: str = "auto", system: str | None = None,
               instruction: bool = True) -> str:
    """The text the model continues: the item's turns rendered up to the assistant's reply (generation prompt)."""
    return prompt_text(_messages(item, system, instruction), tokenizer, template)


def full_messages(item: EvalItem, system: str | None = None) -> list[dict[str, str]]:
    """The item as a whole conversation: its prompt turns and the reference answer (gold option texts for a
    multiple-choice item) as the assistant turn (``medcare experts`` routes these tokens)."""
    return [*_messages(item, system, True), {"role": "assistant", "content": item.reference}]


def adds_special_tokens(tokenizer: Any, template: str = "auto") -> bool:
    """Whether prompts are tokenised with the tokenizer's special tokens (BOS): with the plain template, as
    in training; a chat template writes its own."""
    return resolve_template(tokenizer, template) == "plain"
