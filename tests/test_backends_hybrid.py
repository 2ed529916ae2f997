"""Exact, reused states for the families transformers runs on its own cache objects.

The hybrids (Granite-4.0-H, Nemotron-H, Bamba, Zamba2, Falcon-H1, Jamba, Qwen3-Next,
LFM2), the purely recurrent xLSTM and a plain transformer (Llama), each a tiny random-init
model saved to a folder and loaded through ``RecurrentLM.from_pretrained``:

* the backend equals plain forwards from scratch (continuation, rows of different lengths
  in one batch, token-by-token decoding) and never modifies a state;
* through the public API, each chunk's entropy and top token equal a plain forward of the
  input ids the result reports, and the answer equals plain greedy decoding of them;
* a follow-up question about the same document embeds only the question's tokens per
  chunk (counted by a hook on the embedding layer), every chunk comes from the cache, and
  the answer equals the uncached one; the same through the disk tier in a new process's
  objects;
* a sliding-window transformer keeps the token replay, and says why.
"""

from __future__ import annotations

import logging

import pytest
import torch

from oprm_rag import OPRMSelector, RecurrentLM, resolve
from oprm_rag.backends.hf_cache import CacheBackend
from oprm_rag.backends.replay import ReplayBackend
from oprm_rag.engine import StatefulEngine
from oprm_rag.scoring import first_token_stats
from oprm_rag.storage.cache import DocumentStateCache
from oprm_rag.state import RecurrentState
from oprm_rag.testing import CACHE_FAMILIES, FALLBACK_FAMILIES

DOC = ("The code of alpha is 1234. Mamba models keep a fixed size state. Long documents overflow that state. "
       "OPRM splits the context into chunks and scores each chunk. The code of beta is 5678. ") * 2
QUESTION = "What is the code of alpha?"
FOLLOW_UP = "What is the code of beta?"
#: Largest logit difference from a plain forward. Jamba's Mamba-1 layers run transformers'
#: reference selective scan, whose float32 sums depend on where a sequence is split: its own
#: cache continuation differs from its plain forward by the same 3.3e-4 (logits up to 3.7).
TOL = {"jamba": 1e-3}


