"""Bad input fails early with a message that says what to do."""

import pytest

from oprm_rag import OPRMSelector, RecurrentLM


@pytest.fixture(scope="module")
def sel(load_lm):
    return OPRMSelector(load_lm("mamba"), chunk_tokens=32)


@pytest.mark.parametrize("docs, err, match", [
    ([], ValueError, "no documents"),
    ("", ValueError, "empty or only whitespace"),
    (["fine text", "   \n\t "], ValueError, "document 1 is empty"),
    (["text", 3], TypeError, "document 1 is int"),
    (None, TypeError, "string or a list of strings"),
    ({"a": "b"}, TypeError, "string or a list of strings"),
])
def test_bad_documents(sel, docs, err, match):
    with pytest.raises(err, match=match):
        sel.select("What is the code of alpha?", docs)


@pytest.mark.parametrize("question, err, match", [
    ("", ValueError, "question is empty"),
    ("   ", ValueError, "question is empty"),
    (None, TypeError, "question must be a string"),
    (42, TypeError, "question must be a string"),
])
def test_bad_questions(sel, question, err, match):
    with pytest.raises(err, match=match):
        sel.select(question, "some text")


def test_question_longer_than_a_chunk(sel):
    with pytest.raises(ValueError, match="shorten the question or raise chunk_tokens"):
        sel.select("What is the code of alpha? " * 20, "some text")


@pytest.mark.parametrize("kwargs, err, match", [
    ({"chunk_tokens": 2}, ValueError, "too small"),
    ({"chunk_tokens": "big"}, TypeError, "chunk_tokens must be"),
    ({"chunk_tokens": 1.5}, TypeError, "chunk_tokens must be"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"criterion": "vibes"}, ValueError, "criterion"),
    ({"fallback": "random"}, ValueError, "fallback"),
    ({"boundary": "word"}, ValueError, "boundary"),
    ({"chunk_tokens": 32, "chunk_overlap": 32}, ValueError, "chunk_overlap"),
])
def test_bad_options(load_lm, kwargs, err, match):
    with pytest.raises(err, match=match):
        OPRMSelector(load_lm("mamba"), **kwargs)


def test_chunk_tokens_beyond_a_transformers_position_limit(load_lm):
    lm = load_lm("llama")
    limit = lm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"does not fit this model's {limit} positions"):
        OPRMSelector(lm, chunk_tokens=limit + 1)


def test_idk_word_the_tokenizer_cannot_start(load_lm):
    with pytest.raises(ValueError, match="idk_word must be a non-empty string"):
        OPRMSelector(load_lm("mamba"), idk_word="   ")


def test_wrapping_needs_model_and_tokenizer(load_lm):
    with pytest.raises(ValueError, match="from_pretrained"):
        RecurrentLM(load_lm("mamba").model, None)


def test_missing_model_folder_says_what_to_give(tmp_path):
    from oprm_rag.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such folder"):
        RecurrentLM.from_pretrained(tmp_path / "nope")


def test_mitigation_on_a_family_that_cannot_take_it(model_dir):
    with pytest.raises(ValueError, match="Mamba-2 models only"):
        RecurrentLM.from_pretrained(model_dir("mamba"), collapse_mitigation="forget")
    with pytest.raises(ValueError, match="unknown collapse_mitigation"):
        RecurrentLM.from_pretrained(model_dir("mamba2"), collapse_mitigation="magic")


def test_state_of_another_family_is_refused(load_lm):
    a, b = load_lm("mamba"), load_lm("mamba2")
    import torch

    with pytest.raises(ValueError, match="cannot run"):
        b.backend.forward(torch.tensor([[3, 4]]), a.backend.empty_state(1))
