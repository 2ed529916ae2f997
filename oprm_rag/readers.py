"""Read user documents (.txt, .md, .pdf, stdin, uploads) with one set of rules.

The CLI and the web app both come here, so a file is accepted or refused, and decoded,
the same way wherever it arrives. The rules exist because the wrong text is worse than
no text: a model asked about a mis-decoded file answers confidently from noise.

* Bytes are decoded, never guessed into shape: UTF-8 (a BOM dropped); UTF-16/UTF-32
  when a byte-order mark says so; Windows-1252 only when no byte sequence of the file is
  valid multi-byte UTF-8 (a legacy 8-bit file). A UTF-8 file with a few bad bytes keeps
  its UTF-8 text, the bad bytes shown as U+FFFD, with a warning.
* Binary input is refused with one line: NUL bytes (outside UTF-16/32), more than a few
  control characters, or more than a small share of invalid UTF-8.
* PDFs (by ending or by their ``%PDF-`` header) go through pypdf; every way pypdf can
  refuse a file (damage, a password, AES without ``cryptography``, a filter or
  encryption it does not implement, a decompression limit) becomes one
  :class:`~oprm_rag.errors.DocumentError` line naming the file.
* Returned text is always encodable as UTF-8 (lone surrogates become U+FFFD).

Warnings (replacements, a legacy encoding) are logged on the ``oprm_rag`` logger and kept
on :attr:`SourceDocument.warnings` for the caller to show.
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import stat
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import DocumentError

__all__ = ["SourceDocument", "read_document", "read_documents", "document_from_bytes", "decode_text",
           "DocumentError"]

logger = logging.getLogger("oprm_rag")

#: Share of invalid UTF-8 bytes above which a file with valid multi-byte UTF-8 in it is
#: taken for binary rather than for UTF-8 with some damage.
MAX_INVALID_UTF8_SHARE = 0.05

_BOMS: tuple[tuple[bytes, str], ...] = (  # longest first: the UTF-32-LE BOM starts with UTF-16-LE's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# C0 and C1 control characters that do not occur in text (tab, newlines, VT, FF and ESC do).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")
_NON_ASCII_VALID = re.compile(r"[^\x00-\x7f\ufffd]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_REPLACEMENT_UTF8 = "\ufffd".encode()
_SAMPLE_CHARS = 65536


@dataclass(frozen=True)
class SourceDocument:
    """A document's display name, its text, and what was repaired while reading it."""

    name: str
    text: str
    warnings: tuple[str, ...] = ()


def _binary(name: str, why: str) -> DocumentError:
    return DocumentError(f"{name}: this looks like a binary file, not text ({why}); "
                         "give a .txt, .md or .pdf file, or paste the text")


