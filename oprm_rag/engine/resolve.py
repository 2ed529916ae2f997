"""``resolve(model) -> Engine``: what a user passed, turned into an engine once, at the edge.

Every public entry point (the selector, the CLI, the web app, eval, the LangChain and
LlamaIndex integrations) calls :func:`resolve` on the ``model`` it was given; everything
below takes an :class:`~oprm_rag.engine.base.Engine`. It accepts:

* an ``Engine`` (an in-process engine, ``OpenAICompatibleLM``...): returned as is;
* a ``RecurrentLM``: its one in-process engine (:func:`~oprm_rag.engine.local.engine_for`);
* a folder, a ``.gguf``-holding folder or a hub name: the model loaded once per process
  and options (:func:`load_model`), and its engine;
* an ``http://`` / ``https://`` URL of an OpenAI-compatible server (``model=`` names the
  served model where the server has several): ``OpenAICompatibleLM``.

Frameworks construct their components often (LangChain's standard tests build chat
models in a loop); they must never load weights there. Wrappers keep what the user gave
(:class:`oprm_rag.integration.ModelRef`) and resolve it on first use: the first call
loads, every later call with the same path and options gets the same model.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Union

from ..errors import OptionError
from ..lm import RecurrentLM
from .base import Engine
from .local import engine_for

#: What ``model=`` takes at an entry point: an engine, a loaded model, a path / hub name or a URL.
ModelLike = Union[Engine, RecurrentLM, str, "os.PathLike[str]"]

__all__ = ["resolve", "load_model", "loaded_models", "forget_models", "ModelLike"]

_LOADED: dict[tuple[str, str], RecurrentLM] = {}
_LOCK = threading.Lock()


def resolve(model: "ModelLike", /, **load_options: Any) -> Engine:
    """The engine for ``model`` (see the module docstring for what it takes).

    ``load_options`` go to ``RecurrentLM.from_pretrained`` for a path, or to
    ``OpenAICompatibleLM`` for a URL; they are refused for a model already built.
    """
    if isinstance(model, (Engine, RecurrentLM)):
        if load_options:
            raise OptionError(f"loading options {sorted(load_options)} apply to a path or a URL, not to a "
                              f"{type(model).__name__} that is already built")
        return model if isinstance(model, Engine) else engine_for(model)
    if isinstance(model, bytes) or not isinstance(model, (str, os.PathLike)):
        raise OptionError(f"model must be a RecurrentLM, an Engine (e.g. OpenAICompatibleLM), a path / hub name "
                          f"or a server URL, got {type(model).__name__}")
    text = os.fspath(model)
    if not text.strip():
        raise OptionError("model must name a model folder, a hub id or a server URL, got an empty string")
    if text.startswith(("http://", "https://")):
        from ..served import OpenAICompatibleLM

        return OpenAICompatibleLM(base_url=text, **load_options)
    return engine_for(load_model(text, **load_options))


def _key(path: str | Path, options: dict[str, Any]) -> tuple[str, str]:
    p = Path(str(path)).expanduser()
    name = str(p.resolve()) if p.exists() else str(path)
    return name, repr(sorted((k, str(v)) for k, v in options.items()))


def load_model(path: str | os.PathLike[str], **load_options: Any) -> RecurrentLM:
    """The process-wide ``RecurrentLM`` loaded from ``path`` with ``load_options`` (loaded
    on the first call, shared by every later one)."""
    key = _key(path, load_options)
    with _LOCK:
        lm = _LOADED.get(key)
        if lm is None:
            lm = RecurrentLM.from_pretrained(os.fspath(path), **load_options)
            _LOADED[key] = lm
        return lm


def loaded_models() -> list[RecurrentLM]:
    with _LOCK:
        return list(_LOADED.values())


def forget_models() -> None:
    """Drop the shared models (tests; freeing memory)."""
    with _LOCK:
        _LOADED.clear()
