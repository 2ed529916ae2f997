"""Engines: the one model type below the entry points.

* :mod:`.base`: the ``Engine`` protocol (six required methods) and its capabilities
  (``StatefulEngine``, ``QuestionLikelihood``);
* :mod:`.types`: the values that cross it (``EngineInfo``, ``Extension``, ``FirstTokens``...);
* :mod:`.local`: the in-process engines over a ``RecurrentLM`` (``LocalEngine`` for exact
  states, ``ReplayEngine`` for the token-replay fallback), one per model;
* :mod:`.handoff`: the winning chunk's state, handed to whoever generates next;
* :mod:`.resolve`: ``resolve(model) -> Engine``, called once at each entry point, and the
  process-wide memo of loaded models.

Importing this package loads no torch; ``local`` and ``resolve`` do, when imported.
"""

from .base import Engine, QuestionLikelihood, StatefulEngine
from .types import ChunkSize, EngineInfo, Extension, FirstTokens, LogitsWanted, TokenCounting

__all__ = ["Engine", "EngineInfo", "StatefulEngine", "QuestionLikelihood", "Extension", "FirstTokens", "ChunkSize",
           "LogitsWanted", "TokenCounting"]
