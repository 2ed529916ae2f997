"""Helpers shared by the OPRM LlamaIndex components: lazy model handles and a thread bridge.

Every component here (LLM, postprocessor, query engine) names the one shared model by
path and resolves it on first use through ``oprm_rag.resolve``, because LlamaIndex builds components eagerly (in
``Settings``, in ``as_query_engine``) and loading weights there would load them again and
again. The model runs on CPU/GPU for a long time per call, so the async methods run it in
a worker thread and pass results back through an ``asyncio.Queue``: the event loop stays
free while the model works.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Dict, Iterator, Optional, Tuple, TypeVar, Union

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr

from oprm_rag import DEMO_MODEL

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.engine import Engine
    from oprm_rag.engine.local import InProcessEngine
    from oprm_rag.lm import RecurrentLM

__all__ = ["ModelArg", "LazyModel", "split_model_arg", "aiter_in_thread"]

T = TypeVar("T")

#: What ``model=`` accepts: a loaded ``RecurrentLM``, an ``Engine`` (a served model, for the
#: postprocessor and the query engine), or a folder / hub name to load once.
ModelArg = Union["RecurrentLM", "Engine", str, Path]


def split_model_arg(model: Any) -> Tuple[str, Optional[Any]]:
    """``model=`` as a serialisable name plus the instance when one was given (checked by
    the core, ``oprm_rag.integration.check_model``, without loading anything).

    Pydantic fields must stay serialisable (LlamaIndex dumps components into events), so
    components keep the name in a field and the instance in a private attribute.
    """
    from oprm_rag.integration import check_model, model_name

    checked = check_model(model)
    if isinstance(checked, str):
        return checked, None
    return model_name(checked), checked


class LazyModel(BaseModel):
    """The ``model`` every OPRM component takes, and the engine behind it.

    The field holds the model's name (serialisable, see ``split_model_arg``); a loaded
    model or an engine given to the constructor is kept as is, and a path is resolved on
    first use (``oprm_rag.resolve``, once per process), never at construction. A component
    lists it before its LlamaIndex base class (``class RecurrentLLM(LazyModel, CustomLLM)``),
    so this constructor runs first and hands the name on. Subclasses declare
    ``model_kwargs`` (the loading options) among their own fields, where it has always
    been in their field order.
    """

    model: str = Field(default=DEMO_MODEL, description="Model folder or hub name (the loaded model's name).")

    _held: Any = PrivateAttr(default=None)
    _engine: Any = PrivateAttr(default=None)

    if TYPE_CHECKING:  # pragma: no cover
        model_kwargs: Dict[str, Any]

    def __init__(self, model: ModelArg = DEMO_MODEL, **kwargs: Any) -> None:
        name, held = split_model_arg(model)
        super().__init__(model=name, **kwargs)
        self._held = held

    @property
    def engine(self) -> "Engine":
        """The engine (resolved on first access, never at construction)."""
        if self._engine is None:
            from oprm_rag import resolve

            self._engine = resolve(self._held) if self._held is not None else resolve(self.model,
                                                                                      **self.model_kwargs)
        return self._engine

    @property
    def local(self) -> "InProcessEngine":
        """The in-process engine (a served model is refused with what to use instead)."""
        from oprm_rag.integration import in_process

        return in_process(self.engine)

    @property
    def lm(self) -> "RecurrentLM":
        """The shared ``RecurrentLM`` (loaded on first access, never at construction)."""
        return self.local.lm


async def aiter_in_thread(factory: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
    """The engine's worker-thread bridge (``oprm_rag.aio.aiter_in_thread``): the model runs
    off the event loop; stopping early stops the worker."""
    from oprm_rag.aio import aiter_in_thread as _bridge

    async for item in _bridge(factory):
        yield item
