"""One loaded model per path in a process, shared by every wrapper that names it.

Frameworks construct their components often (LangChain's standard tests build chat
models in a loop); they must never load weights there. Wrappers keep the path and call
:func:`resolve_lm` on first use: the first call loads, every later call with the same
path and options gets the same ``RecurrentLM``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .lm import RecurrentLM

__all__ = ["resolve_lm", "loaded_models", "forget_models"]

_LOADED: dict[tuple[str, str], RecurrentLM] = {}
_LOCK = threading.Lock()


def _key(path: str | Path, options: dict[str, Any]) -> tuple[str, str]:
    p = Path(str(path)).expanduser()
    name = str(p.resolve()) if p.exists() else str(path)
    return name, repr(sorted((k, str(v)) for k, v in options.items()))


def resolve_lm(model: "RecurrentLM | str | Path", **load_options: Any) -> RecurrentLM:
    """Return ``model`` if it is a ``RecurrentLM``, else the shared one loaded from that path."""
    if isinstance(model, RecurrentLM):
        return model
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a RecurrentLM or a path / hub name, got {type(model).__name__}")
    key = _key(model, load_options)
    with _LOCK:
        lm = _LOADED.get(key)
        if lm is None:
            lm = RecurrentLM.from_pretrained(str(model), **load_options)
            _LOADED[key] = lm
        return lm


def loaded_models() -> list[RecurrentLM]:
    with _LOCK:
        return list(_LOADED.values())


def forget_models() -> None:
    """Drop the shared models (tests; freeing memory)."""
    with _LOCK:
        _LOADED.clear()
