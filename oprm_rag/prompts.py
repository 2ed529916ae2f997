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
import logging
import unicodedata
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import InputError, OptionError

__all__ = ["PromptTemplate", "DEFAULT_IDK_WORD", "PROMPT_FILE"]

logger = logging.getLogger("oprm_rag")

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
        if self.question_template.count("{question}") != 1:
            raise InputError("question_template needs exactly one {question} field")
        if not isinstance(self.idk_word, str) or not self.idk_word.strip():
            raise InputError("idk_word must be a non-empty word")
        # The word as answers spell it: no surrounding spaces (answers are compared stripped)
        # and in NFC, the form tokenizers and decoders produce (a macOS NFD "Erreur" would not match).
        word = unicodedata.normalize("NFC", self.idk_word.strip())
        if word != self.idk_word:
            object.__setattr__(self, "idk_word", word)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> "PromptTemplate":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable JSON prompt file ({exc})") from exc
        if not isinstance(data, dict):
            raise InputError(f"{path}: a prompt file holds a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"{path}: unknown prompt fields {sorted(unknown)}")
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
        """This prompt with another IDK word, refused where the prompt would still tell the
        model to answer the old one.

        A prompt whose text names its IDK word through an ``{idk}`` field follows the new
        word. One that spells the old word out literally (the shipped demo model's does,
        being trained on it) would ask for one word while the filter looks for another: a
        silent wrong answer, so it is refused. One that names no IDK word at all is
        allowed with a warning: the model is never told the word.
        """
        if word == self.idk_word:
            return self
        texts = (self.instruction, self.question_template)
        if not any("{idk}" in t for t in texts):
            if any(self.idk_word in t for t in texts):
                raise OptionError(
                    f"idk_word={word!r} disagrees with the prompt, which tells the model to answer "
                    f"{self.idk_word!r} and has no {{idk}} field to change it; pass a prompt whose instruction "
                    f"or question uses {{idk}}, or leave idk_word unset")
            logger.warning("idk_word=%r: the prompt never names an IDK word ({idk}); the model is not told to "
                           "answer it, so the IDK filter may never fire", word)
        return replace(self, idk_word=word)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ rendering
    def _fill(self, text: str, question: str | None = None) -> str:
        text = text.replace("{idk}", self.idk_word)
        return text.replace("{question}", question) if question is not None else text

    def turn(self, context: str, question: str) -> str:
        """The user turn's text (``P + C + Q`` without any chat wrapping)."""
        return self._fill(self.instruction) + context + self._fill(self.question_template, question)

    def split(self, question: str, renderer: Any = None) -> tuple[str, str]:
        """The text before the chunk (P) and after it (Q) for ``question``.

        With ``use_chat_template``, ``renderer`` applies the model's chat template: an
        ``Engine`` (``apply_chat_template(messages)``) or a transformers tokenizer.
        """
        before = self._fill(self.instruction)
        after = self._fill(self.question_template, question)
        if not self.use_chat_template:
            return before, after
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": before + _SENTINEL + after})
        rendered = _render_chat(renderer, messages)
        if rendered.count(_SENTINEL) != 1:
            raise InputError("the chat template altered the chunk marker; set use_chat_template=False")
        p, q = rendered.split(_SENTINEL)
        return p, q

    def render(self, question: str, context: str, renderer: Any = None) -> str:
        """The exact text of ``[P, C, Q]``: the one rendering of an OPRM input, used by the
        selector and by every wrapper that must send a model the same text."""
        p, q = self.split(question, renderer)
        return p + context + q

    def prefix(self, renderer: Any = None) -> str:
        """P alone (it does not depend on the question)."""
        return self.split("?", renderer)[0]


def _render_chat(renderer: Any, messages: list[dict[str, str]]) -> str:
    """Apply a chat template through an Engine or a transformers tokenizer."""
    if renderer is not None and hasattr(renderer, "chat_template"):  # a transformers tokenizer
        if not getattr(renderer, "chat_template", None):
            renderer = None
        else:
            return renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered = renderer.apply_chat_template(messages) if renderer is not None else None
    if rendered is None:
        raise InputError("use_chat_template=True needs a model with a chat template; this one has none "
                         "(use a PromptTemplate with use_chat_template=False)")
    return rendered
