"""The served engine against a real vLLM (PyPI's CPU build) serving the shipped model folder.

One server per module (``vllm_server``, ~1-2 minutes to start on 2 cores), reached the way a
user of a deployment reaches it: with only ``base_url`` and ``model`` (``bare``), and with the
model folder as ``tokenizer=`` (``with_folder``). Each test names the defect of issue #22 it
guards; the unit tests at the top need no server.

Agreement with the in-process engine on more held-out questions:
``OPRM_VLLM_QUESTIONS=60 .venv/bin/python -m pytest -q -s tests/served/test_vllm.py -k agreement``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import pytest

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.decoding.config import GenerationConfig
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.errors import OptionError
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.engine import PromptRows
from oprm_rag.served.errors import (
    ContextOverflowError,
    ModelNotFoundError,
    ServerResponseError,
    ServerUnavailableError,
)
from oprm_rag.served.client import Scored, ServerInfo
from oprm_rag.served.entropy import TopLogprobs
from oprm_rag.served.published import check_folder, folder_format, parse_published
from oprm_rag.served.tokens import TokenSource, _offsets_from_pieces, _pieces_from_token_strs

CHUNK = 128
NON_ASCII = ("Die Größe der Brücke über die Flüsse war überraschend. Le café naïf coûte trois écus. "
             "日本語の文章もここにあります。 Ελληνικά γράμματα. Ein Gruß 🙂 zum Schluss — “fin”. ")


# ---------------------------------------------------------------------- no server needed
def test_the_shipped_chat_template_publishes_the_folders_prompt(demo_lm) -> None:
    """#22 defect 7: the folder's chat template carries its oprm_prompt.json and training length
    (what a server serves of a folder), and renders chats exactly as before otherwise."""
    assert check_folder(oprm_rag.DEMO_MODEL) is None
    tok = demo_lm.tokenizer
    published = parse_published(tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                                        add_generation_prompt=True, oprm_prompt=True))
    assert published == folder_format(oprm_rag.DEMO_MODEL)
    assert published.prompt == demo_lm.prompt and published.train_context_tokens == 512
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "System: S\nUser: a\nb\nAssistant:"
    assert parse_published(tok.apply_chat_template(chat, tokenize=False)) is None


def test_token_strings_give_exact_character_spans(demo_lm) -> None:
    """#22 defect 2: vLLM's byte-level token strings ("\\u0120w", one byte of a multi-byte
    character each) turned back into bytes give the local tokenizer's exact offsets."""
    text = NON_ASCII * 2
    ids, want = demo_lm.encode_with_offsets(text)
    strs = demo_lm.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    pieces = _pieces_from_token_strs(text, strs)
    assert pieces is not None and b"".join(pieces) == text.encode("utf-8")
    assert _offsets_from_pieces(text, pieces).tolist() == want.tolist()
    assert _pieces_from_token_strs(text, ["\u2581Die"]) is None  # spells something else: not used
    assert _pieces_from_token_strs("a b", ["\u2581a", "\u2581b"]) == [b"a", b" b"]  # SentencePiece spelling


class _ServerLikeTokens(TokenSource):
    """The model's ids with no vocabulary size, as the server's /tokenize gives them."""

    counting = "server"

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 50 for c in text]

    def encode_with_offsets(self, text: str):  # pragma: no cover - not used here
        raise NotImplementedError

    def decode(self, ids) -> str:
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _offline_engine(monkeypatch, refusal: str) -> tuple[OpenAICompatibleLM, list[int]]:
    """An engine whose client answers like vLLM with --max-logprobs below the vocabulary."""
    lm = OpenAICompatibleLM("http://127.0.0.1:9/v1", "m", tokenizer=_ServerLikeTokens())
    asked: list[int] = []
    monkeypatch.setattr(lm.client, "info", lambda refresh=False: ServerInfo("vllm", ("m",)))

    def score(prompt, k):
        asked.append(k)
        if k == -1:
            err = ServerResponseError(f"the server answered a scoring request with HTTP 400: {refusal}")
            err.status_code = 400
            raise err
        return Scored(TopLogprobs([5, 6], ["", ""], [-0.1, -2.5]))

    monkeypatch.setattr(lm.client, "score", score)
    monkeypatch.setattr(lm.client, "score_many", lambda prompts, k: [score(p, k) for p in prompts])
    return lm, asked


