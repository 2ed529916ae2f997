"""oprm-rag: OPRM (Overflow Prevention for Recurrent Models) as a retriever-free context selector.

Recurrent LLMs keep a fixed-size state that overflows on long inputs. OPRM splits the
context into chunks, prefills ``[instruction, chunk, question]`` for every chunk as a
batch, scores each chunk by the entropy of the first answer token, drops chunks that
answer the IDK word, and decodes the answer from the winning chunk's state.

Heavy modules (torch, transformers) load lazily on first use of a name below.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Folder of the shipped demo model (a small Mamba-2 trained on associative recall).
DEMO_MODEL: str = str(Path(__file__).parent / "demo" / "model")

_LAZY = {
    "RecurrentLM": "oprm_rag.lm",
    "ModelContext": "oprm_rag.context",
    "TokenStream": "oprm_rag.decoding.loop",
    "OPRMSelector": "oprm_rag.selector",
    "SelectorOptions": "oprm_rag.options",
    "Engine": "oprm_rag.engine",
    "SelectionResult": "oprm_rag.results",
    "Answer": "oprm_rag.results",
    "AnswerStream": "oprm_rag.results",
    "ChunkScore": "oprm_rag.results",
    "Chunk": "oprm_rag.results",
    "Usage": "oprm_rag.results",
    "RecurrentState": "oprm_rag.state",
    "DocumentStateCache": "oprm_rag.cache",
    "PromptTemplate": "oprm_rag.prompts",
    "GenerationConfig": "oprm_rag.decoding.config",
    "Generation": "oprm_rag.decoding.config",
    "CollapseMitigation": "oprm_rag.mitigation",
    "resolve_lm": "oprm_rag.registry",
    "OPRMError": "oprm_rag.errors",
    "InputError": "oprm_rag.errors",
    "OptionError": "oprm_rag.errors",
    "ModelLoadError": "oprm_rag.errors",
    "NonFiniteScoresError": "oprm_rag.errors",
    "ServerError": "oprm_rag.errors",
    "OpenAICompatibleLM": "oprm_rag.served",
}

__all__ = sorted([*_LAZY, "DEMO_MODEL", "load_demo_lm", "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from .cache import DocumentStateCache
    from .context import ModelContext
    from .decoding.loop import TokenStream
    from .engine import Engine
    from .errors import InputError, ModelLoadError, NonFiniteScoresError, OPRMError, OptionError, ServerError
    from .decoding.config import Generation, GenerationConfig
    from .lm import RecurrentLM
    from .mitigation import CollapseMitigation
    from .options import SelectorOptions
    from .prompts import PromptTemplate
    from .registry import resolve_lm
    from .results import Answer, AnswerStream, Chunk, ChunkScore, SelectionResult, Usage
    from .selector import OPRMSelector
    from .served import OpenAICompatibleLM
    from .state import RecurrentState


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oprm_rag' has no attribute {name!r}")


def load_demo_lm(device: str | None = None, **kwargs: Any) -> "RecurrentLM":
    """Load the shipped demo model (offline, a few MB)."""
    from .lm import RecurrentLM

    if not (Path(DEMO_MODEL) / "config.json").is_file():
        from .errors import ModelLoadError

        raise ModelLoadError(f"the demo model is missing from {DEMO_MODEL}; reinstall oprm-rag "
                                "or run `make train-demo-model` (a fine-tune of training/checkpoints/demo-v1)")
    return RecurrentLM.from_pretrained(DEMO_MODEL, device=device, **kwargs)
