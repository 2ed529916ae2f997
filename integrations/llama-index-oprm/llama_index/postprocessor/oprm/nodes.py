"""What the OPRM postprocessor and query engine share: selector options and node mapping.

OPRM scores chunks of plain text; LlamaIndex passes nodes. This module turns nodes into
the selector's documents (one per distinct text) and scored chunks back into nodes that
keep their source node's id, metadata and character span, so citations still point at
the right place. The options are the core's (``oprm_rag.options.option_specs()``: same
names, defaults and checks), except that LlamaIndex's postprocessor convention
``top_n`` stands for the core's ``top_k``. Node scores are the core's
``relevance_score`` (higher is better) and node metadata is the core's
``ChunkScore.metadata()``; those keys are excluded from the LLM and embed views: they
describe the selection and must never reach a prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, create_model, model_validator
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, NodeWithScore, TextNode
from oprm_rag.options import SelectorOptions as CoreOptions
from oprm_rag.integration import option_fields
from oprm_rag.options import check_names, option_specs
from oprm_rag.results import METADATA_KEYS

from llama_index.llms.oprm.utils import LazyModel

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.results import ChunkScore
    from oprm_rag.selector import OPRMSelector

__all__ = ["OPRM_METADATA_KEYS", "OPRMSelectorOptions", "NodeDocuments", "chunk_node"]

#: Metadata keys written on every output node; all are hidden from LLM and embed views.
OPRM_METADATA_KEYS: Tuple[str, ...] = (*METADATA_KEYS, "oprm_source_node_id")

#: Core options exposed under their own names (``top_k`` is the component's ``top_n``).
_OPTION_NAMES: Tuple[str, ...] = tuple(s.name for s in option_specs() if s.name != "top_k")


_Generated: Any = create_model("_GeneratedOPRMOptions", __config__=ConfigDict(arbitrary_types_allowed=True),
                               **option_fields(exclude=("top_k",)))


class OPRMSelectorOptions(LazyModel, _Generated):
    """The core ``SelectorOptions`` as LlamaIndex fields, over the lazy model.

    Unknown keywords are refused (LlamaIndex components ignore them by default): a
    misspelt option silently ignored would change the selection without a word.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, values: Any) -> Any:
        if isinstance(values, dict):
            check_names(values, also=cls.model_fields)
        return values

    top_n: int = Field(default=1, description="Chunks to keep, the best first (the core's top_k).")
    model_kwargs: Dict[str, Any] = Field(default_factory=dict,
                                         description="Options for loading a path (device, dtype, ...).")
    _options: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_options(self) -> "OPRMSelectorOptions":
        self._options = CoreOptions.build(top_k=self.top_n, **{n: getattr(self, n) for n in _OPTION_NAMES})
        return self

    def core_options(self) -> CoreOptions:
        return self._options

    def selector(self) -> "OPRMSelector":
        """The core selector with these options over the shared model (cheap: the model,
        its document cache and its memos are shared, so follow-up questions on the same
        nodes reuse their chunk states)."""
        from oprm_rag.selector import OPRMSelector

        return OPRMSelector(self.engine, self._options)


class NodeDocuments:
    """The selector's documents for a list of nodes: one per distinct non-empty text.

    Nodes with only whitespace cannot be scored (the engine rejects them) and are left
    out; nodes with the same text as an earlier node are scored once, as that node.
    """

    def __init__(self, nodes: Sequence[BaseNode]) -> None:
        self.texts: List[str] = []
        self.owners: List[BaseNode] = []
        self.positions: List[int] = []  # each owner's position in the nodes passed in
        seen: Dict[str, int] = {}
        for position, node in enumerate(nodes):
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            if not text or not text.strip() or text in seen:
                continue
            seen[text] = len(self.texts)
            self.texts.append(text)
            self.owners.append(node)
            self.positions.append(position)

    def __len__(self) -> int:
        return len(self.texts)

    def node(self, score: "ChunkScore", usage: Any = None) -> NodeWithScore:
        """The node for a chunk the selector scored over these documents (``usage``: the
        selection's, to record the resolved chunk size)."""
        return chunk_node(self.owners[score.doc_index], score, self.positions[score.doc_index], usage)


def _excluded(keys: Sequence[str]) -> List[str]:
    return list(keys) + [k for k in OPRM_METADATA_KEYS if k not in keys]


def chunk_node(source: BaseNode, score: "ChunkScore", position: int | None = None, usage: Any = None) -> NodeWithScore:
    """A scored chunk of ``source`` as a node.

    A chunk that is the whole node keeps the node (a copy with the same id, so the index's
    node is not modified). A part becomes a ``TextNode`` with a derived id, the source's
    metadata, ``PARENT`` = the source node and ``SOURCE`` = the source's document (or the
    source itself when it is a document), and character offsets into that document.
    ``position`` (the source's place in the nodes the caller passed) becomes ``oprm_doc_index``.
    """
    text = source.get_content(metadata_mode=MetadataMode.NONE)
    meta = {**source.metadata, **score.metadata(usage), "oprm_source_node_id": source.node_id}
    if position is not None:
        meta["oprm_doc_index"] = position
    excluded_llm = _excluded(source.excluded_llm_metadata_keys)
    excluded_embed = _excluded(source.excluded_embed_metadata_keys)
    value = float(score.relevance_score)
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