def test_the_vocabulary_is_learnt_from_the_refusal_that_states_the_cap(monkeypatch) -> None:
    """#22 defect 3: below the vocabulary, vLLM refuses logprobs=-1 with both numbers; the
    engine learns the vocabulary (bounds need it) and the cap (no second refusal)."""
    lm, asked = _offline_engine(monkeypatch, "Requested sample logprobs of 3072, which is greater than max "
                                             "allowed: 20 (parameter=logprobs, value=3072)")
    ext = lm.extend(lm.start([1, 2]).states, [[3], [4]])
    assert lm.vocab_size == 3072 and lm.client.max_top_logprobs == 20
    assert asked == [-1, 20, 20]  # asked once for all of it, then at the cap
    ft = lm.first_tokens(ext, frozenset())
    assert not ft.exact and ft.entropy_bounds is not None  # 2 of 3,072 came back: bounds, over 3,070 others


def test_an_unrelated_refusal_teaches_nothing(monkeypatch) -> None:
    lm, asked = _offline_engine(monkeypatch, "logprobs must be a non-negative integer")
    lm.extend(lm.start([1, 2]).states, [[3]])
    assert lm.vocab_size is None and asked[0] == -1 and asked[1:] == [8192]


def test_vllm_server_refuses_non_loopback_hosts_and_says_how_to_install(monkeypatch) -> None:
    from oprm_rag.served import vllm as vllm_mod

    with pytest.raises(OptionError, match="loopback"):
        vllm_mod.VLLMServer(oprm_rag.DEMO_MODEL, host="0.0.0.0")
    monkeypatch.setattr(vllm_mod, "find_vllm_python", lambda: None)
    with pytest.raises(ServerUnavailableError, match="make vllm"):
        vllm_mod.VLLMServer(oprm_rag.DEMO_MODEL)


# ---------------------------------------------------------------------- a real vLLM
@pytest.fixture(scope="module")
def bare(vllm_server) -> OpenAICompatibleLM:
    """What a user of the deployment has: a URL and a model name."""
    lm = OpenAICompatibleLM(vllm_server.base_url, "oprm-demo", max_concurrency=4)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def with_folder(vllm_server) -> OpenAICompatibleLM:
    lm = OpenAICompatibleLM(vllm_server.base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL, max_concurrency=4)
    yield lm
    lm.close()


def _cases(n: int, seed: int = 12) -> list[tuple[str, str, str]]:
    """(question, document, answer) on held-out prose, 8 facts per ~2,000-character document."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        doc = build_document(rng, heldout_prose(), 8, 2000)
        for fact in rng.sample(doc.facts, 2):
            cases.append((question_for(fact.key), doc.text, fact.value))
    return cases[:n]


def test_what_vllm_says_about_itself(bare) -> None:
    """The premise of defects 1, 3 and 7: vLLM lists the context, not the vocabulary, the
    training length or the prompt."""
    info = bare.client.info()
    assert info.kind == "vllm" and info.models == ("oprm-demo",)
    assert info.slot_context == 2048 and info.n_vocab is None and info.n_ctx_train is None


def test_auto_chunk_is_the_in_process_size(demo_lm, bare, with_folder) -> None:
    """#22 defect 1: "auto" picked vLLM's 2,000-token default instead of the model's 448."""
    want = OPRMSelector(demo_lm).chunk_tokens
    assert want == 448
    assert OPRMSelector(with_folder).chunk_tokens == want
    assert "tokenizer= folder" in with_folder.auto_chunk().reason
    assert OPRMSelector(bare).chunk_tokens == want  # without the folder: the template on the server says 512
    assert "chat template on the server" in bare.auto_chunk().reason


