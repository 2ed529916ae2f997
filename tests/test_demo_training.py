"""The demo model's training recipe (``training/``): its data are what they claim to be.

* a question about an absent key (a hard negative) never has its fact in the document,
  and a question about a present key always has it, whole, in the visible window;
* the training prose never holds a sentence of the held-out or unseen files;
* the fast training forward is the same function as transformers' reference path;
* a run stopped and resumed ends with the same weights as one that was not stopped.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import prose_sources  # noqa: E402
import train_demo_model as T  # noqa: E402

from oprm_rag.demo.recall_task import HELDOUT_SOURCES, IDK_WORD, UNSEEN_SOURCES, heldout_prose, unseen_prose  # noqa: E402

_QA = re.compile(r"\n\nQuestion: What is the code of ([a-z]+)\? (\S+?)<\|endoftext\|>")


@pytest.fixture(scope="module")
def small_corpus():
    rng = random.Random(0)
    stdlib = list(prose_sources.stdlib())
    return {name: (rng.sample(stdlib, 400) if name != "generated" else prose_sources.generated_prose(400))
            for name in T.SOURCE_WEIGHTS}


@pytest.fixture(scope="module")
def tokenizer(small_corpus, tmp_path_factory):
    sentences = [s for v in small_corpus.values() for s in v]
    return T.build_tokenizer(700, sentences, tmp_path_factory.mktemp("tok"))


def test_tokenizer_keeps_the_first_answer_token_informative(tokenizer):
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(" Error")]
    assert pieces == [" Error"]
    for code in ("4362", "1000", "9999"):
        assert [tokenizer.decode([t]) for t in tokenizer.encode(" " + code)] == [" " + code[0], *code[1:]]


@pytest.mark.parametrize("progress", [0.0, 0.2, 0.6, 1.0])
def test_training_questions_are_true_to_the_document(tokenizer, small_corpus, progress):
    batcher = T.Batcher(tokenizer, small_corpus, 512, random.Random(int(progress * 10)))
    batcher.progress = progress
    prefix = T.instruction_text()
    checked = {"present": 0, "absent": 0}
    for _ in range(60):
        ids, weights = batcher.example()
        assert len(ids) == len(weights) <= 512
        text = tokenizer.decode(ids)
        assert text.startswith(prefix)
        first = text.find("\n\nQuestion: ")
        doc, questions = text[len(prefix):first], text[first:]
        pairs = _QA.findall(questions)
        assert pairs and "".join(f"\n\nQuestion: What is the code of {k}? {a}<|endoftext|>" for k, a in pairs) \
            == questions
        assert len({k for k, _ in pairs}) == len(pairs)  # never the same key twice
        for key, answer in pairs:
            if answer == IDK_WORD:
                assert f"The code of {key} is" not in doc, (key, doc)
                checked["absent"] += 1
            else:
                assert re.fullmatch(r"\d{4}", answer)
                assert f"The code of {key} is {answer}." in doc, (key, answer, doc)
                checked["present"] += 1
    assert checked["present"] > 20 and checked["absent"] > 20
    if progress > 0:
        assert batcher.counts["near"] > 0 and batcher.counts["outside"] + batcher.counts["word"] > 0


def test_near_misses_share_letters_with_a_present_key(tokenizer, small_corpus):
    """The hard negatives are hard: most absent keys asked are a letter or two from a key in the window."""
    batcher = T.Batcher(tokenizer, small_corpus, 512, random.Random(1), absent_share=1.0, near_share=1.0)
    batcher.progress = 0.8
    close = total = 0
    for _ in range(40):
        text = tokenizer.decode(batcher.example()[0])
        first = text.find("\n\nQuestion: ")
        present = re.findall(r"The code of ([a-z]+) is \d{4}\.", text[:first])
        for key, answer in _QA.findall(text[first:]):
            assert answer == IDK_WORD
            total += 1
            close += any(key[:2] == k[:2] or key[-2:] == k[-2:] or sorted(key) == sorted(k) for k in present)
    assert total > 50 and close / total > 0.7


def test_eval_chunks_hold_the_key_exactly_when_they_should(tokenizer):
    items = T.make_eval_set(tokenizer, 200, 6, seed=3)
    assert {it["source"] for it in items} == set(HELDOUT_SOURCES)
    idk = tokenizer.encode(" " + IDK_WORD)
    for it in items:
        text = tokenizer.decode(it["ids"])
        key = re.search(r"What is the code of ([a-z]+)\?$", text).group(1)
        chunk = text[len(T.instruction_text()):text.rfind("\n\nQuestion: ")]
        if it["kind"] == "present":
            value = tokenizer.decode(it["answer"]).strip()
            assert f"The code of {key} is {value}." in chunk
        else:
            assert it["answer"] == idk and f"The code of {key} is" not in chunk


def test_training_corpus_drops_every_heldout_and_unseen_sentence(tmp_path, monkeypatch):
    leaked = [heldout_prose(s)[3] for s in HELDOUT_SOURCES] + [unseen_prose(s)[5] for s in UNSEEN_SOURCES]
    own = ["A sentence only the training prose has.", "Another training sentence of its own."]
    # the same sentences with other spacing and case are the same sentences
    fake = {name: own + [s.upper() for s in leaked] + [s.replace(" ", "  ") for s in leaked]
            for name in T.SOURCE_WEIGHTS}
    monkeypatch.setattr(prose_sources, "extract", lambda name: list(fake[name]))
    corpus = T.build_corpus(tmp_path / "corpus.json")
    assert all(v == own for v in corpus.values())
    assert json.loads((tmp_path / "corpus.json").read_text()) == corpus  # a resumed run reads the same


def test_generated_prose_is_seeded_prose():
    a = prose_sources.generated_prose(300, seed=1)
    assert a == prose_sources.generated_prose(300, seed=1) != prose_sources.generated_prose(300, seed=2)
    assert len(set(a)) == 300
    from oprm_rag.demo.recall_task import _is_prose

    assert all(_is_prose(s) for s in a)


def test_fast_training_forward_is_the_reference_function():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from fast_mamba2 import check_equivalence, patch_model, unpatch_model

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=16, head_dim=8, expand=2,
                       num_heads=8, n_groups=1, conv_kernel=4, chunk_size=16, tie_word_embeddings=True)
    model = Mamba2ForCausalLM(cfg)
    assert check_equivalence(model, 97, length=53) < 2e-4  # not a multiple of the chunk size
    ids = torch.randint(0, 97, (2, 40))
    grads = []
    for fast in (False, True):
        (patch_model if fast else unpatch_model)(model)
        model.train()
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    unpatch_model(model)
    for ref, fast in zip(*grads):
        assert torch.allclose(ref, fast, atol=1e-5, rtol=1e-4)


def test_fast_scan_matches_the_recurrence_and_is_the_path_taken(monkeypatch):
    import fast_mamba2
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(1)
    b, t, h, p, n = 2, 37, 3, 4, 5
    x, B, C = torch.randn(b, t, h, p), torch.randn(b, t, n), torch.randn(b, t, n)
    dt, A = torch.rand(b, t, h) * 0.5, -torch.rand(h) - 0.1
    y = fast_mamba2.ssd_one_group(x, dt, A, B, C, chunk=8)
    state = torch.zeros(b, h, p, n)
    for i in range(t):  # h_t = exp(dt A) h_{t-1} + dt x_t B_t^T;  y_t = h_t C_t
        state = torch.exp(dt[:, i] * A)[..., None, None] * state \
            + (dt[:, i, :, None] * x[:, i])[..., None] * B[:, i, None, None, :]
        assert torch.allclose(y[:, i], torch.einsum("bhpn,bn->bhp", state, C[:, i]), atol=1e-4)

    cfg = Mamba2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=8, head_dim=8, expand=2,
                       num_heads=4, n_groups=1, conv_kernel=4, chunk_size=8)
    model = fast_mamba2.patch_model(Mamba2ForCausalLM(cfg))
    monkeypatch.setattr(fast_mamba2, "ssd_one_group", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fast")))
    with pytest.raises(RuntimeError, match="fast"):
        model(torch.zeros(1, 9, dtype=torch.long), use_cache=False)


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, small_corpus):
    common = ["--steps", "6", "--batch", "2", "--seq-len", "128", "--vocab", "700", "--hidden", "32",
              "--layers", "1", "--state", "16", "--head-dim", "16", "--eval-every", "3", "--eval-size", "1",
              "--threads", "1", "--easy-steps", "2"]
    outs = {}
    for name, sessions in (("straight", [[]]), ("resumed", [["--stop-after", "4"], ["--resume"]])):
        run = tmp_path / name
        run.mkdir()
        (run / "corpus.json").write_text(json.dumps(small_corpus))
        for extra in sessions:
            T.main(common + ["--run-dir", str(run), "--out", str(run / "model")] + extra)
        outs[name] = run / "model"
    from safetensors.torch import load_file

    a, b = (load_file(outs[n] / "model.safetensors") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((outs["resumed"] / "training_log.json").read_text())
    assert [row["step"] for row in log["eval"]] == [3, 6]
    prompt = json.loads((outs["resumed"] / "oprm_prompt.json").read_text())
    assert "{idk}" in prompt["instruction"] and prompt["idk_word"] == IDK_WORD


def test_fine_tuning_keeps_the_models_tokenizer_and_shape_and_moves_its_weights(tmp_path, small_corpus):
    """``--init-from``: the shipped model's recipe is a fine-tune of the previous weights."""
    base_run, ft_run = tmp_path / "base", tmp_path / "ft"
    for run in (base_run, ft_run):
        run.mkdir()
        (run / "corpus.json").write_text(json.dumps(small_corpus))
    tiny = ["--batch", "2", "--seq-len", "128", "--vocab", "700", "--hidden", "32", "--layers", "1",
            "--state", "16", "--head-dim", "16", "--eval-size", "1", "--threads", "1"]
    T.main(tiny + ["--steps", "2", "--easy-steps", "1", "--run-dir", str(base_run), "--out", str(base_run / "model")])
    T.main(tiny + ["--steps", "3", "--easy-steps", "0", "--hard-from", "0", "--progress-from", "1.0",
                   "--eval-every", "3", "--hidden", "64",  # ignored: the architecture is the base model's
                   "--init-from", str(base_run / "model"), "--run-dir", str(ft_run), "--out", str(ft_run / "model")])
    from safetensors.torch import load_file

    base, tuned = (load_file(r / "model" / "model.safetensors") for r in (base_run, ft_run))
    assert base.keys() == tuned.keys() and all(base[k].shape == tuned[k].shape for k in base)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert (base_run / "model" / "tokenizer.json").read_bytes() == (ft_run / "model" / "tokenizer.json").read_bytes()
    log = json.loads((ft_run / "model" / "training_log.json").read_text())
    assert [row["step"] for row in log["eval"]] == [0, 3]  # where it started, where it ended
    assert "fine-tune" in log["recipe"]
    assert log["architecture"]["hidden_size"] == 32 and "hidden" not in log["args"]  # the base's, not the flag's
    # it starts from the base's weights: with a zero learning rate nothing moves
    still = tmp_path / "still"
    still.mkdir()
    (still / "corpus.json").write_text(json.dumps(small_corpus))
    T.main(tiny + ["--steps", "2", "--easy-steps", "0", "--lr", "0", "--eval-every", "2",
                   "--init-from", str(base_run / "model"), "--run-dir", str(still), "--out", str(still / "model")])
    same = load_file(still / "model" / "model.safetensors")
    assert all(torch.equal(base[k], same[k]) for k in base)
    # a run folder holding another tokenizer is refused, not silently used
    with pytest.raises(SystemExit, match="another --run-dir"):
        T.main(tiny + ["--steps", "1", "--init-from", str(base_run / "model"), "--run-dir", str(other_tok_run(tmp_path)),
                       "--out", str(tmp_path / "x")])


def other_tok_run(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    run = tmp_path / "other"
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2, "<|pad|>": 3}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(
        run / "tokenizer")
    return run


def test_no_heldout_or_unseen_sentence_was_in_version_1s_training():
    """Version 2 is fine-tuned from version 1, which trained on the standard library's
    docstrings: none of those may sit in the prose the benchmarks call never-seen."""
    from oprm_rag.demo.recall_task import stdlib_prose

    v1 = {prose_sources.norm(s) for s in stdlib_prose()}
    for name in HELDOUT_SOURCES:
        assert not v1 & {prose_sources.norm(s) for s in heldout_prose(name)}, name
    for name in UNSEEN_SOURCES:
        assert not v1 & {prose_sources.norm(s) for s in unseen_prose(name)}, name
