"""Stuffed-Mamba mitigations on Mamba-2: exact at neutral settings, real otherwise."""

import pytest
import torch

from oprm_rag import OPRMSelector, RecurrentLM
from oprm_rag.backends.mamba2 import Mamba2Backend
from oprm_rag.mitigation import CollapseMitigation


def _ids(t=40, seed=0):
    return torch.randint(2, 300, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mit", [
    CollapseMitigation(alpha_scale=1.0, b_scale=1.0),
    CollapseMitigation(window=4096),  # longer than the 40-token input: no effect
])
def test_neutral_settings_are_exactly_the_plain_model(load_lm, mit):
    lm = load_lm("mamba2")
    backend = Mamba2Backend(lm.model, mitigation=mit)
    ids = _ids()
    with torch.no_grad():
        ref = lm.model(input_ids=ids, use_cache=False).logits
    out = backend.forward(ids, all_logits=True)
    assert (out.logits - ref).abs().max().item() < 1e-4
    state = backend.forward(ids[:, :17]).state
    cont = backend.forward(ids[:, 17:], state, all_logits=True)
    assert (cont.logits - ref[:, 17:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("spec", ["forget", "normalize", "window:8", {"alpha_scale": 0.9, "b_scale": 0.5}])
def test_mitigations_change_the_model_and_continue_exactly(model_dir, spec):
    lm = RecurrentLM.from_pretrained(model_dir("mamba2"), collapse_mitigation=spec)
    plain = RecurrentLM.from_pretrained(model_dir("mamba2"))
    ids = _ids(30, seed=1)
    whole = lm.backend.forward(ids, all_logits=True).logits
    assert (whole - plain.backend.forward(ids, all_logits=True).logits).abs().max().item() > 1e-4
    state = lm.backend.forward(ids[:, :13]).state
    cont = lm.backend.forward(ids[:, 13:], state, all_logits=True).logits
    assert (cont - whole[:, 13:]).abs().max().item() < 1e-4
    assert lm.identity != plain.identity  # the cache never mixes mitigated and plain states


def test_window_state_is_fixed_size(model_dir):
    lm = RecurrentLM.from_pretrained(model_dir("mamba2"), collapse_mitigation="window:6")
    a = lm.backend.forward(_ids(3)).state
    b = lm.backend.forward(_ids(50)).state
    assert a.nbytes == b.nbytes == 2 * lm.state_nbytes  # batch of 2


def test_selector_applies_the_mitigation_to_chunk_prefill(model_dir):
    lm = RecurrentLM.from_pretrained(model_dir("mamba2"), collapse_mitigation="forget")
    sel = OPRMSelector(lm, chunk_tokens=32, cache=False, idk_filter=False)
    doc = "The code of alpha is 1234. Mamba models keep a fixed size state. " * 8
    res = sel.select("What is the code of alpha?", doc, return_inputs=True)
    for c in res.chunks[:3]:  # equals a from-scratch forward of the mitigated model
        out = lm.backend.forward(torch.tensor([c.input_ids]))
        ent = -(torch.softmax(out.logits, -1) * torch.log_softmax(out.logits, -1)).sum().item()
        assert abs(ent - c.entropy) < 1e-4


def test_bad_mitigation_settings():
    with pytest.raises(ValueError, match="alpha_scale"):
        CollapseMitigation(alpha_scale=1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        CollapseMitigation(normalize_state=True, window=8)
    with pytest.raises(ValueError, match="window"):
        CollapseMitigation(window=0)


# ---------------------------------------------------------------- the window's memory (issue 16)
def test_a_window_longer_than_any_training_context_is_refused_at_once():
    from oprm_rag.errors import InputError
    from oprm_rag.mitigation import MAX_WINDOW_TOKENS

    with pytest.raises(InputError, match="at most 65,536") as info:
        CollapseMitigation(window=10**6)
    assert "window=1,000,000" in str(info.value)
    with pytest.raises(InputError):
        CollapseMitigation.parse(f"window:{MAX_WINDOW_TOKENS + 1}")
    assert CollapseMitigation(window=MAX_WINDOW_TOKENS).window == MAX_WINDOW_TOKENS


@pytest.mark.parametrize("bad", [8.5, "8", True, -3])
def test_window_must_be_a_whole_number_of_tokens(bad):
    from oprm_rag.errors import InputError

    with pytest.raises(InputError, match="window"):
        CollapseMitigation(window=bad)


def test_window_state_memory_is_counted_and_checked_against_the_limit(model_dir):
    from oprm_rag.errors import InputError

    lm = RecurrentLM.from_pretrained(model_dir("mamba2"))
    cfg = lm.model.config
    per_token = cfg.num_hidden_layers * cfg.num_heads * (cfg.head_dim + cfg.state_size + 1) * 4
    mit = CollapseMitigation(window=60_000, max_state_bytes=2**26)
    assert mit.window_state_bytes(lm.model) == 59_999 * per_token
    # the figure is the real one: a backend's empty window state has exactly that size
    small = CollapseMitigation(window=9)
    assert small.window_state_bytes(lm.model) == \
        Mamba2Backend(lm.model, mitigation=small).empty_state(1).nbytes - _conv_bytes(lm)
    with pytest.raises(InputError, match="max_state_bytes") as info:
        mit.check_for_model(lm.model)
    text = str(info.value)
    assert "91.6 MiB" in text and "64.0 MiB" in text and f"{(2**26) // per_token + 1:,}" in text
    CollapseMitigation(window=4096).check_for_model(lm.model)  # fits: no error
    CollapseMitigation(alpha_scale=0.9).check_for_model(lm.model)  # no window: nothing to check


def _conv_bytes(lm):
    st = Mamba2Backend(lm.model).empty_state(1)
    return sum(t.numel() * t.element_size() for k, t in st.tensors.items() if not k.startswith("ssm."))


def test_loading_a_model_with_a_window_too_big_for_memory_fails_before_allocating(model_dir):
    """Needs Mamba2Backend to call ``mitigation.check_for_model(model)`` (issue 16 wiring)."""
    from oprm_rag.errors import InputError

    with pytest.raises(InputError, match="max_state_bytes"):
        RecurrentLM.from_pretrained(model_dir("mamba2"),
                                    collapse_mitigation=CollapseMitigation(window=60_000, max_state_bytes=2**26))
