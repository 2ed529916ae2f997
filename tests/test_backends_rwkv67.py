"""RWKV-6 and RWKV-7, read natively, against BlinkDL's reference (PyPI ``rwkv``).

Tiny random checkpoints in BlinkDL's ``.pth`` format (and the same weights as Hugging
Face folders) are run by our backends and by the reference on the same ids: logits
and the per-layer states (token shifts, WKV matrices) must agree, for a full forward,
a continuation from a stored state, token-by-token decoding, batched rows and
left-padded rows. Then the public API (``RecurrentLM.from_pretrained`` + ``OPRMSelector``)
must score each chunk as the reference scores its ids, decode the reference's greedy
answer, and answer a follow-up from cached chunk states without embedding the document
again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("rwkv", reason="the reference implementation is PyPI's rwkv package (pip install rwkv)")

from oprm_rag.backends import backend_for  # noqa: E402
from oprm_rag.backends.rwkv6 import Rwkv6Backend, wkv6_chunked, wkv6_scan  # noqa: E402
from oprm_rag.backends.rwkv7 import Rwkv7Backend  # noqa: E402
from oprm_rag.errors import ModelLoadError  # noqa: E402
from oprm_rag.rwkv_loading import load_rwkv  # noqa: E402
from oprm_rag.rwkv_testing import (blinkdl_reference, random_rwkv_weights, save_rwkv_hf_folder,  # noqa: E402
                                   save_rwkv_pth)

# BlinkDL's reference is TorchScript, which torch 2.13 calls deprecated on every load
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")

ATOL = 1e-4
VOCAB = 512
SHAPES = {6: dict(layers=2, hidden=64, head_size=32, vocab=VOCAB), 7: dict(layers=3, hidden=64, head_size=16,
                                                                           vocab=VOCAB)}


@pytest.fixture(scope="module", params=[6, 7], ids=["rwkv6", "rwkv7"])
def setup(request, tmp_path_factory):
    version = request.param
    pth = save_rwkv_pth(tmp_path_factory.mktemp(f"v{version}"), version, seed=version, **SHAPES[version])
    model, _ = load_rwkv(pth)
    return version, backend_for(model), blinkdl_reference(version, pth)


def ids_for(rows: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, t), generator=torch.Generator().manual_seed(seed))


def ref_run(ref, ids: list[int], state=None, one_by_one: bool = False):
    """The reference's logits [t, v] and its state list after ``ids`` (never mutating ``state``)."""
    state = None if state is None else [s.clone() for s in state]
    if one_by_one:
        rows = []
        for tok in ids:
            logits, state = ref.forward([tok], state)
            rows.append(logits.float())
            state = [s.clone() for s in state]
        return torch.stack(rows), state
    logits, state = ref.forward(list(ids), state, full_output=True)
    return logits.float().reshape(len(ids), -1), [s.clone() for s in state]


def assert_state_matches(ours, row: int, ref_state, atol: float = ATOL) -> None:
    layers = len(ref_state) // 3
    for i in range(layers):
        for j, key in enumerate(("att_shift", "wkv", "ffn_shift")):
            got = ours.tensors[f"{key}.{i}"][row].float()
            want = ref_state[3 * i + j].float()
            assert got.shape == want.shape, key
            err = (got - want).abs().max().item()
            assert err < atol, f"{key}.{i} differs from the reference by {err}"


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------- against BlinkDL's reference
def test_full_forward_matches_the_reference_batched(setup):
    _, backend, ref = setup
    ids = ids_for(3, 40)
    out = backend.forward(ids, all_logits=True)
    assert out.logits.shape == (3, 40, VOCAB) and out.state.positions == [40, 40, 40]
    for row in range(3):
        logits, state = ref_run(ref, ids[row].tolist())
        assert err(out.logits[row], logits) < ATOL
        assert_state_matches(out.state, row, state)


