"""What the OPRM postprocessor and query engine share: selector options and node mapping.

OPRM scores chunks of plain text; LlamaIndex passes nodes. This module turns nodes into
the selector's documents (one per distinct text) and scored chunks back into nodes that
keep their source node's id, metadata and character span, so citations still point at
the right place. The scores it writes into metadata are excluded from the LLM and embed
views of the node: they describe the selection and must never reach a prompt.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple

from llama_index.core.bridge.pydantic import Field
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, NodeWithScore, TextNode

from llama_index.llms.oprm.utils import LazyModel

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.lm import RecurrentLM
    from oprm_rag.scoring import ChunkScore
    from oprm_rag.selector import OPRMSelector

__all__ = ["OPRM_METADATA_KEYS", "OPRMSelectorOptions", "NodeDocuments", "chunk_node", "node_score",
           "default_chunk_tokens"]

#: Metadata keys written on every output node; all are hidden from LLM and embed views.
OPRM_METADATA_KEYS: Tuple[str, ...] = (
    "oprm_entropy",
    "oprm_relevance",
    "oprm_is_idk",
    "oprm_top_token",
    "oprm_rank",
    "oprm_chunk_index",
    "oprm_char_start",
    "oprm_char_end",
    "oprm_token_start",
    "oprm_token_end",
    "oprm_source_node_id",
    "oprm_question_logprob",
)

#: Upper bound of the default chunk length (the engine's own default).
_MAX_DEFAULT_CHUNK = 2000


def default_chunk_tokens(lm: "RecurrentLM") -> int:
    """Half the model's training context, at most 2000 tokens.

    Chunks longer than what a recurrent model was trained on overflow its state (the
    failure OPRM exists to avoid); half leaves room for the instruction, the question,
    the answer and LlamaIndex's own prompt text within the trained length.
    """
    trained = lm.training_context_tokens
    if trained is None:
        return _MAX_DEFAULT_CHUNK
    return max(8, min(_MAX_DEFAULT_CHUNK, trained // 2))


class OPRMSelectorOptions(LazyModel):
    """The ``OPRMSelector`` settings a LlamaIndex component exposes, over the lazy model."""

    chunk_tokens: Optional[int] = Field(
        default=None, ge=8, description="Chunk length in model tokens; None = half the model's training "
                                        "context, at most 2000.")
    split_nodes: bool = Field(default=True, description="Split nodes longer than chunk_tokens; False scores "
                                                        "every node whole.")
    chunk_overlap: int = Field(default=0, ge=0, description="Tokens repeated from the previous chunk.")
    boundary: Optional[Literal["paragraph", "sentence"]] = Field(
        default=None, description="Prefer ending chunks at a paragraph or sentence end.")
    criterion: Literal["entropy", "question_likelihood"] = Field(
        default="entropy", description="Rank by first-answer-token entropy or by log p(question | chunk).")
    idk_filter: bool = Field(default=True, description="Drop chunks whose first answer token starts the IDK word.")
    idk_word: Optional[str] = Field(default=None, description="The IDK word; None = the model's prompt's.")
    entropy_threshold: Optional[float] = Field(default=None, description="Also drop chunks above this entropy.")
    fallback: Optional[Literal["min_entropy"]] = Field(
        default=None, description="'min_entropy': keep the lowest-entropy chunk when every chunk says IDK.")
    max_batch_tokens: int = Field(default=16384, ge=1, description="Rows x tokens per model call.")
    use_cache: bool = Field(default=True, description="Reuse chunk states across questions (the model's "
                                                      "shared document cache).")
    show_progress: bool = Field(default=False, description="Show a progress bar over scored chunks.")
    model_kwargs: Dict[str, Any] = Field(default_factory=dict,
                                         description="Options for loading a path (device, dtype, ...).")

    def selector(self, top_k: int) -> "OPRMSelector":
        """A selector with these options over the shared model.

        Made per call (cheap: no model work); chunk states are shared through the model's
        document cache, so follow-up questions on the same nodes reuse them.
        """
        from oprm_rag.selector import OPRMSelector

        lm = self.lm
        chunk: Optional[int] = None
        if self.split_nodes:
            chunk = self.chunk_tokens if self.chunk_tokens is not None else default_chunk_tokens(lm)
        return OPRMSelector(
            lm, chunk_tokens=chunk, chunk_overlap=self.chunk_overlap if chunk is not None else 0,
            boundary=self.boundary, top_k=top_k, entropy_threshold=self.entropy_threshold,
            criterion=self.criterion, idk_filter=self.idk_filter, idk_word=self.idk_word,
            fallback=self.fallback, max_batch_tokens=self.max_batch_tokens, cache=self.use_cache,
            show_progress=self.show_progress)


class NodeDocuments:
    """The selector's documents for a list of nodes: one per distinct non-empty text.

    Nodes with only whitespace cannot be scored (the engine rejects them) and are left
    out; nodes with the same text as an earlier node are scored once, as that node.
    """

    def __init__(self, nodes: Sequence[BaseNode]) -> None:
        self.texts: List[str] = []
        self.owners: List[BaseNode] = []
        seen: Dict[str, int] = {}
        for node in nodes:
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            if not text or not text.strip() or text in seen:
                continue
            seen[text] = len(self.texts)
            self.texts.append(text)
            self.owners.append(node)

    def __len__(self) -> int:
        return len(self.texts)


def node_score(score: "ChunkScore", criterion: str) -> float:
    """Higher is better: ``-entropy``, or ``log p(Q | C)`` for the likelihood criterion."""
    if criterion == "question_likelihood" and score.question_logprob is not None:
        return float(score.question_logprob)
    return -float(score.entropy)


def _oprm_metadata(score: "ChunkScore", source: BaseNode) -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "oprm_entropy": float(score.entropy),
        "oprm_relevance": math.exp(-float(score.entropy)),
        "oprm_is_idk": bool(score.is_idk),
        "oprm_top_token": score.top_token,
        "oprm_rank": score.rank,
        "oprm_chunk_index": int(score.index),
        "oprm_char_start": int(score.char_start),
        "oprm_char_end": int(score.char_end),
        "oprm_token_start": int(score.token_start),
        "oprm_token_end": int(score.token_end),
        "oprm_source_node_id": source.node_id,
    }
    if score.question_logprob is not None:
        meta["oprm_question_logprob"] = float(score.question_logprob)
    return meta


def _excluded(keys: Sequence[str]) -> List[str]:
    return list(keys) + [k for k in OPRM_METADATA_KEYS if k not in keys]


def chunk_node(source: BaseNode, score: "ChunkScore", criterion: str = "entropy") -> NodeWithScore:
    """A scored chunk of ``source`` as a node.

    A chunk that is the whole node keeps the node (a copy with the same id, so the index's
    node is not modified). A part becomes a ``TextNode`` with a derived id, the source's
    metadata, ``PARENT`` = the source node and ``SOURCE`` = the source's document (or the
    source itself when it is a document), and character offsets into that document.
    """
    text = source.get_content(metadata_mode=MetadataMode.NONE)
    meta = {**source.metadata, **_oprm_metadata(score, source)}
    excluded_llm = _excluded(source.excluded_llm_metadata_keys)
    excluded_embed = _excluded(source.excluded_embed_metadata_keys)
    value = node_score(score, criterion)
    if score.char_start == 0 and score.char_end == len(text):
        node = source.model_copy()
        node.metadata = meta
        node.excluded_llm_metadata_keys = excluded_llm
        node.excluded_embed_metadata_keys = excluded_embed
        return NodeWithScore(node=node, score=value)

    document = source.source_node
    base = getattr(source, "start_char_idx", None)
    if document is None:  # the source is itself a document: offsets are into it
        document, base = source.as_related_node_info(), 0
    part = TextNode(
        id_=f"{source.node_id}-oprm-{score.char_start}-{score.char_end}",
        text=score.text,
        metadata=meta,
        excluded_llm_metadata_keys=excluded_llm,
        excluded_embed_metadata_keys=excluded_embed,
        relationships={NodeRelationship.SOURCE: document, NodeRelationship.PARENT: source.as_related_node_info()},
        start_char_idx=None if base is None else base + score.char_start,
        end_char_idx=None if base is None else base + score.char_end,
        metadata_separator=source.metadata_separator,
        metadata_template=source.metadata_template,
        text_template=getattr(source, "text_template", TextNode.model_fields["text_template"].default),
    )
    return NodeWithScore(node=part, score=value)
