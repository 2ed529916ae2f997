"""One reader for the CLI and the web app: text is decoded by one set of rules, binary
input and unreadable PDFs are refused with one line, nothing is silently mis-decoded."""

from __future__ import annotations

import io
import logging
import random
import zipfile
import zlib

import pytest

from oprm_rag.errors import DocumentError, InputError
from oprm_rag.readers import SourceDocument, decode_text, document_from_bytes, read_document
from oprm_rag.testing import pdf_bytes


def read_upload(*args):
    from oprm_rag.web.documents import read_upload as read

    return read(*args)

PROSE = "Le café du coin est ouvert. Die Straße ist naß. 東京は大きい。 The code of alpha is 1234.\n" * 20


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.txt", "hello " * 1000)
        z.writestr("b.bin", random.Random(1).randbytes(4000))
    return buf.getvalue()


BINARIES = {
    "random": random.Random(0).randbytes(20_000),
    "zip": _zip_bytes(),
    "gzip_like": zlib.compress(PROSE.encode() * 5, 9),
    "png_header": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
    "nul_in_text": b"The code of alpha is 1234.\x00 More text here.",
    # valid UTF-8 but mostly control characters (no NUL): a binary record format
    "controls": bytes(b % 31 + 1 for b in random.Random(2).randbytes(3000)) + b" a few words",
    # invalid UTF-8 in large share, though it holds some valid multi-byte sequences
    "high_bytes": ("é".encode() + bytes([0xFF, 0xFE, 0x80, 0xC3])) * 500,
    # a UTF-16 byte-order mark in front of random bytes
    "bom_then_noise": b"\xff\xfe" + bytes(b | 0x01 for b in random.Random(3).randbytes(6000)),
}


# ---------------------------------------------------------------- binary input is refused
@pytest.mark.parametrize("kind", sorted(BINARIES))
def test_binary_files_are_refused_in_one_line_by_the_cli_reader(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    path.write_bytes(BINARIES[kind])
    with pytest.raises(DocumentError) as info:
        read_document(path)
    msg = str(info.value)
    assert "binary" in msg and "\n" not in msg and str(path) in msg
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("kind", sorted(BINARIES))
def test_binary_uploads_are_refused_by_the_same_rules(kind):
    with pytest.raises(DocumentError, match="binary"):
        read_upload("data.txt", BINARIES[kind], "text/plain")


def test_readers_document_error_is_the_shared_class():
    import oprm_rag.readers as readers
    import oprm_rag.web.documents as web_documents

    assert readers.DocumentError is DocumentError is web_documents.DocumentError


# ---------------------------------------------------------------- text decoding
def test_utf8_with_one_bad_byte_keeps_its_utf8_text_and_warns(tmp_path, caplog):
    raw = PROSE.encode("utf-8")
    cut = raw.index("naß".encode()) + 2  # inside the text, between whole characters
    path = tmp_path / "doc.txt"
    path.write_bytes(raw[:cut] + b"\xff" + raw[cut:])
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        doc = read_document(path)
    assert "café" in doc.text and "東京は大きい" in doc.text and "Straße" in doc.text
    assert doc.text.count("\ufffd") == 1
    assert doc.text.replace("\ufffd", "") == PROSE
    assert len(doc.warnings) == 1 and "invalid UTF-8" in doc.warnings[0] and f"byte {cut}" in doc.warnings[0]
    assert "invalid UTF-8" in caplog.text


def test_clean_utf8_has_no_warning_and_a_bom_is_dropped():
    text, warnings = decode_text(b"\xef\xbb\xbf" + PROSE.encode(), "doc")
    assert text == PROSE and warnings == []


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_with_a_bom_are_text(codec):
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-le": b"\xff\xfe\x00\x00",
           "utf-32-be": b"\x00\x00\xfe\xff"}.get(codec, b"")
    data = bom + PROSE.encode(codec)
    doc = document_from_bytes("doc.txt", data)
    assert doc.text == PROSE and doc.warnings == ()