def test_continuation_from_a_stored_state(setup):
    _, backend, ref = setup
    ids = ids_for(2, 33, seed=1)
    first = backend.forward(ids[:, :21])
    kept = first.state.clone()
    second = backend.forward(ids[:, 21:], first.state, all_logits=True)
    assert first.state.same_as(kept), "the stored state was modified"
    whole = backend.forward(ids, all_logits=True)
    assert err(second.logits, whole.logits[:, 21:]) < ATOL
    for row in range(2):
        _, state = ref_run(ref, ids[row, :21].tolist())
        logits, state = ref_run(ref, ids[row, 21:].tolist(), state)
        assert err(second.logits[row], logits) < ATOL
        assert_state_matches(second.state, row, state)


def test_token_by_token_decoding_matches_the_reference_one_token_path(setup):
    _, backend, ref = setup
    ids = ids_for(2, 20, seed=2)
    start = backend.forward(ids[:, :8]).state
    session = backend.session(start)
    steps = torch.stack([session.step(ids[:, t:t + 1]) for t in range(8, 20)], dim=1)
    assert start.positions == [8, 8]  # the session works on its own copy
    assert session.state.positions == [20, 20]
    for row in range(2):
        _, state = ref_run(ref, ids[row, :8].tolist())
        logits, state = ref_run(ref, ids[row, 8:].tolist(), state, one_by_one=True)
        assert err(steps[row], logits) < ATOL
        assert_state_matches(session.state, row, state)


def test_left_padded_rows_equal_their_unpadded_runs(setup):
    _, backend, _ = setup
    assert backend.supports_left_padding
    ids = ids_for(3, 15, seed=3)
    prefix = backend.forward(ids_for(1, 9, seed=4)).state
    pad = torch.tensor([0, 4, 9])
    out = backend.forward(ids, prefix, all_logits=True, pad_left=pad)
    assert out.state.positions == [9 + 15, 9 + 11, 9 + 6]
    for row in range(3):
        alone = backend.forward(ids[row:row + 1, int(pad[row]):], prefix, all_logits=True)
        assert err(out.logits[row, int(pad[row]):], alone.logits[0]) < ATOL
        assert out.state.select(row).same_as(alone.state, atol=ATOL)


def test_state_layout_and_size(setup):
    version, backend, _ = setup
    cfg = backend.model.config
    empty = backend.empty_state(2)
    assert empty.family == f"rwkv{version}"
    assert empty.tensors["wkv.0"].shape == (2, cfg.num_heads, cfg.head_size, cfg.head_size)
    assert empty.tensors["wkv.0"].dtype == torch.float32
    assert backend.state_nbytes() == empty.select(0).nbytes > 0
    other = Rwkv7Backend if version == 6 else Rwkv6Backend
    assert not other.handles(backend.model)
    with pytest.raises(ValueError):
        other(backend.model).forward(ids_for(1, 3), empty.select(0))


def test_wkv6_chunks_equal_the_token_by_token_scan():
    g = torch.Generator().manual_seed(5)
    b, t, h, n = 2, 45, 2, 8
    r, k, v = (torch.randn(b, t, h, n, generator=g) for _ in range(3))
    # decays that swing between strong and weak within a chunk
    log_w = -torch.exp(torch.randn(b, t, h, n, generator=g) * 3)
    u, s0 = torch.randn(h, n, generator=g), torch.randn(b, h, n, n, generator=g)
    want_out, want_state = wkv6_scan(r, k, v, log_w, u, s0)  # BlinkDL's recurrence (the CPU path)
    for chunk in (1, 4, 16, 32, None):
        out, state = wkv6_chunked(r, k, v, log_w, u, s0, chunk=chunk)
        assert err(out, want_out) < 1e-4 and err(state, want_state) < 1e-4


