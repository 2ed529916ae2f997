"""``OPRMNodePostprocessor``: rerank nodes by how sure a recurrent model is of its answer.

For every incoming node (split into chunks of ``chunk_tokens`` when longer) the model
reads ``[instruction, chunk, question]``; the entropy of its first answer token is the
chunk's score (lower = surer), and chunks whose first answer token starts the IDK word
are dropped. The best ``top_n`` chunks come back as nodes whose ``score`` is
(the core's ``relevance_score``: higher is better, as LlamaIndex expects). Their states
are handed off on the shared model, so ``RecurrentLLM`` answering from a prompt that
begins with the same text resumes from them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import List, Optional

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.schema import NodeWithScore, QueryBundle

from .nodes import NodeDocuments, OPRMSelectorOptions
from .prompts import oprm_qa_prompt

__all__ = ["OPRMNodePostprocessor"]

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)


class OPRMNodePostprocessor(OPRMSelectorOptions, BaseNodePostprocessor):
    """Retriever-free reranking with OPRM (entropy of the first answer token).

    ``model`` is a loaded ``RecurrentLM`` or a model folder / hub name, loaded once per
    process on first use (never in the constructor). Output nodes keep their source
    node's id: a chunk that is the whole node is that node (copied), a part of a node is
    a new node whose ``PARENT`` relationship and ``oprm_source_node_id`` metadata name
    the source, with the part's character span in ``oprm_char_start``/``oprm_char_end``
    (relative to the source's text) and ``start_char_idx``/``end_char_idx`` (relative to
    the document). The ``oprm_*`` metadata keys are excluded from LLM and embed content.
    """

    @classmethod
    def class_name(cls) -> str:
        return "OPRMNodePostprocessor"

    def qa_prompt(self) -> BasePromptTemplate:
        """A ``text_qa_template`` that renders the exact OPRM input (see ``oprm_qa_prompt``)."""
        return oprm_qa_prompt(self.selector().prompt)

    # ------------------------------------------------------------------ scoring
    def _rerank(self, nodes: List[NodeWithScore], query_str: str) -> List[NodeWithScore]:
        """Score and select (blocking: the model runs here)."""
        docs = NodeDocuments([n.node for n in nodes])
        if not docs:
            logger.debug("OPRM: no node has text to score")
            return []
        result = self.selector().select(query_str, docs.texts, handoff=True)
        return [docs.node(s, result.usage) for s in result.selected]

    def _start(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle]) -> QueryBundle:
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model))
        if query_bundle is None:
            raise ValueError("OPRMNodePostprocessor needs the query (a query bundle or query_str)")
        return query_bundle

    def _payload(self, nodes: List[NodeWithScore], query_bundle: QueryBundle) -> dict:
        return {EventPayload.NODES: nodes, EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str, EventPayload.TOP_K: self.top_n}

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        query_bundle = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query_bundle)) as event:
            kept = self._rerank(nodes, query_bundle.query_str) if nodes else []
            event.on_end(payload={EventPayload.NODES: kept})
        dispatcher.event(ReRankEndEvent(nodes=kept))
        return kept

    async def _apostprocess_nodes(self, nodes: List[NodeWithScore],
                                  query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        query_bundle = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query_bundle)) as event:
            # The model blocks for the whole scoring pass: run it off the event loop.
            kept = await asyncio.to_thread(self._rerank, nodes, query_bundle.query_str) if nodes else []
            event.on_end(payload={EventPayload.NODES: kept})
        dispatcher.event(ReRankEndEvent(nodes=kept))
        return kept