def test_a_legacy_8bit_file_is_read_as_windows_1252_with_a_warning():
    text = "Le café est ouvert — “quoted” déjà vu, naïve façade.\n" * 30
    out, warnings = decode_text(text.encode("cp1252"), "old.txt")
    assert out == text
    assert len(warnings) == 1 and "Windows-1252" in warnings[0]


def test_decoded_text_is_always_utf8_encodable():
    for data in [PROSE.encode() + b"\xed\xa0\x80 tail",  # a UTF-8-encoded lone surrogate
                 b"\xff\xfe" + "ab".encode("utf-16-le") + b"\x00\xd8" + "cd".encode("utf-16-le")]:
        text, warnings = decode_text(data, "doc")
        text.encode("utf-8")  # never raises
        assert "\ufffd" in text and warnings


def test_stdin_is_read_as_bytes_with_the_same_rules(monkeypatch):
    raw = PROSE.encode()
    stdin = io.TextIOWrapper(io.BytesIO(raw[:50] + b"\xfe" + raw[50:]), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    doc = read_document("-")
    assert doc.name == "<stdin>" and doc.text.replace("\ufffd", "") == PROSE and doc.warnings


def test_binary_on_stdin_is_refused(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(BINARIES["random"]), encoding="utf-8"))
    with pytest.raises(DocumentError, match="<stdin>.*binary"):
        read_document("-")


def test_stdin_without_a_byte_buffer_still_works(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROSE))
    assert read_document("-").text == PROSE


def test_upload_and_file_give_the_same_text(tmp_path):
    raw = PROSE.encode()
    data = raw[:100] + b"\x80" + raw[100:]
    path = tmp_path / "doc.md"
    path.write_bytes(data)
    assert read_upload("doc.md", data, "text/markdown") == read_document(path).text


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such file"),
    ("folder", "is a folder"),
    ("empty", "the document is empty"),
])
def test_files_that_cannot_be_read(tmp_path, setup, message):
    path = tmp_path / "x.txt"
    if setup == "folder":
        path.mkdir()
    elif setup == "empty":
        path.write_text(" \n\t ")
    with pytest.raises(DocumentError, match=message):
        read_document(path)


def test_a_device_file_is_refused_without_reading_it():
    with pytest.raises(DocumentError, match="not a regular file"):
        read_document("/dev/zero")