def test_the_prompt_comes_from_the_server(demo_lm, bare) -> None:
    """#22 defect 7: without tokenizer= the engine built another prompt (2,718 tokens where
    the in-process engine runs 2,544); now the server's chat template publishes it."""
    assert bare.prompt == demo_lm.prompt
    local, remote = OPRMSelector(demo_lm, chunk_tokens=CHUNK), OPRMSelector(bare, chunk_tokens=CHUNK)
    assert remote._prefix_ids() == local._prefix_ids()
    assert remote._question_ids("What is the code of Tal?") == local._question_ids("What is the code of Tal?")


def test_exact_entropies_without_a_tokenizer(demo_lm, vllm_server) -> None:
    """#22 defect 3: with no tokenizer= the vocabulary was unknown, the first request was
    refused and entropies were never exact; now the whole distribution comes back and says so."""
    lm = OpenAICompatibleLM(vllm_server.base_url, "oprm-demo")
    assert lm.vocab_size is None  # nothing the server lists says it
    question, doc, _ = _cases(1, seed=3)[0]
    a = OPRMSelector(demo_lm, chunk_tokens=CHUNK, cache=False).select(question, doc)
    b = OPRMSelector(lm, chunk_tokens=CHUNK).select(question, doc)
    assert lm.vocab_size == 3072 and b.usage.entropy_exact and b.usage.token_counting == "server"
    for x, y in zip(a.chunks, b.chunks, strict=True):
        assert y.entropy_bounds is None and y.entropy == pytest.approx(x.entropy, abs=1e-4)
        assert (x.top_token_id, x.is_idk) == (y.top_token_id, y.is_idk)
    lm.close()


@pytest.mark.parametrize("which", ["bare", "with_folder"])
def test_agreement_with_the_in_process_engine(request, demo_lm, which) -> None:
    """#22 defect 7: held-out recall questions choose the same chunk (>= 95%) and give the
    same answer (>= 90%) as in process, with and without tokenizer= (0/18 answers agreed
    without it before)."""
    lm = request.getfixturevalue(which)
    n = int(os.environ.get("OPRM_VLLM_QUESTIONS", "10"))
    local = OPRMSelector(demo_lm, chunk_tokens=CHUNK, cache=False)
    remote = OPRMSelector(lm, chunk_tokens=CHUNK)
    same_chunk = same_answer = right = 0
    for question, doc, value in _cases(n):
        a = local.answer(question, doc, max_new_tokens=6)
        b = remote.answer(question, doc, max_new_tokens=6)
        assert b.usage.entropy_exact
        assert b.usage.token_counting == ("server" if which == "bare" else "exact")
        key = lambda ans: None if ans.chunk is None else (ans.chunk.doc_index, ans.chunk.token_start)  # noqa: E731
        same_chunk += key(a) == key(b)
        same_answer += a.text == b.text
        right += b.text.strip() == value
    print(f"\nvLLM {which}: same chunk {same_chunk}/{n}, same answer {same_answer}/{n}, right {right}/{n}")
    assert same_chunk >= 0.95 * n and same_answer >= 0.90 * n


def test_exact_spans_on_a_non_ascii_document_without_a_tokenizer(demo_lm, bare) -> None:
    """#22 defect 2: /detokenize of one byte of a multi-byte character is U+FFFD, so spans
    were spread evenly; vLLM's token strings give them exactly."""
    rng = random.Random(4)
    doc = build_document(rng, heldout_prose(), 4, 1200)
    text = NON_ASCII + doc.text[:600] + NON_ASCII + doc.text[600:] + NON_ASCII
    ids, offsets = bare.encode_with_offsets(text)
    want_ids, want_offsets = demo_lm.encode_with_offsets(text)
    assert ids.tolist() == want_ids.tolist() and offsets.tolist() == want_offsets.tolist()
    question = question_for(doc.facts[0].key)
    a = OPRMSelector(demo_lm, chunk_tokens=48, cache=False).select(question, text)
    b = OPRMSelector(bare, chunk_tokens=48).select(question, text)
    assert [(c.char_start, c.char_end) for c in b.chunks] == [(c.char_start, c.char_end) for c in a.chunks]
    assert any(any(ord(ch) > 127 for ch in c.text) for c in b.chunks)
    assert (b.best.char_start, b.best.char_end) == (a.best.char_start, a.best.char_end)


