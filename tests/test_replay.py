"""The replay fallback decodes any causal LM: whatever its cache is called, or with none.

The models here are minimal ``PreTrainedModel`` subclasses shaped like the remote-code
RWKV-5/6 checkpoints (the cache comes back as ``state`` and goes in as ``state``), like
models with no cache at all, like models whose cache is wrong, and like models that
return plain tuples. Each session's logits must equal a plain forward of the whole
prefix, and the answer of the full pipeline must be the same whatever the model's cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from oprm_rag import OPRMSelector, RecurrentLM
from oprm_rag.backends.replay import ReplayBackend
from oprm_rag.testing import FALLBACK_FAMILIES, tiny_tokenizer


class DecayConfig(PretrainedConfig):
    model_type = "oprm_test_decay"

    def __init__(self, vocab_size: int = 320, hidden_size: int = 24, style: str = "state", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.style = style
        super().__init__(**kwargs)


@dataclass
class DecayOutput(ModelOutput):
    """Like remote-code RWKV-6's ``Rwkv6CausalLMOutput``: logits and ``state``, no past_key_values."""

    logits: torch.FloatTensor = None
    state: Optional[torch.FloatTensor] = None


class DecayLM(PreTrainedModel):
    """A one-layer linear recurrence h_t = 0.8 h_{t-1} + W x_t with an LM head.

    ``style``: "state" returns its exact state as ``state`` (RWKV-5/6 remote code);
    "none" returns only logits; "broken" returns a state but ignores the one it is given;
    "tuple" returns a plain tuple (return_dict=False style).
    """

    config_class = DecayConfig
    calls: list[int]

    def __init__(self, config: DecayConfig):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.calls = []
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids: torch.LongTensor, state: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, attention_mask=None):
        self.calls.append(int(input_ids.shape[1]))
        x = self.mix(self.emb(input_ids))
        if state is None or self.config.style == "broken":
            h = x.new_zeros(x.shape[0], x.shape[2])
        else:
            h = state
        outs = []
        for t in range(x.shape[1]):
            h = 0.8 * h + x[:, t]
            outs.append(h)
        logits = self.head(torch.tanh(torch.stack(outs, 1))) * 8.0
        if self.config.style == "tuple":
            return (logits,)
        if self.config.style == "none":
            return DecayOutput(logits=logits)
        return DecayOutput(logits=logits, state=h if use_cache else None)


def _lm(style: str) -> RecurrentLM:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = DecayLM(DecayConfig(vocab_size=len(tok), style=style, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id))
    return RecurrentLM(model, tok, name=f"decay-{style}")


STYLES = ["state", "none", "broken", "tuple"]


@pytest.mark.parametrize("style", STYLES)
def test_decoding_equals_a_plain_forward_of_the_prefix_every_step(style):
    lm = _lm(style)
    assert isinstance(lm.backend, ReplayBackend)
    prefix = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    session = lm.backend.session(lm.backend.forward(prefix).state)
    fed = prefix
    nxt = torch.tensor([[11]])
    for _ in range(6):
        got = session.step(nxt)
        fed = torch.cat([fed, nxt], 1)
        with torch.no_grad():
            out = lm.model(fed, use_cache=False)
        want = (out[0] if isinstance(out, tuple) else out.logits)[:, -1]
        assert torch.allclose(got, want, atol=1e-5), style
        nxt = got.argmax(-1, keepdim=True)
    assert session.mode == ("cache" if style == "state" else "recompute")


def test_a_state_cache_is_fed_back_under_its_own_name():
    lm = _lm("state")
    session = lm.backend.session(lm.backend.forward(torch.tensor([[5, 6, 7, 8]])).state)
    lm.model.calls.clear()
    for tok in (9, 10, 11, 12):
        session.step(torch.tensor([[tok]]))
    # prefix + first token once (5), one check of the first continuation (6), then one token a step
    assert lm.model.calls == [5, 1, 6, 1, 1]
    assert session._cache_name == "state"


def test_a_cache_that_does_not_continue_exactly_is_dropped_with_a_warning(caplog):
    lm = _lm("broken")
    session = lm.backend.session(lm.backend.forward(torch.tensor([[5, 6, 7, 8]])).state)
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        for tok in (9, 10, 11):
            session.step(torch.tensor([[tok]]))
    assert session.mode == "recompute" and "does not match" in caplog.text


@pytest.mark.parametrize("style", STYLES)
def test_answer_works_and_is_the_same_whatever_the_cache(style):
    doc = "The code of alpha is 1234. Mamba models keep a fixed size state. " * 4
    sel = OPRMSelector(_lm(style), chunk_tokens=32, cache=False, idk_filter=False)
    want = OPRMSelector(_lm("none"), chunk_tokens=32, cache=False, idk_filter=False)
    got = sel.answer("What is the code of alpha?", doc, max_new_tokens=6)
    ref = want.answer("What is the code of alpha?", doc, max_new_tokens=6)
    assert got.text == ref.text and got.text != ""
    assert [c.entropy for c in got.chunks] == pytest.approx([c.entropy for c in ref.chunks], abs=1e-5)


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_transformers_caches_continue_under_their_current_name(load_lm, family):
    import warnings

    lm = load_lm(family)
    prefix = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    session = lm.backend.session(lm.backend.forward(prefix).state)
    fed, nxt = prefix, torch.tensor([[11]])
    for _ in range(4):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = session.step(nxt)
        assert not [w for w in seen if "deprecated" in str(w.message)]  # no deprecated alias used
        fed = torch.cat([fed, nxt], 1)
        with torch.no_grad():
            want = lm.model(input_ids=fed, use_cache=False).logits[:, -1]
        assert torch.allclose(got, want, atol=1e-4)
        nxt = got.argmax(-1, keepdim=True)
    fields = type(lm.model(input_ids=prefix, use_cache=True)).__dataclass_fields__
    assert session.mode == "cache" and session._cache_name in fields  # a real output field, not an alias