def test_wkv7_chunks_equal_the_token_by_token_scan():
    import torch.nn.functional as F

    from oprm_rag.backends.rwkv7 import wkv7_chunked, wkv7_scan

    g = torch.Generator().manual_seed(9)
    b, t, h, n = 2, 70, 2, 16
    r, k, v = (torch.randn(b, t, h, n, generator=g) for _ in range(3))
    kk = F.normalize(torch.randn(b, t, h, n, generator=g), dim=-1)
    a, bb = -kk, kk * torch.rand(b, t, h, n, generator=g)
    # the strongest decay RWKV-7 has (exp(-0.6065)) and next to none, mixed
    w = torch.exp(-0.606531 * torch.sigmoid(torch.randn(b, t, h, n, generator=g) * 4))
    s0 = torch.randn(b, h, n, n, generator=g)
    want, want_state = wkv7_scan(r, w, k, v, a, bb, s0)
    for chunk in (1, 7, 32):
        out, state = wkv7_chunked(r, w, k, v, a, bb, s0, chunk=chunk)
        assert err(out, want) < 1e-4 and err(state, want_state) < 1e-4


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("version", [6, 7])
def test_hf_folder_loads_the_same_model_as_the_pth(version, tmp_path):
    # head size 64, as in every release: fla's ln_x epsilon is head_dim * norm_eps (64e-5, BlinkDL's)
    shape = dict(layers=2, hidden=128, head_size=64, vocab=300, seed=11)
    pth = save_rwkv_pth(tmp_path / "pth", version, **shape)
    folder = save_rwkv_hf_folder(tmp_path / "hf", version, **shape)
    a, _ = load_rwkv(pth)
    b, tok = load_rwkv(folder)
    assert b.config.source_format == ("rwkv-hf" if version == 6 else "fla")
    ids = ids_for(1, 12, seed=6) % 300
    assert err(a(ids), b(ids)) == 0.0
    assert tok.eos_token == "\n\n" and tok.decode(tok.encode("a\n\nb")) == "a\n\nb"
    if version == 7:  # fla's first layout stacked the six token-shift mixes as attn.x_x
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        for i in range(2):
            mixes = [weights.pop(f"model.layers.{i}.attn.x_{n}").reshape(-1) for n in "rwkvag"]
            weights[f"model.layers.{i}.attn.x_x"] = torch.stack(mixes)
        save_file(weights, str(folder / "model.safetensors"))
        assert err(a(ids), load_rwkv(folder)[0](ids)) == 0.0


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    sd = random_rwkv_weights(7, layers=2, hidden=32, head_size=16, vocab=300)
    del sd["blocks.1.att.k_k"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ModelLoadError, match="blocks.1.att.k_k"):
        load_rwkv(tmp_path / "broken.pth")
    rwkv4 = {"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_decay": torch.zeros(4),
             "blocks.0.att.time_first": torch.zeros(4)}
    torch.save(rwkv4, tmp_path / "old.pth")
    with pytest.raises(ModelLoadError, match="RWKV-4"):
        load_rwkv(tmp_path / "old.pth")
    folder = save_rwkv_hf_folder(tmp_path / "hybrid", 7, layers=2, hidden=32, head_size=16, vocab=300)
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["attn"] = {"layers": [1], "num_heads": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    from oprm_rag.loading import load_model_and_tokenizer
    from oprm_rag.rwkv_loading import load_native

    with pytest.raises(ModelLoadError, match="attention layers.*trust_remote_code=True"):
        load_model_and_tokenizer(folder)
    assert load_native(folder, trust_remote_code=True) is None  # transformers runs its own code instead


def test_world_tokenizer_matches_blinkdl_trie():
    import rwkv

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from oprm_rag.rwkv_tokenizer import RwkvWorldTokenizer

    vocab = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    ours = RwkvWorldTokenizer.from_folder(vocab.parent, vocab_file=vocab)
    ref = TRIE_TOKENIZER(str(vocab))
    texts = ["The code of alpha is 1234.\n\nUser: what?\n\nAssistant:", "中文测试，你好吗？ emoji 😀🎉 café",
             "x" * 300 + "  \t\r\n", "\x00\x01\x7f"]
    for text in texts:
        enc = ours(text, return_offsets_mapping=True)
        assert enc["input_ids"] == ref.encode(text)
        assert ours.decode(enc["input_ids"]) == text
        spans = enc["offset_mapping"]
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a <= b for a, b in spans) and all(p[1] <= q[1] for p, q in zip(spans, spans[1:]))
    assert ours.eos_token == "\n\n" and ours.eos_token_id == ref.encode("\n\n")[0]
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "User: hi\n\nAssistant:"


