"""What the LangChain and LlamaIndex integrations share: their ``model`` field and their
option fields.

Frameworks build components often (LangChain's standard tests build chat models in a
loop, LlamaIndex builds them in ``Settings`` and ``as_query_engine``), so a component
keeps only what the user gave, checked without loading anything (:func:`check_model`),
and resolves it on first use through :func:`oprm_rag.resolve` (once per process and
path). Importing this module loads no torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .options import option_specs

if TYPE_CHECKING:  # pragma: no cover
    from .engine.local import InProcessEngine
    from .engine.resolve import ModelLike

__all__ = ["check_model", "model_name", "in_process", "option_fields"]


def _is_built(value: Any) -> bool:
    """A loaded ``RecurrentLM`` or an ``Engine``. Without importing torch: a value can only
    be a ``RecurrentLM`` if its module was imported, and the engine base is light."""
    from .engine.base import Engine

    lm_module = sys.modules.get("oprm_rag.lm")
    return isinstance(value, Engine) or (lm_module is not None and isinstance(value, lm_module.RecurrentLM))


def check_model(value: Any) -> "ModelLike":
    """Validate a ``model=`` argument without loading anything; paths become ``str``.

    Raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for an empty name
    (pydantic validators should turn the first into a ``ValueError``)."""
    if isinstance(value, os.PathLike):
        return str(Path(value))
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("model must be a RecurrentLM, an Engine or a non-empty path / hub name")
        return value
    if _is_built(value):
        return value
    raise TypeError(f"model must be an oprm_rag.RecurrentLM, an oprm_rag Engine or a path / hub name "
                    f"(an Engine: e.g. OpenAICompatibleLM for a served model), got {type(value).__name__}")


def model_name(model: "ModelLike") -> str:
    """The name a framework reports (tracing, metadata): never loads."""
    return str(model.name) if _is_built(model) else str(model)  # type: ignore[union-attr]


def in_process(model: "ModelLike", **load_options: Any) -> "InProcessEngine":
    """The in-process engine the chat and text wrappers decode with; a served model is refused
    with what to use instead (its server's own chat model)."""
    from .engine.local import InProcessEngine
    from .engine.resolve import resolve

    engine = resolve(model, **load_options)
    if not isinstance(engine, InProcessEngine):
        raise TypeError(f"{engine.name} is a served model: use a chat model for its server (e.g. "
                        "ChatOpenAI(base_url=...) or LlamaIndex's OpenAILike) to generate with it")
    return engine


def option_fields(exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The core selector options as pydantic field definitions (for ``create_model``), in the
    core's order: names, defaults and descriptions from ``SelectorOptions``.

    The type is ``Any``: the core checks every value (one copy of every check; pydantic's
    lax coercion would turn 2.0 or "3" into 3 before the core could refuse it), and the
    description names the type.
    """
    from pydantic import Field

    skip = set(exclude)
    return {spec.name: (Any, Field(default=spec.default, description=f"{spec.doc} ({spec.annotation})"))
            for spec in option_specs() if spec.name not in skip}
