"""Decoding: stop strings, streaming deltas, sampling, and the token stream result."""

import pytest
import torch

from oprm_rag.decoding.config import GenerationConfig
from oprm_rag.decoding.text import TextAssembler
from oprm_rag.testing import tiny_tokenizer
from oprm_rag import resolve


def _feed(asm, text):
    tok = asm.tokenizer
    out = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        out.append(asm.add(t))
        if asm.stopped:
            break
    out.append(asm.finish())
    return "".join(out)


def test_deltas_join_to_the_text():
    asm = TextAssembler(tiny_tokenizer())
    assert _feed(asm, "The code of alpha is 1234. Mamba models") == "The code of alpha is 1234. Mamba models"


@pytest.mark.parametrize("stop, expected", [
    (["Mamba"], "The code of alpha is 1234. "),
    (["is 12", "of"], "The code "),
    (["nowhere"], "The code of alpha is 1234. Mamba models"),
])
def test_multi_token_stop_strings_cut_and_never_leak(stop, expected):
    asm = TextAssembler(tiny_tokenizer(), stop)
    assert _feed(asm, "The code of alpha is 1234. Mamba models") == expected
    assert asm.text == expected


def test_partial_stop_prefix_is_held_back_until_resolved():
    tok = tiny_tokenizer()
    asm = TextAssembler(tok, ["Question:"])
    shown = ""
    for t in tok("Answer: yes. Question:", add_special_tokens=False)["input_ids"]:
        shown += asm.add(t)
        assert "Question:"[: max(1, len(shown) - len("Answer: yes. "))] not in shown[len("Answer: yes. "):] or asm.stopped
    shown += asm.finish()
    assert shown == "Answer: yes. "


def test_config_validation():
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=-1)
    with pytest.raises(ValueError):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError):
        GenerationConfig(stop=("",))
    assert GenerationConfig.make(stop="x").stop == ("x",)


def test_sampling_is_reproducible_with_a_seed(load_lm):
    lm = load_lm("mamba")
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a = resolve(lm).complete("The code of", cfg).text()
    b = resolve(lm).complete("The code of", cfg).text()
    c = resolve(lm).complete("The code of", GenerationConfig(max_new_tokens=8, temperature=1.0, seed=12)).text()
    assert a == b
    assert len(resolve(lm).complete("The code of", cfg).result.token_ids) <= 8
    assert isinstance(c, str)


def test_complete_counts_tokens_and_reports_finish(load_lm):
    lm = load_lm("mamba2")
    stream = resolve(lm).complete("The code of alpha is", GenerationConfig(max_new_tokens=5))
    pieces = list(stream)
    r = stream.result
    assert "".join(pieces) == r.text
    assert r.prompt_tokens == len(lm.encode("The code of alpha is", add_special_tokens=True))
    assert r.completion_tokens <= 5 and r.finish_reason in ("length", "eos", "stop")
    assert r.usage["total_tokens"] == r.prompt_tokens + r.completion_tokens


def test_batch_decoding_equals_single(load_lm):
    lm = load_lm("mamba2")
    prompts = ["The code of alpha is", "Mamba models keep", "What"]
    outs = [lm.prefill(lm.encode(p)) for p in prompts]
    from oprm_rag.state import RecurrentState

    state = RecurrentState.cat([o.state for o in outs])
    logits = torch.cat([o.logits for o in outs])
    batch = resolve(lm).generate_batch(state, list(logits), GenerationConfig(max_new_tokens=6))
    for p, o, g in zip(prompts, outs, batch):
        assert resolve(lm).stream(o.state, o.logits, GenerationConfig(max_new_tokens=6)).text() == g.text
