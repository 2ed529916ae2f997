"""``OPRMSelector``: OPRM context selection as an LCEL runnable.

Input ``{"question": str, "documents": list[Document] | str}``, output the selected
chunks as ``Document`` objects, best first. The recurrent model itself scores every
chunk (no embeddings, no index), so this plays the part a retriever plays in a RAG
chain and reports to callbacks as a retriever run, with the chosen documents as its
output. ``batch``/``abatch`` hand all questions to the engine's ``select_many`` in one
call, so chunks of several questions share model batches and documents shared between
questions are prefilled once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.documents import Document
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config, get_config_list, run_in_executor
from typing_extensions import TypedDict

from ._documents import DocumentsInput, Request, parse_request, query_of, selected_documents
from ._options import SelectorFields

if TYPE_CHECKING:
    from oprm_rag.selector import SelectionResult

__all__ = ["OPRMSelector", "OPRMSelectorInput"]


class OPRMSelectorInput(TypedDict):
    """What ``OPRMSelector`` takes: a question and the documents to select from."""

    question: str
    documents: DocumentsInput


class OPRMSelector(SelectorFields, RunnableSerializable[OPRMSelectorInput, list[Document]]):
    """Select the chunks of ``documents`` that the recurrent model can answer ``question`` from.

    Each output ``Document`` holds one chunk's text and its source document's metadata,
    plus ``relevance_score`` (what the selection ranked by, higher is better: the
    negative entropy) and the core's ``oprm_*`` keys (``oprm_entropy``, ``oprm_rank``
    (0 = best), ``oprm_chunk_index``, ``oprm_char_start``/``oprm_char_end`` (the chunk's
    span in the source text), ``oprm_doc_index`` (the source's position in the input
    list), ...). An empty list means no chunk could answer (set
    ``fallback="min_entropy"`` to always get one).

    The state after ``[instruction, chunk, question]`` of each selected chunk is handed
    off on the model: a ``ChatRecurrent`` or ``RecurrentLLM`` on the same model that
    receives exactly ``core_selector().prompt_text(question, chunk)`` resumes from it
    (see ``create_oprm_qa_chain``).

    Example:
        .. code-block:: python

            from langchain_oprm import OPRMSelector

            selector = OPRMSelector(model="path/to/mamba2", chunk_tokens=512, top_k=2)
            docs = selector.invoke({"question": "What is the code of alpha?", "documents": [doc]})
    """

    @property
    def InputType(self) -> type[OPRMSelectorInput]:  # noqa: N802 - LangChain's name
        return OPRMSelectorInput

    @property
    def OutputType(self) -> type[list[Document]]:  # noqa: N802 - LangChain's name
        return list[Document]

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Not serializable: ``model`` may be a loaded model object."""
        return False

    # ------------------------------------------------------------------ sync
    def invoke(self, input: OPRMSelectorInput, config: Optional[RunnableConfig] = None,
               **kwargs: Any) -> list[Document]:
        _no_kwargs(kwargs)
        out = self._run(input_list=[input], configs=[ensure_config(config)], return_exceptions=False)
        return out[0]  # type: ignore[return-value]

    def batch(self, inputs: list[OPRMSelectorInput],
              config: Optional[Union[RunnableConfig, list[RunnableConfig]]] = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Select for every input with one engine ``select_many`` call (shared model batches)."""
        _no_kwargs(kwargs)
        if not inputs:
            return []
        return self._run(inputs, get_config_list(config, len(inputs)), return_exceptions)

    def _run(self, input_list: Sequence[Any], configs: list[RunnableConfig], return_exceptions: bool) -> list[Any]:
        runs = [self._callback_manager(c).on_retriever_start(
            None, query_of(x), name=c.get("run_name") or self.get_name(), run_id=c.get("run_id"))
            for x, c in zip(input_list, configs)]
        outcomes = _parse_all(input_list)
        early = _early_errors(outcomes, return_exceptions)
        if early is not None:
            for run, err in zip(runs, early[1]):
                run.on_retriever_error(err)
            raise early[0]
        try:
            outcomes = self._select(outcomes)
        except BaseException as exc:
            for run in runs:
                run.on_retriever_error(exc)
            raise
        endings, failure = _endings(outcomes, return_exceptions)
        for run, (failed, o) in zip(runs, endings):
            if failed:
                run.on_retriever_error(o)
            else:
                run.on_retriever_end(o)
        if failure is not None:
            raise failure
        return list(outcomes)

    # ------------------------------------------------------------------ async
    async def ainvoke(self, input: OPRMSelectorInput, config: Optional[RunnableConfig] = None,
                      **kwargs: Any) -> list[Document]:
        _no_kwargs(kwargs)
        out = await self._arun([input], [ensure_config(config)], return_exceptions=False)
        return out[0]  # type: ignore[return-value]

    async def abatch(self, inputs: list[OPRMSelectorInput],
                     config: Optional[Union[RunnableConfig, list[RunnableConfig]]] = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Like ``batch``; the model runs in a worker thread, the event loop stays free."""
        _no_kwargs(kwargs)
        if not inputs:
            return []
        return await self._arun(inputs, get_config_list(config, len(inputs)), return_exceptions)

    async def _arun(self, input_list: Sequence[Any], configs: list[RunnableConfig],
                    return_exceptions: bool) -> list[Any]:
        runs = [await self._async_callback_manager(c).on_retriever_start(
            None, query_of(x), name=c.get("run_name") or self.get_name(), run_id=c.get("run_id"))
            for x, c in zip(input_list, configs)]
        outcomes = _parse_all(input_list)
        early = _early_errors(outcomes, return_exceptions)
        if early is not None:
            for run, err in zip(runs, early[1]):
                await run.on_retriever_error(err)
            raise early[0]
        try:
            outcomes = await run_in_executor(configs[0], self._select, outcomes)
        except BaseException as exc:
            for run in runs:
                await run.on_retriever_error(exc)
            raise
        endings, failure = _endings(outcomes, return_exceptions)
        for run, (failed, o) in zip(runs, endings):
            if failed:
                await run.on_retriever_error(o)
            else:
                await run.on_retriever_end(o)
        if failure is not None:
            raise failure
        return list(outcomes)

    # ------------------------------------------------------------------ the work
    def _select(self, outcomes: list[Any]) -> list[Any]:
        """Run the engine once over every parsed request; errors stay per input.

        If the shared call fails (say one question is longer than a chunk), each request
        is retried alone so that only the inputs at fault report an error.
        """
        engine = self.core_selector()
        todo = [i for i, o in enumerate(outcomes) if isinstance(o, Request)]
        if not todo:
            return outcomes
        out = list(outcomes)
        items = [(outcomes[i].question, outcomes[i].texts) for i in todo]
        try:
            results: list[SelectionResult] = engine.select_many(items, handoff=True)
        except Exception:
            if len(todo) == 1:
                raise
            for i, item in zip(todo, items):
                try:
                    out[i] = selected_documents(outcomes[i], engine.select_many([item], handoff=True)[0])
                except Exception as exc:  # reported on this input's run only
                    out[i] = exc
            return out
        for i, result in zip(todo, results):
            out[i] = selected_documents(outcomes[i], result)
        return out

    def _callback_manager(self, config: RunnableConfig) -> CallbackManager:
        return CallbackManager.configure(
            config.get("callbacks"), None, inheritable_tags=config.get("tags"), local_tags=None,
            inheritable_metadata=config.get("metadata"), local_metadata={"ls_model_name": self.model_name})

    def _async_callback_manager(self, config: RunnableConfig) -> AsyncCallbackManager:
        return AsyncCallbackManager.configure(
            config.get("callbacks"), None, inheritable_tags=config.get("tags"), local_tags=None,
            inheritable_metadata=config.get("metadata"), local_metadata={"ls_model_name": self.model_name})


def _parse_all(inputs: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for value in inputs:
        try:
            out.append(parse_request(value))
        except (TypeError, ValueError, KeyError) as exc:
            out.append(exc)
    return out


def _no_kwargs(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"OPRMSelector takes no call arguments besides config, got {sorted(kwargs)}; "
                        "set options on the selector or through configurable_fields")


def _early_errors(outcomes: list[Any], return_exceptions: bool) -> tuple[BaseException, list[BaseException]] | None:
    """Without ``return_exceptions``, a bad input fails the whole call before any model work:
    the first error, and the error each run reports (its own, else the first). None: go on."""
    first = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if first is None or return_exceptions:
        return None
    return first, [o if isinstance(o, BaseException) else first for o in outcomes]


def _endings(outcomes: list[Any], return_exceptions: bool) -> tuple[list[tuple[bool, Any]], BaseException | None]:
    """The callback each run gets, in order, as (failed, outcome): up to the first failure
    when it must be raised (returned second), else every run."""
    done: list[tuple[bool, Any]] = []
    for o in outcomes:
        failed = isinstance(o, BaseException)
        done.append((failed, o))
        if failed and not return_exceptions:
            return done, o
    return done, None
