"""Instruction and question templates, chat templates, and the IDK word.

OPRM runs every chunk as ``[instruction P, chunk C_i, question Q]``. The instruction is
identical for all chunks (its state is computed once), the question follows the chunk,
and the question tells the model to answer the IDK word when the text lacks the answer,
which is what lets the selector drop chunks that "know they do not know".

A model folder may carry ``oprm_prompt.json`` (the shipped demo model does): those
templates are what the model was trained on, and they are used without the caller
passing anything. Instruction-tuned models with a chat template get P and Q cut out of
their rendered chat turn, so the chunk sits inside the user message.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["PromptTemplate", "DEFAULT_IDK_WORD", "PROMPT_FILE"]

DEFAULT_IDK_WORD = "Error"
PROMPT_FILE = "oprm_prompt.json"
_SENTINEL = "\u2063OPRM_CHUNK\u2063"

_DEFAULT_INSTRUCTION = (
    "You are given a text and a question. Answer the question using only the text. "
    "If the text does not contain the answer, answer \"{idk}\".\n\nText:\n"
)
_DEFAULT_QUESTION = "\n\nQuestion: {question}\nIf the text does not contain the answer, answer \"{idk}\".\nAnswer:"
_DEFAULT_SUMMARY = "Summarize the text above in a few sentences."


@dataclass(frozen=True)
class PromptTemplate:
    """How chunk and question become model input.

    ``instruction`` comes before the chunk, ``question_template`` after it (with a
    ``{question}`` field); ``{idk}`` in either is replaced by ``idk_word``. With
    ``use_chat_template`` the tokenizer's chat template wraps the whole user turn.
    """

    instruction: str = _DEFAULT_INSTRUCTION
    question_template: str = _DEFAULT_QUESTION
    idk_word: str = DEFAULT_IDK_WORD
    use_chat_template: bool = False
    summary_question: str = _DEFAULT_SUMMARY
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if "{question}" not in self.question_template:
            raise ValueError("question_template needs a {question} field")
        if not self.idk_word.strip():
            raise ValueError("idk_word must be a non-empty word")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> "PromptTemplate":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown prompt fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def for_model(cls, model_dir: str | Path | None, tokenizer: Any) -> "PromptTemplate":
        """The model folder's ``oprm_prompt.json`` if any; else the chat or plain default."""
        if model_dir is not None:
            f = Path(model_dir) / PROMPT_FILE
            if f.is_file():
                return cls.from_file(f)
        if getattr(tokenizer, "chat_template", None):
            return cls(
                instruction="Answer the question using only the text below. If the text does not "
                            "contain the answer, answer \"{idk}\".\n\nText:\n",
                question_template="\n\nQuestion: {question}",
                use_chat_template=True,
            )
        return cls()

    def with_idk_word(self, word: str) -> "PromptTemplate":
        return replace(self, idk_word=word)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ rendering
    def _fill(self, text: str, question: str | None = None) -> str:
        text = text.replace("{idk}", self.idk_word)
        return text.replace("{question}", question) if question is not None else text

    def split(self, question: str, tokenizer: Any = None) -> tuple[str, str]:
        """The text before the chunk (P) and after it (Q) for ``question``."""
        before = self._fill(self.instruction)
        after = self._fill(self.question_template, question)
        if not self.use_chat_template:
            return before, after
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True needs a tokenizer with a chat template")
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": before + _SENTINEL + after})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the chat template altered the chunk marker; set use_chat_template=False")
        p, q = rendered.split(_SENTINEL)
        return p, q

    def prefix(self, tokenizer: Any = None) -> str:
        """P alone (it does not depend on the question)."""
        return self.split("?", tokenizer)[0]
