"""``OPRMCompressor``: OPRM as the document compressor behind a retriever.

``ContextualCompressionRetriever`` (or a ``DocumentCompressorPipeline``) fetches
candidate documents; the compressor cuts them into chunks, lets the recurrent model
score each chunk against the query, and keeps only the chunks it can answer from.
It runs through ``OPRMSelector``, so the selection shows up as a retriever run under
the compression retriever's callbacks.
"""

from __future__ import annotations

from typing import Optional, Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor

from ._options import OPTION_NAMES, SelectorFields
from .selector import OPRMSelector

__all__ = ["OPRMCompressor"]


class OPRMCompressor(SelectorFields, BaseDocumentCompressor):
    """Keep the chunks of the retrieved documents that the model can answer the query from.

    Takes the same settings as ``OPRMSelector``. Returned chunks are best first and
    carry their source's metadata plus ``relevance_score`` and the OPRM fields. Blank
    documents are skipped; no documents in gives no documents out.

    Example:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever
            from langchain_oprm import OPRMCompressor

            retriever = ContextualCompressionRetriever(
                base_compressor=OPRMCompressor(model="path/to/mamba2", chunk_tokens=256, top_k=3),
                base_retriever=my_retriever,
            )
    """

    def as_selector(self) -> OPRMSelector:
        """The ``OPRMSelector`` with this compressor's settings."""
        return OPRMSelector(model=self.model, **{k: getattr(self, k) for k in OPTION_NAMES})

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        if not any(d.page_content.strip() for d in documents):
            return []
        return self.as_selector().invoke({"question": query, "documents": list(documents)},
                                         config={"callbacks": callbacks})

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        """The model runs in a worker thread; the event loop stays free."""
        if not any(d.page_content.strip() for d in documents):
            return []
        return await self.as_selector().ainvoke({"question": query, "documents": list(documents)},
                                                config={"callbacks": callbacks})
