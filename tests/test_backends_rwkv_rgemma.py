"""RWKV and RecurrentGemma backends against a plain transformers forward from scratch.

Tiny random models, built in-process. Weights are re-drawn larger than the default
init (which makes near-constant logits) so that every path visibly matters: the
sliding window (8 or 4 tokens, sequences of 30), the RG-LRU reset at position 0, and
RWKV's halving of the hidden state every ``rescale_every`` blocks.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from oprm_rag.backends.recurrent_gemma import RecurrentGemmaBackend  # noqa: E402
from oprm_rag.backends.rwkv import RwkvBackend, wkv_chunked  # noqa: E402
from oprm_rag.state import RecurrentState  # noqa: E402

ATOL = 1e-4
T = 30
VOCAB = 64


def _rwkv(attention_hidden_size: int):
    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=attention_hidden_size,
                                  intermediate_size=64, num_hidden_layers=3, context_length=64, rescale_every=2)
    model = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embeddings" in name:
                p.normal_(0.0, 1.0)
            elif "time_decay" in name:
                p.uniform_(-3.0, 2.0)
            elif "time_first" in name:
                p.uniform_(-1.0, 1.0)
            elif "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name == "head.weight":
                p.mul_(4.0)
    return model.eval(), RwkvBackend


def _rgemma(window: int, heads: int, kv_heads: int, conv: int, blocks: list[str]):
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=3, attention_window_size=window,
        block_types=blocks, conv1d_width=conv, lru_width=48, logits_soft_cap=30.0)
    model = transformers.RecurrentGemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif "norm" in name or "bias" in name:
                p.normal_(0.0, 0.3)
            elif "recurrent_param" in name:
                p.normal_(0.0, 1.0)
    return model.eval(), RecurrentGemmaBackend


MODELS = {
    "rwkv": lambda: _rwkv(32),
    "rwkv_narrow_att": lambda: _rwkv(16),  # attention_hidden_size != hidden_size
    "rgemma_mqa_w8": lambda: _rgemma(8, 4, 1, 4, ["recurrent", "attention"]),
    "rgemma_mha_w4": lambda: _rgemma(4, 2, 2, 2, ["attention", "recurrent"]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest (and fair to a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    torch.manual_seed(sorted(MODELS).index(request.param))
    model, cls = MODELS[request.param]()
    ids = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(7))
    return model, cls(model), ids


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- identity, state shape
def test_handles_only_own_family(setup):
    model, backend, _ = setup
    assert backend.handles(model)
    other = RecurrentGemmaBackend if isinstance(backend, RwkvBackend) else RwkvBackend
    assert not other.handles(model)


def test_state_is_fixed_size_with_batch_first(setup):
    _, backend, ids = setup
    empty = backend.empty_state(2)
    assert empty.family == backend.family
    assert empty.tensors["position"].dtype == torch.long
    assert empty.positions == [0, 0]
    after_5 = backend.forward(ids[:2, :5]).state
    after_30 = backend.forward(ids[:2]).state
    assert after_5.positions == [5, 5] and after_30.positions == [T, T]
    for key, t in empty.tensors.items():
        assert t.shape[0] == 2, key
        assert after_5.tensors[key].shape == t.shape == after_30.tensors[key].shape, key
    assert backend.state_nbytes() == backend.empty_state(1).nbytes > 0


def test_wrong_family_state_is_refused(setup):
    _, backend, ids = setup
    with pytest.raises(ValueError):
        backend.forward(ids[:1, :2], RecurrentState("mamba", {"position": torch.zeros(1, dtype=torch.long)}))


# ---------------------------------------------------------------------- exactness
def test_full_forward_matches_transformers(setup):
    model, backend, ids = setup
    ref = reference(model, ids)
    out = backend.forward(ids, all_logits=True)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (3, T, VOCAB)
    assert err(out.logits, ref) < ATOL
    last = backend.forward(ids)
    assert last.logits.shape == (3, VOCAB)
    assert err(last.logits, ref[:, -1]) < ATOL


@pytest.mark.parametrize("split", [1, 3, 7, 8, 9, 16, 29])
def test_prefix_then_continuation(setup, split):
    model, backend, ids = setup
    ref = reference(model, ids)
    state = backend.forward(ids[:, :split]).state
    before = state.clone()
    out = backend.forward(ids[:, split:], state, all_logits=True)
    assert state.same_as(before), "the input state was modified"
    assert err(out.logits, ref[:, split:]) < ATOL
    assert out.state.positions == [T] * 3


def test_three_pieces_equal_one(setup):
    model, backend, ids = setup
    ref = reference(model, ids)
    s1 = backend.forward(ids[:, :4]).state
    s2 = backend.forward(ids[:, 4:19], s1).state
    out = backend.forward(ids[:, 19:], s2, all_logits=True)
    assert err(out.logits, ref[:, 19:]) < ATOL


def test_token_by_token(setup):
    model, backend, ids = setup
    ref = reference(model, ids)
    state, steps = None, []
    for i in range(T):
        out = backend.forward(ids[:, i:i + 1], state)
        steps.append(out.logits)
        state = out.state
    assert err(torch.stack(steps, 1), ref) < ATOL
    # Stepping and one shot end in the same state.
    assert states_close(state, backend.forward(ids).state)


def states_close(a: RecurrentState, b: RecurrentState, tol: float = 1e-4) -> bool:
    """Equal states; RWKV's (num, den, max) is compared as num * exp(max), den * exp(max)."""
    if a.tensors.keys() != b.tensors.keys():
        return False
    for key, t in a.tensors.items():
        o = b.tensors[key]
        if key.startswith("wkv."):  # rescale a's num and den to b's max
            scale = torch.exp(t[:, 2] - o[:, 2])
            t = torch.stack([t[:, 0] * scale, t[:, 1] * scale], 1)
            o = o[:, :2]
        if not torch.allclose(t.float(), o.float(), atol=tol, rtol=tol):
            return False
    return True