def _first_invalid_utf8(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1


def _check_controls(name: str, text: str) -> None:
    """Binary that decoded anyway: control characters, or code points no text uses
    (unassigned, private use: what random bytes become in UTF-16 or UTF-32)."""
    n = len(_CONTROL.findall(text))
    if n > 8 + len(text) // 100:
        raise _binary(name, f"{n:,} control characters")
    sample = text[:_SAMPLE_CHARS]
    if _NON_ASCII_VALID.search(sample) is None:
        return
    odd = sum(1 for ch in sample if ord(ch) > 0x7F and unicodedata.category(ch) in ("Cn", "Co"))
    if odd > 8 + len(sample) // 100:
        raise _binary(name, f"{odd:,} unassigned or private-use characters in its first {len(sample):,}")


def repair_text(text: str, name: str = "document") -> tuple[str, list[str]]:
    """``text`` made UTF-8-encodable (lone surrogates become U+FFFD), and a warning if so."""
    n = len(_SURROGATE.findall(text))
    if not n:
        return text, []
    return _SURROGATE.sub("\ufffd", text), [f"{name}: {n} lone surrogate code point(s) replaced with U+FFFD"]


def decode_text(data: bytes, name: str = "document") -> tuple[str, list[str]]:
    """The text in ``data`` and the warnings its decoding raised; binary raises ``DocumentError``.

    Nothing is logged here: :func:`document_from_bytes` logs the warnings once.
    """
    warnings: list[str] = []
    skipped = 0
    if data.startswith(codecs.BOM_UTF8):
        data, skipped = data[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
    for bom, codec in _BOMS:
        if data.startswith(bom):
            body = data[len(bom):]
            text = body.decode(codec, errors="replace")
            bad = text.count("\ufffd") - (body.decode(codec, errors="ignore").count("\ufffd"))
            if bad > 8 + MAX_INVALID_UTF8_SHARE * len(text):
                raise _binary(name, f"it starts with a {codec.upper()} byte-order mark, but {bad:,} of its "
                                    f"{len(text):,} characters are invalid {codec.upper()}")
            if bad:
                warnings.append(f"{name}: {bad} invalid {codec.upper()} sequence(s) replaced with U+FFFD")
            break
    else:
        if b"\x00" in data:
            raise _binary(name, "it holds NUL bytes; if it is UTF-16 text without a byte-order mark, "
                                "save it as UTF-8")
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
        if bad:
            if _NON_ASCII_VALID.search(text) is None:
                # No valid multi-byte UTF-8 anywhere: a legacy 8-bit file, not damaged UTF-8.
                try:
                    text = data.decode("cp1252")
                except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
                    text = data.decode("latin-1")
                warnings.append(f"{name}: not valid UTF-8 and no UTF-8 sequence in it; "
                                "read as Windows-1252 (Latin-1)")
            elif bad > 8 + MAX_INVALID_UTF8_SHARE * len(data):
                raise _binary(name, f"{bad / len(data):.0%} of its bytes are not valid UTF-8")
            else:
                warnings.append(f"{name}: {bad} invalid UTF-8 byte sequence(s) replaced with U+FFFD "
                                f"(the first at byte {skipped + _first_invalid_utf8(data)})")
    _check_controls(name, text)
    text, more = repair_text(text, name)
    return text, warnings + more


def _pdf_text(name: str, data: bytes) -> tuple[str, list[str]]:
    """The text layer of a PDF; every refusal of pypdf's becomes one ``DocumentError`` line."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError
    except ImportError as exc:  # pragma: no cover - pypdf comes with the [pdf] and [web] extras
        raise DocumentError("reading PDF files needs pypdf: pip install 'oprm-rag[pdf]'") from exc

    def one_line(exc: BaseException) -> str:
        return " ".join(str(exc).split())[:200] or exc.__class__.__name__

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # most "encrypted" PDFs open without one
            raise DocumentError(f"{name}: the PDF is protected by a password; remove the password "
                                "(or print it to a new PDF) and try again")
        parts = [(page.extract_text() or "").strip() for page in reader.pages]
    except DocumentError:
        raise
    except DependencyError as exc:
        hint = ("pip install cryptography" if "cryptography" in str(exc) or "AES" in str(exc)
                else "install what it names")
        raise DocumentError(f"{name}: reading this PDF needs a package that is not installed "
                            f"({one_line(exc)}); {hint}, or paste the text") from exc
    except NotImplementedError as exc:
        raise DocumentError(f"{name}: this PDF uses a feature pypdf cannot read ({one_line(exc)}); "
                            "print it to a new PDF or paste the text") from exc
    except LimitReachedError as exc:
        raise DocumentError(f"{name}: the PDF is too large to unpack safely (a decompression limit was "
                            "reached; it may be a decompression bomb); paste the text instead") from exc
    except FileNotDecryptedError as exc:
        raise DocumentError(f"{name}: the PDF is protected by a password; remove the password and try again") \
            from exc
    except RecursionError as exc:
        raise DocumentError(f"{name}: not a readable PDF (its structure nests too deeply)") from exc
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types on damaged, untrusted files
        raise DocumentError(f"{name}: not a readable PDF ({exc.__class__.__name__}: {one_line(exc)})") from exc
    text = "\n\n".join(parts)
    if not text.strip():
        raise DocumentError(f"{name}: the PDF has no text layer (a scanned PDF holds only images); "
                            "run OCR on it first or paste its text")
    return repair_text(text, name)


def _is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF-")


def document_from_bytes(name: str, data: bytes, *, kind: Literal["auto", "text", "pdf"] = "auto"
                        ) -> SourceDocument:
    """A document from raw bytes: the one decoding path of files, stdin and uploads.

    ``kind="pdf"`` forces the PDF reader (a ``.pdf`` name); otherwise a ``%PDF-`` header
    picks it and anything else is decoded as text. Raises :class:`DocumentError`.
    """
    if not data.strip():
        raise DocumentError(f"{name}: the document is empty (no text to search)")
    if kind == "pdf" or _is_pdf(data):
        text, warnings = _pdf_text(name, data)
    else:
        text, warnings = decode_text(data, name)
    if not text.strip():
        raise DocumentError(f"{name}: the document is empty (no text to search)")
    for w in warnings:
        logger.warning("%s", w)
    return SourceDocument(name, text, tuple(warnings))


def _read_stdin() -> bytes:
    if sys.stdin is None or getattr(sys.stdin, "closed", False):
        raise DocumentError("<stdin>: there is no standard input to read; pass a file instead of -")
    try:
        interactive = sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        interactive = False
    if interactive:
        raise DocumentError("<stdin>: - reads the document from standard input, but it is a terminal; "
                            "pipe a file in (cat doc.txt | oprm-rag ...) or pass the file's name")
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        return buffer.read()
    text = sys.stdin.read()  # a text-only stream (tests, embedding apps): back to bytes, losslessly
    return text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else bytes(text)


def read_document(path: str | Path) -> SourceDocument:
    """One file; ``-`` reads standard input (as bytes, decoded by the same rules)."""
    if str(path) == "-":
        try:
            data = _read_stdin()
        except OSError as exc:
            raise DocumentError(f"<stdin>: cannot read ({exc.strerror or exc})") from exc
        return document_from_bytes("<stdin>", data)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DocumentError(f"{p}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise DocumentError(f"{p}: is a folder; pass the files in it")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise DocumentError(f"{p}: not a regular file (a device or socket); pass a text or PDF file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DocumentError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    return document_from_bytes(str(p), data, kind="pdf" if p.suffix.lower() == ".pdf" else "auto")


def read_documents(paths: list[str]) -> list[SourceDocument]:
    if not paths:
        raise DocumentError("no documents given: pass one or more files, or - for stdin")
    return [read_document(p) for p in paths]
