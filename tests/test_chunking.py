"""Token-exact chunks that tile the document, with char spans."""

import pytest

from oprm_rag.chunking import DocumentTokens, chunk_document
from oprm_rag.testing import tiny_tokenizer

TEXT = ("First sentence here. Second one follows! A third? " * 20 + "\n\nNew paragraph starts. " * 10).strip()


def _doc(text=TEXT):
    tok = tiny_tokenizer()
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return DocumentTokens(text, enc["input_ids"], enc["offset_mapping"])


@pytest.mark.parametrize("size", [8, 33, 100])
def test_chunks_tile_tokens_and_chars(size):
    doc = _doc()
    chunks = chunk_document(doc, 0, size)
    assert chunks[0].token_start == 0 and chunks[-1].token_end == len(doc.token_ids)
    for a, b in zip(chunks, chunks[1:]):
        assert a.token_end == b.token_start and a.char_end == b.char_start
    assert all(c.num_tokens == size for c in chunks[:-1]) and 0 < chunks[-1].num_tokens <= size
    assert "".join(c.text for c in chunks) == doc.text
    assert sum(len(c.token_ids) for c in chunks) == len(doc.token_ids)
    for c in chunks:
        assert c.ids == doc.token_ids[c.token_start:c.token_end].tolist()
        assert c.text == doc.text[c.char_start:c.char_end]


def test_none_keeps_the_document_whole():
    doc = _doc()
    (only,) = chunk_document(doc, 3, None)
    assert only.doc_index == 3 and only.text == doc.text and only.num_tokens == len(doc.token_ids)


def test_overlap_repeats_exactly_that_many_tokens():
    doc = _doc()
    chunks = chunk_document(doc, 0, 40, overlap=10)
    for a, b in zip(chunks, chunks[1:]):
        assert a.token_end - b.token_start == 10
    assert chunks[-1].token_end == len(doc.token_ids)
    with pytest.raises(ValueError):
        chunk_document(doc, 0, 40, overlap=40)


@pytest.mark.parametrize("boundary", ["sentence", "paragraph"])
def test_boundaries_are_preferred_within_tolerance(boundary):
    doc = _doc()
    exact = chunk_document(doc, 0, 50)
    soft = chunk_document(doc, 0, 50, boundary=boundary, tolerance=0.3)
    assert [c.num_tokens <= 50 for c in soft] == [True] * len(soft)
    assert all(c.num_tokens >= 50 - 16 for c in soft[:-1])
    ended = sum(c.text.rstrip().endswith(("."  , "!", "?")) for c in soft[:-1])
    exact_ended = sum(c.text.rstrip().endswith((".", "!", "?")) for c in exact[:-1])
    assert ended == len(soft) - 1 > exact_ended
    for a, b in zip(soft, soft[1:]):
        assert a.token_end == b.token_start


def test_long_documents_tokenise_in_slices_exactly():
    from oprm_rag.demo.recall_task import heldout_prose
    from oprm_rag.tokenize import encode_with_offsets

    tok = tiny_tokenizer()
    text = " ".join(heldout_prose()[:400]) + "\n\n" + " ".join(heldout_prose()[400:800])
    whole = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = encode_with_offsets(tok, text, slice_chars=5000)
    assert ids.tolist() == whole["input_ids"]
    assert offs.tolist() == [list(o) for o in whole["offset_mapping"]]
