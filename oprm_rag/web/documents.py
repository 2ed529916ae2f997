"""Uploaded documents: turning bytes into text, and a bounded in-memory store.

The page needs the exact text the engine chunked, because chunk spans are character
offsets into it; so the server keeps each document's text (not only its states) and
hands it back to the page. Memory stays bounded: the store evicts the least recently
used documents once a count or a total-character budget is passed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from ..readers import DocumentError, SourceDocument, document_from_bytes

__all__ = ["DocumentError", "StoredDocument", "DocumentStore", "read_upload", "read_upload_document", "clean_name",
           "TEXT_SUFFIXES", "PDF_SUFFIX"]

#: File endings read as plain text (Markdown is searched as written, markup included).
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".text"})
PDF_SUFFIX = ".pdf"


def clean_name(name: str | None, default: str = "document") -> str:
    """A display name from a client-supplied file name: its last path part, printable, short.

    Browsers send bare names, but other clients may send paths (either separator); the
    name is shown in the page and in error messages, so control characters are dropped.
    """
    raw = (name or "").strip()
    base = PureWindowsPath(PurePosixPath(raw).name).name if raw else ""
    printable = "".join(ch for ch in base if ch.isprintable()).strip()
    return printable[:200] or default


def read_upload_document(name: str, data: bytes, content_type: str | None = None) -> SourceDocument:
    """An uploaded file as a :class:`~oprm_rag.readers.SourceDocument` (text and warnings).

    The ending (or the content type when there is none) decides which files the server
    takes; the bytes are then read by :func:`oprm_rag.readers.document_from_bytes`, the
    same rules as the CLI's: binary refused, UTF-8 kept through a bad byte, every PDF
    refusal one line. Raises ``DocumentError`` with a message for the person uploading.
    """
    suffix = PurePosixPath(name).suffix.lower()
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not data:
        raise DocumentError(f"{name}: the file is empty (no text to search)")
    if suffix == PDF_SUFFIX or (not suffix and ctype == "application/pdf"):
        return document_from_bytes(name, data, kind="pdf")
    if suffix in TEXT_SUFFIXES or (not suffix and ctype.startswith("text/")):
        return document_from_bytes(name, data, kind="text")
    shown = suffix or "a file without an ending"
    raise DocumentError(f"{name}: cannot read {shown}; upload a .txt, .md or .pdf file, or paste the text")


def read_upload(name: str, data: bytes, content_type: str | None = None) -> str:
    """The text of an uploaded file (see :func:`read_upload_document`)."""
    return read_upload_document(name, data, content_type).text


@dataclass(frozen=True)
class StoredDocument:
    """One document the page can ask about; ``text`` is exactly what the engine chunks."""

    doc_id: str
    name: str
    text: str
    created: float

    @property
    def chars(self) -> int:
        return len(self.text)

    def info(self) -> dict[str, str | int]:
        return {"doc_id": self.doc_id, "name": self.name, "chars": self.chars}


class DocumentStore:
    """Documents by id, least recently used evicted past ``max_documents`` or ``max_total_chars``.

    A server holds whatever its visitors upload; without a bound it would grow until the
    process dies. An evicted id answers "unknown document" and the page uploads again.
    """

    def __init__(self, max_documents: int = 32, max_total_chars: int = 50_000_000) -> None:
        if max_documents < 1 or max_total_chars < 1:
            raise ValueError("max_documents and max_total_chars must be >= 1")
        self.max_documents = int(max_documents)
        self.max_total_chars = int(max_total_chars)
        self._docs: OrderedDict[str, StoredDocument] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def add(self, name: str, text: str) -> StoredDocument:
        if len(text) > self.max_total_chars:
            raise ValueError(f"the document has {len(text):,} characters; this server keeps at most "
                             f"{self.max_total_chars:,}")
        doc = StoredDocument(uuid.uuid4().hex, name, text, time.time())
        with self._lock:
            self._docs[doc.doc_id] = doc
            self._chars += doc.chars
            while len(self._docs) > self.max_documents or self._chars > self.max_total_chars:
                _, old = self._docs.popitem(last=False)
                self._chars -= old.chars
        return doc

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                self._docs.move_to_end(doc_id)
            return doc

    def __len__(self) -> int:
        with self._lock:
            return len(self._docs)

    @property
    def total_chars(self) -> int:
        with self._lock:
            return self._chars