def test_batch_from_expanded_single_state(setup):
    model, backend, ids = setup
    split = 11
    prefix = backend.forward(ids[:1, :split]).state
    before = prefix.clone()
    conts = ids[:, split:]  # three different continuations of row 0's prefix
    out = backend.forward(conts, prefix, all_logits=True)
    assert prefix.same_as(before)
    assert out.state.batch_size == 3
    full = torch.cat([ids[:1, :split].expand(3, -1), conts], dim=1)
    assert err(out.logits, reference(model, full)[:, split:]) < ATOL


def test_rows_are_independent(setup):
    """Rows at different positions (one still empty) continue as if run alone."""
    model, backend, ids = setup
    lengths = [0, 5, 13]
    states = [backend.empty_state(1) if n == 0 else backend.forward(ids[r:r + 1, :n]).state
              for r, n in enumerate(lengths)]
    batch = RecurrentState.cat(states)
    before = batch.clone()
    cont = ids[:, 13:22]
    out = backend.forward(cont, batch, all_logits=True)
    assert batch.same_as(before)
    assert out.state.positions == [n + 9 for n in lengths]
    for r, n in enumerate(lengths):
        full = torch.cat([ids[r:r + 1, :n], cont[r:r + 1]], dim=1)
        assert err(out.logits[r:r + 1], reference(model, full)[:, n:]) < ATOL, f"row {r}"
    # Changing one row's tokens leaves the other rows' logits bit-identical.
    cont2 = cont.clone()
    cont2[1] = (cont2[1] + 1) % VOCAB
    out2 = backend.forward(cont2, batch, all_logits=True)
    assert torch.equal(out2.logits[0], out.logits[0]) and torch.equal(out2.logits[2], out.logits[2])
    assert not torch.equal(out2.logits[1], out.logits[1])
    for r in (0, 2):
        assert out2.state.select(r).same_as(out.state.select(r))


def test_step_from_a_selected_row(setup):
    model, backend, ids = setup
    state = backend.forward(ids[:, :10]).state
    row = state.select(2)
    out = backend.forward(ids[2:3, 10:11], row)
    assert err(out.logits, reference(model, ids[2:3, :11])[:, -1]) < ATOL


@pytest.mark.parametrize("from_empty", [False, True])
def test_left_padding_matches_each_row_alone(setup, from_empty):
    """Rows of 11, 4 and 1 tokens, left-padded to 11, from one state: as if each ran alone."""
    model, backend, ids = setup
    assert backend.supports_left_padding
    n0 = 0 if from_empty else 6
    state = backend.empty_state(1) if from_empty else backend.forward(ids[:1, :n0]).state
    before = state.clone()
    lengths = [11, 4, 1]
    rows = [ids[r, 6:6 + n] for r, n in enumerate(lengths)]
    batch = torch.zeros(3, 11, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, 11 - len(row):] = row
    pads = torch.tensor([11 - n for n in lengths])
    out = backend.forward(batch, state, all_logits=True, pad_left=pads)
    assert state.same_as(before)
    assert out.state.positions == [n0 + n for n in lengths]
    more = ids[:, 20:25]
    after = backend.forward(more, out.state, all_logits=True)  # the padded step's states carry on
    for r, row in enumerate(rows):
        alone = backend.forward(row[None], state, all_logits=True)
        assert err(out.logits[r, pads[r]:], alone.logits[0]) < ATOL
        assert states_close(out.state.select(r), alone.state)
        full = torch.cat([ids[:1, :n0], row[None], more[r:r + 1]], dim=1)
        ref = reference(model, full)
        assert err(out.logits[r, pads[r]:], ref[0, n0:n0 + len(row)]) < ATOL
        assert err(after.logits[r], ref[0, n0 + len(row):]) < ATOL


def test_unpadded_rows_ignore_pad_left_zeros(setup):
    _, backend, ids = setup
    plain = backend.forward(ids[:, :9], all_logits=True)
    zero = backend.forward(ids[:, :9], all_logits=True, pad_left=torch.zeros(3, dtype=torch.long))
    assert torch.equal(plain.logits, zero.logits) and plain.state.same_as(zero.state)
    with pytest.raises(ValueError):
        backend.forward(ids[:, :9], pad_left=torch.tensor([0, 9, 0]))  # a row of pads only


