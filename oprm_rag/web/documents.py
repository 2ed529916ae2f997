"""Uploaded documents: turning bytes into text, and a bounded in-memory store.

The page needs the exact text the engine chunked, because chunk spans are character
offsets into it; so the server keeps each document's text (not only its states) and
hands it back to the page. Memory stays bounded: the store evicts the least recently
used documents once a count or a total-character budget is passed.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..readers import DocumentError, read_document

__all__ = ["DocumentError", "StoredDocument", "DocumentStore", "read_upload", "clean_name",
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


def _decode_text(name: str, data: bytes) -> str:
    """UTF-8 (a byte-order mark dropped), else Latin-1, as the engine's file reader does.

    Latin-1 decodes any bytes, so a binary file renamed ``.txt`` would become noise that
    the model scores as prose; NUL bytes never occur in text files, so they reject it.
    """
    if b"\x00" in data[:65536]:
        raise DocumentError(f"{name}: this looks like a binary file, not text; upload a .txt, .md or .pdf file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_pdf_bytes(name: str, data: bytes) -> str:
    """Extract a PDF's text through the engine's reader (it takes a path: use a temp file).

    Uploads are untrusted, and pypdf raises many kinds of errors on damaged files; any
    failure here means "not a readable PDF", said with the upload's name rather than the
    temporary path.
    """
    with tempfile.TemporaryDirectory(prefix="oprm-web-") as tmp:
        path = Path(tmp) / "upload.pdf"
        path.write_bytes(data)
        try:
            text = read_document(path).text
        except DocumentError as exc:
            message = str(exc).replace(str(path), name)
            if "is empty" in message:
                message = (f"{name}: the PDF has no text layer (a scanned PDF holds only images); "
                           "run OCR on it first or paste its text")
            raise DocumentError(message) from exc
        except Exception as exc:  # noqa: BLE001 - any parser failure on an untrusted upload
            raise DocumentError(f"{name}: not a readable PDF ({exc.__class__.__name__}: {exc})") from exc
    return text


def read_upload(name: str, data: bytes, content_type: str | None = None) -> str:
    """The text of an uploaded file, chosen by its ending (or content type when it has none).

    Raises ``DocumentError`` with a message meant for the person who uploaded it.
    """
    suffix = PurePosixPath(name).suffix.lower()
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not data:
        raise DocumentError(f"{name}: the file is empty (no text to search)")
    if suffix == PDF_SUFFIX or (not suffix and ctype == "application/pdf"):
        text = _read_pdf_bytes(name, data)
    elif suffix in TEXT_SUFFIXES or (not suffix and ctype.startswith("text/")):
        text = _decode_text(name, data)
    else:
        shown = suffix or "a file without an ending"
        raise DocumentError(f"{name}: cannot read {shown}; upload a .txt, .md or .pdf file, or paste the text")
    if not text.strip():
        raise DocumentError(f"{name}: the document is empty (no text to search)")
    return text


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
