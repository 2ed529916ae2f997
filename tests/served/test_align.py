"""Block-aligned chunks: ``[P, C_i]`` ends on the server's prefix-cache block grid."""

from __future__ import annotations

import pytest

import oprm_rag
from oprm_rag.errors import OptionError
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.align import aligned_chunk_tokens, block_aligned_selector

from .fake_server import FakeServer

DOC = " ".join(f"The code of key{i} is {1000 + i}. Some filler words follow here, and more after them."
               for i in range(60))


@pytest.mark.parametrize("chunk, prefix, block, want", [
    (448, 10, 128, 374),  # 10 + 374 = 384 = 3 x 128
    (374, 10, 128, 374),  # already aligned: unchanged
    (373, 10, 128, 246),
    (500, 0, 128, 384),
    (100, 28, 128, 100),
    (2000, 37, 16, 1995),
])
def test_aligned_length(chunk: int, prefix: int, block: int, want: int) -> None:
    got = aligned_chunk_tokens(chunk, prefix, block)
    assert got == want and (prefix + got) % block == 0 and 0 < got <= chunk
    assert aligned_chunk_tokens(got + block - 1, prefix, block) == got  # the largest one


def test_no_aligned_length_is_refused() -> None:
    with pytest.raises(OptionError, match="chunk_tokens >= 118"):
        aligned_chunk_tokens(100, 10, 128)
    for bad in ((0, 1, 128), (10, -1, 128), (10, 1, 0), (10.5, 1, 128)):
        with pytest.raises(OptionError):
            aligned_chunk_tokens(*bad)


@pytest.mark.parametrize("overlap", [0, 16])
def test_every_full_chunk_ends_on_the_grid(overlap: int) -> None:
    """Through the selector and the wire: each scoring prompt's [P, C_i] is a multiple of the
    block, for every chunk but each document's last."""
    with FakeServer() as srv:
        lm = OpenAICompatibleLM(srv.base_url, "fake", tokenizer=oprm_rag.DEMO_MODEL, max_retries=0)
        sel = block_aligned_selector(lm, 64, chunk_tokens=200, chunk_overlap=overlap)
        prefix = sel._prefix_ids()
        assert (len(prefix) + sel.chunk_tokens) % 64 == 0 and sel.chunk_tokens <= 200
        res = sel.select("What is the code of key7?", [DOC, DOC[:2000]], return_inputs=True)
        question = sel._question_ids("What is the code of key7?")
        last = {c.doc_index: max(x.chunk.index for x in res.chunks if x.doc_index == c.doc_index)
                for c in res.chunks}
        full = [c for c in res.chunks if c.chunk.index != last[c.doc_index]]
        assert len(full) > 3
        for c in full:
            assert len(c.chunk.ids) == sel.chunk_tokens
            assert (len(prefix) + len(c.chunk.ids)) % 64 == 0
            assert c.input_ids[len(prefix) + len(c.chunk.ids):] == question
        sent = sorted(len(r["prompt"]) - len(question) for r in srv.requests)
        assert sum(1 for n in sent if n % 64 == 0) >= len(full)


def test_the_default_block_and_auto_length() -> None:
    with FakeServer() as srv:
        lm = OpenAICompatibleLM(srv.base_url, "fake", tokenizer=oprm_rag.DEMO_MODEL, max_retries=0,
                                training_context=512)
        sel = block_aligned_selector(lm)
        assert (len(sel._prefix_ids()) + sel.chunk_tokens) % 128 == 0
        assert sel.options.boundary is None
        with pytest.raises(OptionError, match="boundary"):
            block_aligned_selector(lm, boundary="sentence")