# ---------------------------------------------------------------------- the public API
DOCS = ["The code of alpha is 1234. The code of beta is 5678. " * 5,
        "Answer the question using only the text below. Question: Answer: " * 3, "A short one."]
QUESTION = "What is the code of alpha?"


@pytest.fixture(scope="module", params=[("rwkv7", "pth"), ("rwkv6", "hf")], ids=["rwkv7-pth", "rwkv6-hf"])
def public(request, tmp_path_factory):
    from oprm_rag import RecurrentLM

    family, layout = request.param
    version = int(family[-1])
    root = tmp_path_factory.mktemp(f"{family}-{layout}")
    shape = dict(layers=2, hidden=64, head_size=32, vocab=VOCAB, seed=21)
    pth = save_rwkv_pth(root / "pth", version, **shape)
    path = pth if layout == "pth" else save_rwkv_hf_folder(root / "hf", version, **shape)
    lm = RecurrentLM.from_pretrained(path, dtype=torch.float32)
    assert lm.backend.exact_continuation and lm.family == family
    return lm, blinkdl_reference(version, pth)


def ref_entropy_and_top(ref, ids: list[int]) -> tuple[float, int]:
    logits, _ = ref.forward(list(ids), None)
    logp = torch.log_softmax(logits.float(), -1)
    return float(-(logp.exp() * logp).sum()), int(logits.argmax())


def ref_greedy(ref, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    logits, state = ref.forward(list(ids), None)
    for _ in range(n):
        nxt = int(logits.argmax())
        if nxt in eos:
            break
        out.append(nxt)
        logits, state = ref.forward([nxt], [s.clone() for s in state])
    return out


def test_chunk_entropies_equal_the_reference_forward_of_their_ids(public):
    from oprm_rag import OPRMSelector

    lm, ref = public
    res = OPRMSelector(lm, chunk_tokens=24, max_batch_tokens=100, cache=False).select(
        QUESTION, DOCS, return_inputs=True)
    assert len(res.chunks) >= 4
    worst = 0.0
    for c in res.chunks:
        entropy, top = ref_entropy_and_top(ref, c.input_ids)
        assert top == c.top_token_id
        worst = max(worst, abs(entropy - c.entropy))
    assert worst < 1e-4, f"entropy differs from BlinkDL's forward by {worst}"


def test_answer_is_the_reference_greedy_decode_of_the_best_chunk(public):
    from oprm_rag import OPRMSelector

    lm, ref = public
    ans = OPRMSelector(lm, chunk_tokens=24, idk_filter=False).answer(QUESTION, DOCS, max_new_tokens=8,
                                                                     return_inputs=True)
    want = ref_greedy(ref, ans.input_ids, 8, lm.eos_token_ids)
    assert ans.usage.output_tokens == len(want) > 0
    assert ans.text == lm.tokenizer.decode(want, skip_special_tokens=True)


def test_follow_up_runs_from_cached_chunk_states(public):
    from oprm_rag import OPRMSelector

    lm, _ = public
    fresh = OPRMSelector(lm, chunk_tokens=24, cache=False).answer(QUESTION, DOCS, max_new_tokens=6)
    sel = OPRMSelector(lm, chunk_tokens=24)
    sel.answer("Which code is 5678?", DOCS, max_new_tokens=2)
    embedded: list[int] = []
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(
        int(args[0].numel())))
    try:
        cached = sel.answer(QUESTION, DOCS, max_new_tokens=6)
    finally:
        hook.remove()
    assert cached.usage.cached_chunks == cached.usage.chunks == len(cached.chunks)
    q = len(sel._question_ids(QUESTION))
    assert cached.usage.input_tokens == len(cached.chunks) * q
    # embedded: the question once per chunk, then each answer token but the last; no document token
    assert sum(embedded) == len(cached.chunks) * q + cached.usage.output_tokens - 1
    assert cached.text == fresh.text
    for a, b in zip(fresh.chunks, cached.chunks):
        assert abs(a.entropy - b.entropy) < 1e-5 and a.top_token_id == b.top_token_id


