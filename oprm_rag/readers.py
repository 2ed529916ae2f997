"""Read user documents (.txt, .md, .pdf, stdin) with errors that say what to do."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SourceDocument", "read_document", "read_documents", "DocumentError"]


class DocumentError(Exception):
    """A document could not be used; the message says why and what to do."""


@dataclass(frozen=True)
class SourceDocument:
    name: str
    text: str


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as exc:  # pragma: no cover - pypdf comes with the [pdf] and [web] extras
        raise DocumentError("reading PDF files needs pypdf: pip install 'oprm-rag[pdf]'") from exc
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise DocumentError(f"{path}: the PDF is encrypted; decrypt it first")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, OSError, TypeError) as exc:
        raise DocumentError(f"{path}: not a readable PDF ({exc.__class__.__name__}: {exc})") from exc


def read_document(path: str | Path) -> SourceDocument:
    """One file; ``-`` reads standard input."""
    if str(path) == "-":
        text = sys.stdin.read()
        name = "<stdin>"
    else:
        p = Path(path)
        if not p.exists():
            raise DocumentError(f"{p}: no such file")
        if p.is_dir():
            raise DocumentError(f"{p}: is a folder; pass the files in it")
        name = str(p)
        if p.suffix.lower() == ".pdf":
            text = _read_pdf(p)
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                text = p.read_text(encoding="latin-1")
            except OSError as exc:
                raise DocumentError(f"{p}: cannot read ({exc.strerror})") from exc
    if not text.strip():
        raise DocumentError(f"{name}: the document is empty (no text to search)")
    return SourceDocument(name, text)


def read_documents(paths: list[str]) -> list[SourceDocument]:
    if not paths:
        raise DocumentError("no documents given: pass one or more files, or - for stdin")
    return [read_document(p) for p in paths]
