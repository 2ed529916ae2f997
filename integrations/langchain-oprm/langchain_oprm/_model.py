"""How the LangChain classes name and reach the one shared ``RecurrentLM``.

LangChain builds components often (configurable fields rebuild them per call, the
standard tests build chat models in a loop), so a component only keeps what the user
gave: a loaded ``RecurrentLM`` or a path. Weights load on first use, through
``oprm_rag.registry.resolve_lm``, once per process and path. Importing this package
does not import torch; a ``RecurrentLM`` can only exist once torch is loaded anyway.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from oprm_rag.lm import RecurrentLM
    from oprm_rag.selector import OPRMSelector as EngineSelector

    #: A loaded model or the folder / hub name to load it from.
    ModelLike = Union[RecurrentLM, str, os.PathLike[str]]
else:  # pydantic sees Any: the real check is `check_model` (no torch import needed)
    ModelLike = Any

__all__ = ["ModelLike", "check_model", "validate_model_field", "model_name", "resolve", "engine_selector"]


def _is_lm(value: Any) -> bool:
    lm_module = sys.modules.get("oprm_rag.lm")
    return lm_module is not None and isinstance(value, lm_module.RecurrentLM)


def check_model(value: Any) -> Any:
    """Validate a ``model=`` argument without loading anything; paths become ``str``."""
    if isinstance(value, os.PathLike):
        return str(Path(value))
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("model must be a RecurrentLM or a non-empty path / hub name")
        return value
    if _is_lm(value):
        return value
    raise TypeError(f"model must be an oprm_rag.RecurrentLM or a path / hub name, got {type(value).__name__}")


def validate_model_field(value: Any) -> Any:
    """``check_model`` for pydantic validators (which report ValueError, not TypeError)."""
    try:
        return check_model(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def model_name(model: Any) -> str:
    """The name reported to LangChain (tracing, ``response_metadata``): never loads."""
    return str(model.name) if _is_lm(model) else str(model)


def resolve(model: Any) -> "RecurrentLM":
    """The shared ``RecurrentLM`` for ``model`` (loads on the first call for a path)."""
    from oprm_rag.registry import resolve_lm

    return resolve_lm(model)


# One engine selector per (model, configuration). Engine selectors are cheap, but a
# configurable field makes LangChain rebuild the wrapper on every call; reusing the
# engine object keeps its IDK token set and prompt split, while the chunk states live
# in the model's shared document cache either way. Bounded: an entry holds its model.
_ENGINES: "OrderedDict[tuple[int, tuple[tuple[str, Any], ...]], EngineSelector]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 64


def engine_selector(lm: "RecurrentLM", options: dict[str, Any]) -> "EngineSelector":
    """The engine ``OPRMSelector`` over ``lm`` with ``options``, made once per distinct set."""
    from oprm_rag.selector import OPRMSelector as EngineSelector

    key = (id(lm), tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        found = _ENGINES.get(key)
        if found is not None and found.lm is lm:
            _ENGINES.move_to_end(key)
            return found
    made = EngineSelector(lm, **options)
    with _ENGINES_LOCK:
        _ENGINES[key] = made
        _ENGINES.move_to_end(key)
        while len(_ENGINES) > _MAX_ENGINES:
            _ENGINES.popitem(last=False)
    return made