def test_a_hub_name_in_the_hf_cache_loads_natively(tmp_path):
    """``fla-hub/...`` as downloaded into the Hugging Face cache (no network: HF_HUB_OFFLINE)."""
    import shutil

    from oprm_rag import RecurrentLM

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fla-hub--rwkv7-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    built = save_rwkv_hf_folder(tmp_path / "built", 7, layers=2, hidden=32, head_size=16, vocab=300)
    shutil.copytree(built, repo / "snapshots" / sha)
    lm = RecurrentLM.from_pretrained("fla-hub/rwkv7-tiny", cache_dir=str(tmp_path / "hub"))
    assert lm.family == "rwkv7" and lm.backend.exact_continuation
    assert lm.model.config.source_format == "fla"


@pytest.mark.parametrize("version", [6, 7])
def test_bfloat16_runs_with_float32_wkv_states(version, tmp_path):
    """Releases ship bfloat16: the model runs in it, the WKV states stay float32."""
    pth = save_rwkv_pth(tmp_path, version, layers=2, hidden=64, head_size=32, vocab=300, seed=3)
    ids = ids_for(2, 16, seed=8) % 300
    full = backend_for(load_rwkv(pth, dtype=torch.float32)[0]).forward(ids, all_logits=True)
    half = backend_for(load_rwkv(pth, dtype=torch.bfloat16)[0]).forward(ids, all_logits=True)
    assert half.state.tensors["att_shift.0"].dtype == torch.bfloat16 and half.state.tensors["wkv.0"].dtype == torch.float32
    assert torch.isfinite(half.logits).all()
    assert err(half.logits, full.logits) < 0.1 * full.logits.abs().max().item()  # bfloat16 rounding, no more


def test_disk_tier_round_trip_gives_the_same_answer(public, tmp_path):
    """Chunk states written to disk by one selector serve another (a new process's view)."""
    from oprm_rag import OPRMSelector

    try:
        from oprm_rag.storage.cache import DocumentStateCache
    except ImportError:  # before the storage package (issue #20)
        from oprm_rag.cache import DocumentStateCache

    lm, _ = public
    want = OPRMSelector(lm, chunk_tokens=24, cache=False).answer(QUESTION, DOCS[:1], max_new_tokens=4)
    OPRMSelector(lm, chunk_tokens=24, cache=DocumentStateCache(directory=tmp_path)).select("Which code?", DOCS[:1])
    assert list(tmp_path.glob("*/*.safetensors"))
    reader = OPRMSelector(lm, chunk_tokens=24, cache=DocumentStateCache(directory=tmp_path))
    got = reader.answer(QUESTION, DOCS[:1], max_new_tokens=4)
    assert reader.cache.stats()["disk_hits"] == 1 and reader.cache.stats()["misses"] == 0
    assert got.text == want.text and got.usage.cached_chunks == got.usage.chunks
    assert len(got.chunks) == len(want.chunks)
    assert all(abs(a.entropy - b.entropy) < 1e-5 for a, b in zip(got.chunks, want.chunks))