# ---------------------------------------------------------------------- family specifics
def test_rwkv_follows_inference_rescaling():
    """Match transformers' eval-mode rescaling even when the backend runs first, and train mode."""
    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  rescale_every=1, layer_norm_epsilon=0.05)  # a large eps shows any rescale slip
    torch.manual_seed(5)
    model = transformers.RwkvForCausalLM(cfg).eval()
    with torch.no_grad():
        model.rwkv.embeddings.weight.normal_(0.0, 1.0)
    backend = RwkvBackend(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    assert not model.rwkv.layers_are_rescaled
    first = backend.forward(ids, all_logits=True).logits  # before any transformers forward
    assert model.rwkv.layers_are_rescaled
    assert err(first, reference(model, ids)) < ATOL
    model.train()  # transformers un-rescales the blocks and stops halving
    try:
        train_ref = reference(model, ids)
        assert err(backend.forward(ids, all_logits=True).logits, train_ref) < ATOL
        assert err(train_ref, first) > 10 * ATOL  # the two modes really differ here
    finally:
        model.eval()


def _wkv_case(b=2, t=23, d=32, key_shift=0.0):
    g = torch.Generator().manual_seed(3)
    key = torch.randn(b, t, d, generator=g) * 8 + key_shift  # large keys: the max-stabilisation must hold
    value = torch.randn(b, t, d, generator=g)
    return torch.randn(d, generator=g) * 2, torch.randn(d, generator=g), key, value


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("key_shift", [0.0, -200.0])
def test_wkv_chunked_matches_transformers_loop(chunk, key_shift):
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    decay, first, key, value = _wkv_case(key_shift=key_shift)
    # The backend's own empty state (its running max must not underflow very negative keys).
    empty = RwkvBackend(_rwkv(32)[0]).empty_state(2).tensors["wkv.0"]
    # Reference: transformers' step loop in float64 (in float32 it is itself off by ~2e-5
    # at keys near -200; the chunked form is closer to float64 than the float32 loop).
    ref, (num, den, mx) = rwkv_linear_attention_cpu(decay.double(), first.double(), key.double(),
                                                    value.double(), return_state=True)
    tol = dict(atol=3e-5, rtol=3e-5)
    out, state = wkv_chunked(decay, first, key, value, empty, chunk=chunk)
    assert torch.allclose(out.double(), ref, **tol)
    scale = torch.exp(state[:, 2].double() - mx)
    # The carried sums' rounding grows with |key| (~1e-4 relative near -200, as in the loop).
    assert torch.allclose(state[:, 0] * scale, num, atol=3e-4, rtol=3e-4)
    assert torch.allclose(state[:, 1] * scale, den, atol=3e-4, rtol=3e-4)
    # Split in two from the carried state.
    _, mid = wkv_chunked(decay, first, key[:, :9], value[:, :9], empty, chunk=chunk)
    rest, _ = wkv_chunked(decay, first, key[:, 9:], value[:, 9:], mid, chunk=chunk)
    assert torch.allclose(rest.double(), ref[:, 9:], **tol)
    # Left pads (across chunk borders) leave both the outputs and the state alone.
    pad, (b, _, d) = 12, key.shape
    padded_k = torch.cat([torch.randn(b, pad, d, generator=torch.Generator().manual_seed(4)) * 50, key], dim=1)
    padded_v = torch.cat([torch.full((b, pad, d), float("nan")), value], dim=1)  # pads must not leak
    valid = torch.arange(pad + key.shape[1])[None, :] >= torch.tensor([pad, 0])[:, None]
    padded_k[1], padded_v[1] = torch.cat([key[1], key[1, :pad]]), torch.cat([value[1], value[1, :pad]])
    out_p, state_p = wkv_chunked(decay, first, padded_k, padded_v, mid, chunk=chunk, valid=valid)
    alone, alone_state = wkv_chunked(decay, first, key[:1], value[:1], mid[:1], chunk=chunk)
    assert torch.equal(out_p[0, :pad], torch.zeros_like(out_p[0, :pad]))
    assert torch.allclose(out_p[0, pad:], alone[0], **tol)
    scale = torch.exp(state_p[0, 2] - alone_state[0, 2])
    assert torch.allclose(state_p[0, :2] * scale, alone_state[0, :2], atol=3e-4, rtol=3e-4)


def test_rgemma_state_keeps_only_the_window():
    model, cls = _rgemma(8, 4, 1, 4, ["recurrent", "attention"])
    backend = cls(model)
    state = backend.empty_state(1)
    assert state.tensors["key.1"].shape == (1, 1, 7, 8)  # window - 1 slots: the query itself is the 8th
    assert state.tensors["conv.0"].shape == (1, 48, 3)
    assert state.tensors["rglru.0"].dtype == torch.float32
