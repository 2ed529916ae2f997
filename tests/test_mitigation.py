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
    CollapseMitigation(window=10**5),
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