def _ids(b, t, seed=0, vocab=300):
    return torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _plain(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits.float()


def _plain_greedy(lm, ids, n):
    seq, out = list(ids), []
    for _ in range(n):
        nxt = int(_plain(lm, torch.tensor([seq]))[0, -1].argmax())
        if nxt in lm.eos_token_ids:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


class EmbeddedTokens:
    """Counts the tokens the model embeds (a forward hook on its input embedding layer)."""

    def __init__(self, lm: RecurrentLM) -> None:
        self.count = 0
        self._hook = lm.model.get_input_embeddings().register_forward_hook(self._seen)

    def _seen(self, module, args, output) -> None:
        self.count += int(args[0].numel())

    def close(self) -> None:
        self._hook.remove()


@pytest.mark.parametrize("family", CACHE_FAMILIES)
def test_backend_states_are_exact_and_never_modified(load_lm, family):
    lm = load_lm(family)
    backend, tol = lm.backend, TOL.get(family, 1e-4)
    assert isinstance(backend, CacheBackend) and backend.exact_continuation and backend.family == family
    ids = _ids(2, 19, seed=1)
    ref = _plain(lm, ids)
    first = backend.forward(ids[:, :8])
    kept = first.state.clone()
    second = backend.forward(ids[:, 8:], first.state, all_logits=True)
    assert (second.logits - ref[:, 8:]).abs().max().item() < tol
    assert first.state.same_as(kept), "forward() modified the state it was given"
    # Rows of different lengths in one batch: the shorter's keys are left-padded and masked.
    short = backend.forward(ids[1:, :3]).state
    mixed = RecurrentState.cat([first.state.select(0), short])
    q = _ids(2, 4, seed=2)
    both = backend.forward(q, mixed, all_logits=True)
    assert (both.logits[0] - _plain(lm, torch.cat([ids[:1, :8], q[:1]], 1))[0, -4:]).abs().max().item() < tol
    assert (both.logits[1] - _plain(lm, torch.cat([ids[1:, :3], q[1:]], 1))[0, -4:]).abs().max().item() < tol
    # Token-by-token decoding from the mixed batch, on one live cache.
    session = backend.session(mixed)
    seqs = [ids[0, :8].tolist(), ids[1, :3].tolist()]
    nxt = q[:, :1]
    for _ in range(3):
        got = session.step(nxt)
        for r in range(2):
            seqs[r].append(int(nxt[r]))
            assert (got[r] - _plain(lm, torch.tensor([seqs[r]]))[0, -1]).abs().max().item() < tol
        nxt = got.argmax(-1, keepdim=True)
    assert mixed.same_as(RecurrentState.cat([kept.select(0), short]))
    # State bytes: fixed recurrent parts plus the keys, which grow with the tokens.
    assert first.state.select(0).nbytes == backend.state_nbytes(8)
    assert backend.state_nbytes(100) - backend.state_nbytes(0) == 100 * backend.kv_bytes_per_token()
    assert (backend.kv_bytes_per_token() > 0) == (family != "xlstm") == backend.positional


@pytest.mark.parametrize("family", CACHE_FAMILIES)
def test_selection_follow_up_and_disk_tier_through_the_public_api(model_dir, family, tmp_path):
    lm = RecurrentLM.from_pretrained(model_dir(family), device="cpu", dtype=torch.float32)
    assert isinstance(lm.backend, CacheBackend)
    counter = EmbeddedTokens(lm)
    try:
        sel = OPRMSelector(lm, chunk_tokens=24, idk_filter=False, cache=DocumentStateCache(directory=tmp_path))
        first = sel.answer(QUESTION, DOC, max_new_tokens=5, return_inputs=True)
        # every chunk's entropy and top token: a plain forward of the ids the result reports
        assert len(first.chunks) >= 4 and len({c.token_end - c.token_start for c in first.chunks}) > 1
        for c in first.chunks:
            stats = first_token_stats(_plain(lm, torch.tensor([c.input_ids]))[:, -1])
            assert stats.top_id[0] == c.top_token_id and abs(stats.entropy[0] - c.entropy) < TOL.get(family, 1e-4)
        assert lm.tokenizer.decode(_plain_greedy(lm, first.input_ids, 5), skip_special_tokens=True) == first.text

        doc_tokens = len(lm.encode(DOC))
        embedded_first = counter.count
        counter.count = 0
        again = sel.answer(FOLLOW_UP, DOC, max_new_tokens=5)
        embedded_again = counter.count
        uncached = OPRMSelector(lm, chunk_tokens=24, idk_filter=False, cache=False).answer(FOLLOW_UP, DOC,
                                                                                           max_new_tokens=5)
        assert again.usage.cached_chunks == again.usage.chunks == len(first.chunks)
        assert embedded_first - embedded_again >= 0.9 * doc_tokens  # the document was not run again
        q = len(sel._question_ids(FOLLOW_UP))
        assert again.usage.input_tokens == len(again.chunks) * q  # only the question, per chunk
        assert again.text == uncached.text and again.chunk.entropy == pytest.approx(uncached.chunk.entropy, abs=1e-4)
    finally:
        counter.close()

    # The disk tier: a new cache object on the same folder (as another process would open it).
    disk = OPRMSelector(lm, chunk_tokens=24, idk_filter=False, cache=DocumentStateCache(directory=tmp_path))
    from_disk = disk.answer(FOLLOW_UP, DOC, max_new_tokens=5)
    assert disk.cache.stats()["disk_hits"] == 1 and from_disk.usage.cached_chunks == from_disk.usage.chunks
    assert from_disk.text == uncached.text


@pytest.mark.parametrize("family", ["zamba2", "llama"])
def test_a_hybrid_state_round_trips_through_a_file(load_lm, family, tmp_path):
    lm = load_lm(family)
    ids = _ids(2, 12, seed=3)
    state = RecurrentState.cat([lm.backend.forward(ids[:1]).state, lm.backend.forward(ids[1:, :5]).state])
    state.save(tmp_path / "s.safetensors")
    back = RecurrentState.load(tmp_path / "s.safetensors")
    assert back.same_as(state) and back.kv_width == 12 and back.positions == [12, 5]
    q = _ids(2, 3, seed=4)
    assert torch.equal(lm.backend.forward(q, back).logits, lm.backend.forward(q, state).logits)


def test_padding_a_state_keeps_its_rows_and_refuses_to_drop_tokens(load_lm):
    lm = load_lm("llama")
    state = lm.backend.forward(_ids(1, 6)).state
    wide = state.with_kv_width(10)
    assert wide.kv_width == 10 and wide.with_kv_width(6).same_as(state)
    q = _ids(1, 2, seed=5)
    assert (lm.backend.forward(q, wide).logits - lm.backend.forward(q, state).logits).abs().max() < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        state.with_kv_width(5)


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_sliding_window_transformers_keep_the_replay_and_say_why(model_dir, family, caplog):
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        lm = RecurrentLM.from_pretrained(model_dir(family), device="cpu", dtype=torch.float32)
    assert isinstance(lm.backend, ReplayBackend) and "DynamicSlidingWindowLayer" in caplog.text
    assert lm.position_limit == lm.model.config.max_position_embeddings


def test_a_transformer_on_stored_states_keeps_its_position_limit(load_lm):
    lm = load_lm("llama")
    assert isinstance(resolve(lm), StatefulEngine) and lm.position_limit == lm.model.config.max_position_embeddings
    assert load_lm("xlstm").position_limit is None  # purely recurrent: no positions


def test_fused_kernels_forced_off_cuda_fail_loudly(load_lm):
    lm = load_lm("zamba2")
    with pytest.raises(RuntimeError, match="CUDA"):
        CacheBackend(lm.model, kernels="cuda").forward(_ids(1, 3))
