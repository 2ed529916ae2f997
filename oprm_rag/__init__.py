"""oprm-rag: OPRM (Overflow Prevention for Recurrent Models) as a retriever-free context selector.

Recurrent LLMs keep a fixed-size state that overflows on long inputs. OPRM splits the
context into chunks, prefills ``[instruction, chunk, question]`` for every chunk as a
batch, scores each chunk by the entropy of the first answer token, drops chunks that
answer the IDK word, and decodes the answer from the winning chunk's state.

The public surface is the names below; everything else lives in its module
(``oprm_rag.results.Usage``, ``oprm_rag.state.RecurrentState``...). Heavy modules
(torch, transformers) load lazily on first use of a name.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import Any

from ._about import DEMO_MODEL, __version__

#: The public names and the modules that hold them (loaded on first use).
_PUBLIC = {
    "OPRMSelector": "oprm_rag.selector",
    "SelectorOptions": "oprm_rag.options",
    "resolve": "oprm_rag.engine.resolve",
    "Engine": "oprm_rag.engine.base",
    "RecurrentLM": "oprm_rag.lm",
    "OpenAICompatibleLM": "oprm_rag.served.engine",
    "SelectionResult": "oprm_rag.results",
    "Answer": "oprm_rag.results",
    "ChunkScore": "oprm_rag.results",
    "GenerationConfig": "oprm_rag.decoding.config",
    "PromptTemplate": "oprm_rag.prompts",
    "OPRMError": "oprm_rag.errors",
    "InputError": "oprm_rag.errors",
    "ModelLoadError": "oprm_rag.errors",
    "ServerError": "oprm_rag.errors",
    "load_demo_lm": "oprm_rag.lm",
}

#: Names this package exported before 0.2, kept one release with a warning: (module, name there).
_MOVED = {
    "ModelContext": ("oprm_rag.engine.local", "LocalEngine"),
    "resolve_lm": ("oprm_rag.engine.resolve", "load_model"),
    "TokenStream": ("oprm_rag.decoding.loop", "TokenStream"),
    "Generation": ("oprm_rag.decoding.config", "Generation"),
    "AnswerStream": ("oprm_rag.results", "AnswerStream"),
    "Chunk": ("oprm_rag.results", "Chunk"),
    "Usage": ("oprm_rag.results", "Usage"),
    "RecurrentState": ("oprm_rag.state", "RecurrentState"),
    "DocumentStateCache": ("oprm_rag.storage.cache", "DocumentStateCache"),
    "CollapseMitigation": ("oprm_rag.mitigation", "CollapseMitigation"),
    "OptionError": ("oprm_rag.errors", "OptionError"),
    "NonFiniteScoresError": ("oprm_rag.errors", "NonFiniteScoresError"),
}

__all__ = sorted([*_PUBLIC, "DEMO_MODEL", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        module, new = _MOVED[name]
        warnings.warn(f"oprm_rag.{name} is deprecated and will be removed in 0.3; use {module}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(import_module(module), new)
    raise AttributeError(f"module 'oprm_rag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
