"""Loading, wrapping, sharing, the handoff registry, chunk_tokens='auto', and GPU paths."""

import logging

import pytest
import torch

from oprm_rag import OPRMSelector, RecurrentLM
from oprm_rag.engine.resolve import forget_models, load_model
from oprm_rag import resolve


def test_from_pretrained_passes_options_and_keeps_remote_code_off(model_dir, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    lm = RecurrentLM.from_pretrained(model_dir("mamba"), device="cpu", dtype="bfloat16", revision=None)
    assert seen["trust_remote_code"] is False and seen["dtype"] is torch.bfloat16
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    RecurrentLM.from_pretrained(model_dir("mamba"), torch_dtype=torch.float32, trust_remote_code=True)
    assert seen["trust_remote_code"] is True and seen["dtype"] is torch.float32


def test_wrapping_objects_you_hold(load_lm):
    held = load_lm("mamba2")
    lm = RecurrentLM(held.model, held.tokenizer, name="mine")
    assert lm.name == "mine" and lm.family == "mamba2" and lm.model is held.model


def test_bad_dtype_is_explained(model_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        RecurrentLM.from_pretrained(model_dir("mamba"), dtype="float13")


def test_the_registry_loads_once_and_shares(model_dir):
    forget_models()
    a = load_model(model_dir("mamba"))
    b = load_model(str(model_dir("mamba")))
    assert a is b
    sel = OPRMSelector(str(model_dir("mamba")), chunk_tokens=32)
    assert sel.lm is a and sel.cache is resolve(a).document_cache()
    forget_models()


def test_replay_fallback_is_announced_once(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        RecurrentLM.from_pretrained(model_dir("mistral_swa"))  # sliding-window attention: replay
    assert "cannot be continued exactly" in caplog.text and "full prefill" in caplog.text


def test_chunk_tokens_auto_uses_the_training_length_and_logs_why(model_dir, tmp_path, caplog):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model_dir("mamba2"), folder)
    (folder / "training_log.json").write_text(json.dumps({"train_context_tokens": 300}))
    lm = RecurrentLM.from_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="oprm_rag"):
        sel = OPRMSelector(lm, chunk_tokens="auto")
    assert sel.chunk_tokens == 300 - 37  # training length minus room for P and Q (1/8, at most 64)
    assert "300-token training length" in caplog.text
    assert OPRMSelector(lm, chunk_tokens=128).chunk_tokens == 128  # an explicit value always wins


def test_forget_threshold_law_sets_big_mamba2_states():
    from oprm_rag.capacity import forget_threshold_tokens

    # Stuffed Mamba: T_forget ~ 5.172 N_S - 4.469 (K tokens), N_S in millions of floats.
    assert forget_threshold_tokens(2.0) == round((5.172 * 2.0 - 4.469) * 1000)
    assert forget_threshold_tokens(0.1) is None  # outside the law's range


def test_auto_without_any_length_falls_back_to_2k(load_lm):
    from oprm_rag.capacity import auto_chunk_tokens

    got = auto_chunk_tokens(load_lm("mamba"))  # a Mamba-1 config records no training length
    assert got.chunk_tokens == 2000 and "2K default" in got.reason
    rwkv = auto_chunk_tokens(load_lm("rwkv"))  # RWKV's config does (context_length)
    assert rwkv.train_tokens == 4096 and rwkv.chunk_tokens == 4096 - 64


def test_handoff_resumes_and_equals_the_plain_path(load_lm):
    lm = load_lm("mamba2")
    sel = OPRMSelector(lm, chunk_tokens=32, idk_filter=False)
    doc = "The code of alpha is 1234. Mamba models keep a fixed size state. " * 6
    q = "What is the code of alpha?"
    entries = len(resolve(lm).handoff)
    sel.select(q, doc)
    assert len(resolve(lm).handoff) == entries  # no handoff unless asked: select() writes no registry entry
    res = sel.select(q, doc, handoff=True)
    text = sel.prompt_text(q, res.best.text)
    hits = resolve(lm).handoff.hits
    before = lm.counters["prefill_tokens"]
    resumed = resolve(lm).complete(text, add_special_tokens=not lm.prompt.use_chat_template)
    out = resumed.text()
    assert resumed.handoff_hit and resolve(lm).handoff.hits == hits + 1
    assert lm.counters["prefill_tokens"] == before  # nothing prefilled again
    resolve(lm).handoff.clear()
    fresh = resolve(lm).complete(text, add_special_tokens=not lm.prompt.use_chat_template)
    assert fresh.text() == out and not fresh.handoff_hit


def test_cuda_kernels_forced_without_cuda_fail_loudly(load_lm):
    from oprm_rag.backends.mamba import MambaBackend

    backend = MambaBackend(load_lm("mamba").model, kernels="cuda")
    with pytest.raises(RuntimeError, match="CUDA device"):
        backend.forward(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="kernels must be one of"):
        MambaBackend(load_lm("mamba").model, kernels="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the [cuda] extra (mamba-ssm)")
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_cuda_kernels_match_the_torch_scan(model_dir, family):  # pragma: no cover - no GPU in CI
    pytest.importorskip("mamba_ssm", reason="install the CUDA extra: pip install 'oprm-rag[cuda]'")
    fast = RecurrentLM.from_pretrained(model_dir(family), device="cuda", kernels="cuda")
    slow = RecurrentLM.from_pretrained(model_dir(family), device="cuda", kernels="torch")
    ids = torch.randint(2, 300, (2, 40), device="cuda")
    state = fast.backend.forward(ids[:, :15]).state
    a = fast.backend.forward(ids[:, 15:], state, all_logits=True).logits
    b = slow.backend.forward(ids[:, 15:], state, all_logits=True).logits
    assert (a - b).abs().max().item() < 1e-3