# ---------------------------------------------------------------- PDFs
def _pdf(content: bytes, stream_dict: bytes = b"", encrypt: bytes | None = None) -> bytes:
    """A one-page PDF with a raw content stream (and optionally an /Encrypt dictionary)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d %s>>\nstream\n" % (len(content), stream_dict) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    if encrypt:
        objects.append(encrypt)
    out, offsets = b"%PDF-1.7\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    extra = (b" /Encrypt 6 0 R /ID [<00112233445566778899aabbccddeeff><00112233445566778899aabbccddeeff>]"
             if encrypt else b"")
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, extra, xref)
    return out


_AES256 = (b"<< /Filter /Standard /V 5 /R 6 /Length 256 /CF << /StdCF << /AuthEvent /DocOpen /CFM /AESV3 "
           b"/Length 32 >> >> /StmF /StdCF /StrF /StdCF /O <" + b"11" * 48 + b"> /U <" + b"22" * 48
           + b"> /OE <" + b"33" * 32 + b"> /UE <" + b"44" * 32 + b"> /Perms <" + b"55" * 16 + b"> /P -4 >>")
_RC4_PASSWORD = (b"<< /Filter /Standard /V 4 /R 4 /Length 128 /CF << /StdCF << /AuthEvent /DocOpen /CFM /AESV2 "
                 b"/Length 16 >> >> /StmF /StdCF /StrF /StdCF /O <" + b"11" * 32 + b"> /U <" + b"22" * 32
                 + b"> /P -4 >>")


def _bomb() -> bytes:
    return _pdf(zlib.compress(b"BT /F1 12 Tf 72 720 Td (Hi) Tj ET\n" + b" " * 2_000_000, 9), b"/Filter /FlateDecode ")


def test_a_pdf_reads_its_text_layer(tmp_path):
    path = tmp_path / "a.pdf"
    path.write_bytes(pdf_bytes(["The code of alpha is 1234."]))
    assert "The code of alpha is 1234." in read_document(path).text


@pytest.mark.parametrize("case, cause", [
    ("aes_without_cryptography", "cryptography"),
    ("unsupported_filter", "/FooDecode"),
    ("unknown_encryption", "encryption"),
    ("password", "password"),
    ("bomb", "too large"),
    ("scanned", "no text layer"),
    ("garbage", "not a readable PDF"),
])
def test_pdfs_pypdf_refuses_become_one_line_document_errors(tmp_path, case, cause):
    pypdf = pytest.importorskip("pypdf")
    try:
        import cryptography  # noqa: F401
        if case == "aes_without_cryptography":
            pytest.skip("cryptography is installed here: pypdf can read AES")
    except ImportError:
        pass
    data = {
        "aes_without_cryptography": lambda: _pdf(b"BT ET", encrypt=_AES256),
        "unsupported_filter": lambda: _pdf(b"garbage", b"/Filter /FooDecode "),
        "unknown_encryption": lambda: _pdf(b"BT ET", encrypt=b"<< /Filter /FancyCrypt /V 9 /R 9 >>"),
        "password": lambda: _pdf(b"BT ET", encrypt=_RC4_PASSWORD),
        "bomb": _bomb,
        "scanned": lambda: _pdf(b"q 1 0 0 1 0 0 cm Q"),
        "garbage": lambda: b"%PDF-1.4 this is not really a pdf",
    }[case]()
    path = tmp_path / "doc.pdf"
    path.write_bytes(data)
    for read in (lambda: read_document(path), lambda: read_upload("doc.pdf", data, "application/pdf")):
        with pypdf.apply_configuration(zlib_maximum_output_length=100_000), pytest.raises(DocumentError) as info:
            read()
        msg = str(info.value)
        assert cause in msg and "\n" not in msg and "doc.pdf" in msg, msg
        assert "Traceback" not in msg


def test_a_pdf_is_recognised_by_its_header_whatever_its_name(tmp_path):
    path = tmp_path / "report.txt"
    path.write_bytes(pdf_bytes(["The code of beta is 5678."]))
    assert "The code of beta is 5678." in read_document(path).text


def test_pdf_text_with_lone_surrogates_is_repaired(monkeypatch, tmp_path):
    import pypdf

    monkeypatch.setattr(pypdf.PageObject, "extract_text", lambda self, *a, **k: "broken \ud835 glyph map")
    path = tmp_path / "s.pdf"
    path.write_bytes(pdf_bytes(["x"]))
    doc = read_document(path)
    doc.text.encode("utf-8")
    assert doc.text == "broken \ufffd glyph map" and doc.warnings


def test_source_document_keeps_warnings_as_a_tuple():
    doc = SourceDocument("n", "t")
    assert doc.warnings == ()


@pytest.mark.parametrize("codec", ["utf-8", "utf-16", "utf-32"])
def test_text_in_many_scripts_is_text(codec):
    text = ("中文的文件内容。 العربية نص. हिन्दी पाठ। Ελληνικά. Русский текст. 한국어 텍스트. "
            "emoji 🙂🚀 and math ∑ ∫ √ — “quotes”.\n") * 200
    doc = document_from_bytes("doc.txt", text.encode(codec))
    assert doc.text == text and doc.warnings == ()


def test_stdin_that_is_missing_or_a_terminal_is_refused(monkeypatch):
    monkeypatch.setattr("sys.stdin", None)
    with pytest.raises(DocumentError, match="no standard input"):
        read_document("-")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("typed"))
    with pytest.raises(DocumentError, match="it is a terminal"):
        read_document("-")
