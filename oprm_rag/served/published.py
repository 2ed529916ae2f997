"""A model's OPRM prompt, published through its chat template, where any server serves it.

A model trained on OPRM's ``[P, C, Q]`` format (the shipped demo model) answers right only
when it reads exactly that format, which lives in its folder's ``oprm_prompt.json``. A
user of a deployment has a URL and a model name, not the folder; what a server *does*
serve of a folder is its chat template (vLLM's ``/tokenize`` and chat endpoints,
llama.cpp's ``/apply-template``, SGLang, TGI). So the folder's chat template publishes the
prompt: rendered with the template argument ``oprm_prompt=true`` it gives one JSON line

    {"oprm_prompt": {...the fields of oprm_prompt.json...}, "train_context_tokens": 512}

and without that argument it renders chats exactly as before. The served engine asks for
it once; a template that does not publish (any other model) renders the chat as usual,
which is not JSON, and the engine falls back to the chat or plain default prompt.

:func:`chat_template_branch` writes the template's branch from the folder's files and
:func:`check_folder` says whether a folder's template is in step with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..prompts import PromptTemplate

__all__ = ["PUBLISH_KWARG", "PublishedFormat", "parse_published", "chat_template_branch", "folder_format",
           "check_folder", "training_length"]

#: The chat-template argument that asks a template for its model's OPRM prompt.
PUBLISH_KWARG = "oprm_prompt"
#: The messages sent along (a template may insist on at least one).
PROBE_MESSAGES = [{"role": "user", "content": "?"}]


@dataclass(frozen=True)
class PublishedFormat:
    """What a model publishes: the prompt it was trained on and its training length."""

    prompt: "PromptTemplate"
    train_context_tokens: int | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {PUBLISH_KWARG: self.prompt.to_dict()}
        if self.train_context_tokens is not None:
            data["train_context_tokens"] = int(self.train_context_tokens)
        return json.dumps(data, sort_keys=True, ensure_ascii=True)


def parse_published(text: str | None) -> PublishedFormat | None:
    """The format in a rendered template, or None where the template published none (its
    usual chat rendering is not this JSON). A JSON object under the key that does not make
    a prompt is an error: the model says it has a format and the format is broken."""
    from ..prompts import PromptTemplate

    if not text:
        return None
    text = text.strip()
    if not text.startswith("{") or f'"{PUBLISH_KWARG}"' not in text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get(PUBLISH_KWARG), dict):
        return None
    fields = data[PUBLISH_KWARG]
    known = set(PromptTemplate.__dataclass_fields__)
    if set(fields) - known:
        raise InputError(f"the model's chat template publishes an OPRM prompt with unknown fields "
                         f"{sorted(set(fields) - known)}")
    train = data.get("train_context_tokens")
    train = train if isinstance(train, int) and not isinstance(train, bool) and train > 0 else None
    return PublishedFormat(PromptTemplate(**fields), train)


def folder_format(model_dir: str | Path) -> PublishedFormat:
    """The format a model folder holds: ``oprm_prompt.json`` and ``training_log.json``'s
    ``train_context_tokens``."""
    from ..prompts import PROMPT_FILE, PromptTemplate

    folder = Path(model_dir)
    return PublishedFormat(PromptTemplate.from_file(folder / PROMPT_FILE), training_length(folder))


def training_length(model_dir: str | Path) -> int | None:
    """The context a model folder says it was trained on: ``training_log.json``'s
    ``train_context_tokens``, else the config's position limit (as in process)."""
    folder = Path(model_dir)
    for name, keys in (("training_log.json", ("train_context_tokens",)),
                       ("config.json", ("max_position_embeddings", "n_positions", "max_seq_len", "context_length"))):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def chat_template_branch(fmt: PublishedFormat, chat_template: str) -> str:
    """``chat_template`` with a first branch that publishes ``fmt`` when rendered with
    ``oprm_prompt=true``; every other rendering is ``chat_template``'s own."""
    body = fmt.to_json()
    if any(tag in body for tag in ("{{", "{%", "{#", "}}", "%}", "#}")):  # pragma: no cover - ensure_ascii JSON
        raise InputError("the OPRM prompt's JSON contains Jinja delimiters; it cannot be published verbatim")
    return (f"{{%- if {PUBLISH_KWARG} is defined and {PUBLISH_KWARG} -%}}{body}{{%- else -%}}"
            f"{chat_template}{{%- endif -%}}")


def check_folder(model_dir: str | Path) -> str | None:
    """None when the folder's ``chat_template.jinja`` publishes exactly its
    ``oprm_prompt.json`` and training length; else what is wrong."""
    folder = Path(model_dir)
    path = folder / "chat_template.jinja"
    if not path.is_file():
        return f"{folder} has no chat_template.jinja"
    text = path.read_text(encoding="utf-8")
    want = folder_format(folder).to_json()
    if want not in text:
        return f"{path} does not publish {want} (rewrite it with oprm_rag.served.published.chat_template_branch)"
    return None
