"""How the LangChain classes name and reach the one shared model.

LangChain builds components often (configurable fields rebuild them per call, the
standard tests build chat models in a loop), so a component only keeps what the user
gave: a loaded ``RecurrentLM``, an ``Engine`` (a served model), or a path. Weights load
on first use, through ``oprm_rag.registry.resolve_lm``, once per process and path.
Importing this package does not import torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from oprm_rag.engine import Engine
    from oprm_rag.lm import RecurrentLM

    #: A loaded model, a served model, or the folder / hub name to load it from.
    ModelLike = Union[RecurrentLM, Engine, str, os.PathLike[str]]
else:  # pydantic sees Any: the real check is `check_model` (no torch import needed)
    ModelLike = Any

__all__ = ["ModelLike", "check_model", "validate_model_field", "model_name", "resolve", "resolve_lm"]


def _is_lm(value: Any) -> bool:
    lm_module = sys.modules.get("oprm_rag.lm")
    return lm_module is not None and isinstance(value, lm_module.RecurrentLM)


def _is_engine(value: Any) -> bool:
    engine_module = sys.modules.get("oprm_rag.engine")
    return engine_module is not None and isinstance(value, engine_module.Engine)


def check_model(value: Any) -> Any:
    """Validate a ``model=`` argument without loading anything; paths become ``str``."""
    if isinstance(value, os.PathLike):
        return str(Path(value))
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("model must be a RecurrentLM, an Engine or a non-empty path / hub name")
        return value
    if _is_lm(value) or _is_engine(value):
        return value
    raise TypeError(f"model must be an oprm_rag.RecurrentLM, an oprm_rag Engine or a path / hub name, "
                    f"got {type(value).__name__}")


def validate_model_field(value: Any) -> Any:
    """``check_model`` for pydantic validators (which report ValueError, not TypeError)."""
    try:
        return check_model(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def model_name(model: Any) -> str:
    """The name reported to LangChain (tracing, ``response_metadata``): never loads."""
    return str(model.name) if (_is_lm(model) or _is_engine(model)) else str(model)


def resolve(model: Any) -> Any:
    """What the selector runs on: the model as given, or the shared one for a path."""
    if _is_lm(model) or _is_engine(model):
        return model
    from oprm_rag.registry import resolve_lm as _resolve

    return _resolve(model)


def resolve_lm(model: Any) -> "RecurrentLM":
    """The in-process ``RecurrentLM`` the chat and text wrappers decode with."""
    if _is_engine(model):
        lm = getattr(model, "lm", None)
        if lm is None:
            raise TypeError(f"{model_name(model)} is a served model: use a chat model for its server (e.g. "
                            "ChatOpenAI(base_url=...)) instead of ChatRecurrent / RecurrentLLM")
        return lm
    return resolve(model)