def test_a_prompt_of_exactly_the_context(demo_lm, bare, caplog) -> None:
    """#22 defect 4: a prompt of exactly the server's 2,048 tokens is a ContextOverflowError
    (vLLM says "max_tokens must be at least 1"), from the engine before sending and from the
    server's own refusal; an answer that vLLM would cut silently is reported."""
    ids = (demo_lm.encode(NON_ASCII + " ".join(heldout_prose()[:200])) * 2)[:2048]
    assert len(ids) == 2048
    with pytest.raises(ContextOverflowError, match="2048 tokens per sequence"):
        bare.extend(bare.start(ids[:8]).states, [ids[8:]])
    with pytest.raises(ContextOverflowError, match="max_tokens must be at least 1"):
        bare.client.score(ids, 5)  # the server's refusal, read as what it is
    assert bare.extend(bare.start(ids[:8]).states, [ids[8:2047]]).logits is not None  # one token of room: fits
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        stream = bare.stream(PromptRows([ids[:2040]]), None, cfg)
        text = "".join(stream)
    assert "at most 8 of the 20 tokens" in caplog.text
    assert stream.result.finish_reason == "context" and stream.result.completion_tokens == 8
    assert stream.result.context_room == 8 and text == stream.result.text
    (gen,) = bare.generate_batch(PromptRows([ids[:2040]]), [None], cfg)
    assert gen.finish_reason == "context" and gen.completion_tokens == 8


def test_streaming_and_summaries_equal_in_process(demo_lm, bare) -> None:
    question, doc, _ = _cases(1, seed=8)[0]
    local = OPRMSelector(demo_lm, chunk_tokens=CHUNK, cache=False)
    remote = OPRMSelector(bare, chunk_tokens=CHUNK)
    want = local.answer(question, doc, max_new_tokens=8)
    stream = remote.stream(question, doc, max_new_tokens=8)
    pieces = list(stream)
    assert len(pieces) >= 1 and "".join(pieces) == want.text
    assert stream.answer.text == want.text and stream.answer.chunk.token_start == want.chunk.token_start
    a = local.summarize(doc, max_new_tokens=10)
    b = remote.summarize(doc, max_new_tokens=10)
    assert b.text == a.text and len(b.chunks) == len(a.chunks) >= 4


def test_a_model_the_server_does_not_serve(vllm_server) -> None:
    lm = OpenAICompatibleLM(vllm_server.base_url, "no-such-model")
    with pytest.raises(ModelNotFoundError, match="oprm-demo"):
        OPRMSelector(lm, chunk_tokens=CHUNK).select("What is the code of Tal?", "Tal has code 1234.")


def _engine_pids(pid: int) -> list[int]:
    """The vLLM engine processes under the server ``pid`` (its own children, from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"EngineCore" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_the_engine_dying_is_reported_as_a_dead_server(vllm_server, bare) -> None:
    """#22 defect 6 (last in this module: it kills the server's engine): the user saw
    "connection refused", as if the server had never run."""
    question, doc, _ = _cases(1, seed=9)[0]
    sel = OPRMSelector(bare, chunk_tokens=CHUNK)
    sel.select(question, doc)
    pids = _engine_pids(vllm_server.process.pid)
    assert pids, "vLLM's engine process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(ServerUnavailableError, match="died"):
        sel.select(question, doc)
