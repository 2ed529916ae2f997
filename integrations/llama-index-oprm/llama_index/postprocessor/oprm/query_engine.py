"""``OPRMQueryEngine``: retriever-free question answering over every node with OPRM.

No retriever and no embeddings: the engine reads all nodes of an index or a document
list, scores every chunk with the model itself, and decodes the answer from the
winning chunk's stored state (the engine's ``answer_from`` / ``stream``), so the chunk is
never prefilled a second time. The chunks it answered from come back as
``source_nodes`` (``score``: the core's ``relevance_score``), so LlamaIndex citations work. In
``response_mode="summary"`` it decodes from every chunk and joins the parts in document
order (the OPRM paper's summary mode); every chunk is then a source node.

It lives in ``llama_index.postprocessor.oprm`` next to ``OPRMNodePostprocessor`` because
both map OPRM chunks to nodes the same way (``nodes.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Generator, List, Literal, Optional, Sequence

from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, SerializeAsAny
from llama_index.core.indices.base import BaseIndex
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import BaseNode, NodeWithScore

from oprm_rag import DEMO_MODEL
from oprm_rag.decoding.config import GenerationConfig

from llama_index.llms.oprm.utils import ModelArg, aiter_in_thread

from .nodes import NodeDocuments, OPRMSelectorOptions

__all__ = ["OPRMQueryEngine"]

ResponseMode = Literal["answer", "summary"]


class OPRMQueryEngine(OPRMSelectorOptions, CustomQueryEngine):
    """Answer from the state of the chunk the model is surest about (OPRM).

    Build it with :meth:`from_documents` or :meth:`from_index`, or pass ``nodes``.
    ``top_n`` > 1 answers from the best ``top_n`` chunks re-joined in document order.
    ``streaming=True`` returns a ``StreamingResponse`` (``AsyncStreamingResponse`` from
    ``aquery``). Generation options: ``max_new_tokens``, ``temperature``, ``seed``,
    ``stop`` and any other ``oprm_rag.GenerationConfig`` field in ``generation_kwargs``.
    """

    nodes: List[SerializeAsAny[BaseNode]] = Field(description="Every node the engine reads, in order.")
    response_mode: ResponseMode = Field(default="answer", description="'answer' or 'summary'.")
    streaming: bool = Field(default=False, description="Return streaming responses.")
    max_new_tokens: int = Field(default=GenerationConfig.max_new_tokens, ge=0,
                                description="Answer length limit (per chunk in summaries).")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    seed: Optional[int] = Field(default=None, description="Seed for sampling.")
    stop: List[str] = Field(default_factory=list, description="Stop strings.")
    generation_kwargs: Dict[str, Any] = Field(default_factory=dict, description="More GenerationConfig fields.")

    @classmethod
    def class_name(cls) -> str:
        return "OPRMQueryEngine"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_documents(cls, documents: Sequence[BaseNode], model: ModelArg = DEMO_MODEL,
                       **kwargs: Any) -> "OPRMQueryEngine":
        """Read whole documents; OPRM does its own token-exact chunking (no node parser)."""
        return cls(model=model, nodes=list(documents), **kwargs)

    @classmethod
    def from_index(cls, index: BaseIndex, model: ModelArg = DEMO_MODEL, **kwargs: Any) -> "OPRMQueryEngine":
        """Read every node of ``index`` in the index's order (its docstore holds the text)."""
        struct = index.index_struct
        ids: List[str] = []
        if isinstance(getattr(struct, "nodes", None), list):
            ids = list(struct.nodes)  # list indices (SummaryIndex): insertion order
        elif isinstance(getattr(struct, "nodes_dict", None), dict):
            ids = list(struct.nodes_dict.values())  # vector indices: node id by vector id
        nodes = index.docstore.get_nodes(ids) if ids else list(index.docstore.docs.values())
        if not nodes:
            raise ValueError("the index has no nodes with text in its docstore")
        return cls(model=model, nodes=nodes, **kwargs)

    # ------------------------------------------------------------------ pieces
    def _generation(self) -> Any:
        defaults = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed}
        return GenerationConfig.from_call(defaults, self.generation_kwargs, list(self.stop))

    def _documents(self) -> NodeDocuments:
        docs = NodeDocuments(self.nodes)
        if not docs:
            raise ValueError("OPRMQueryEngine has no node with text to read")
        return docs

    def _sources(self, docs: NodeDocuments, scores: Sequence[Any], usage: Any) -> List[NodeWithScore]:
        return [docs.node(s, usage) for s in scores]

    @staticmethod
    def _metadata(answer: Any, selection: Any = None) -> Dict[str, Any]:
        meta: Dict[str, Any] = {"oprm_usage": answer.usage.to_dict(), "oprm_finish_reason": answer.finish_reason,
                                "oprm_all_idk": bool(answer.all_idk), "oprm_no_answer_reason": answer.no_answer_reason}
        if answer.parts is not None:
            meta["oprm_parts"] = list(answer.parts)
        if selection is not None:
            meta["oprm_chunks"] = [c.to_dict() for c in selection.chunks]
        return meta

    # ------------------------------------------------------------------ answering (blocking)
    def _answer(self, query_str: str) -> Response:
        docs = self._documents()
        sel = self.selector()
        if self.response_mode == "summary":
            answer = sel.summarize(docs.texts, query_str or None, generation=self._generation())
            return Response(answer.text, self._sources(docs, answer.chunks, answer.usage), self._metadata(answer))
        result = sel.select(query_str, docs.texts)
        answer = sel.answer_from(result, generation=self._generation())  # decodes from the stored state
        return Response(answer.text, self._sources(docs, result.selected, result.usage), self._metadata(answer, result))

    def _stream(self, query_str: str) -> StreamingResponse:
        """Scores now (so the selected chunks are known when the response is returned);
        returns the decoding from the winner's stored state as a generator."""
        docs = self._documents()
        sel = self.selector()
        meta: Dict[str, Any] = {}
        if self.response_mode == "summary":
            # Parts stream in document order; the chunks and their scores are known only
            # once every chunk has run, so source_nodes fill in when the stream ends.
            summary = sel.stream_summary(docs.texts, query_str or None, generation=self._generation())
            sources: List[NodeWithScore] = []

            def summary_pieces() -> Generator[str, None, None]:
                yield from summary
                assert summary.answer is not None
                sources.extend(self._sources(docs, summary.answer.chunks, summary.answer.usage))
                meta.update(self._metadata(summary.answer))

            return StreamingResponse(summary_pieces(), source_nodes=sources, metadata=meta)

        selection = sel.select(query_str, docs.texts)
        stream = sel.stream_from(selection, generation=self._generation())
        meta["oprm_chunks"] = [c.to_dict() for c in selection.chunks]

        def answer_pieces() -> Generator[str, None, None]:
            yield from stream
            assert stream.answer is not None
            meta.update(self._metadata(stream.answer, selection))

        return StreamingResponse(answer_pieces(), source_nodes=self._sources(docs, selection.selected, selection.usage),
                                 metadata=meta)

    # ------------------------------------------------------------------ CustomQueryEngine
    def custom_query(self, query_str: str) -> Response | StreamingResponse:  # type: ignore[override]
        return self._stream(query_str) if self.streaming else self._answer(query_str)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:  # type: ignore[override]
        """Runs the model in a worker thread; streams come back through an asyncio queue."""
        if not self.streaming:
            return await asyncio.to_thread(self._answer, query_str)
        sync = await asyncio.to_thread(self._stream, query_str)
        return AsyncStreamingResponse(response_gen=aiter_in_thread(lambda: sync.response_gen),
                                      source_nodes=sync.source_nodes, metadata=sync.metadata)
