"""RecurrentLLM: one decoding batch for several prompts, equal to decoding each alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lc_oprm_support import Tokens

from langchain_oprm import RecurrentLLM
from oprm_rag import resolve

PROMPTS = ["The code of alpha is", "Mamba models keep a fixed size state. Long documents", "Hello"]


def test_batch_is_one_decoding_batch_equal_to_one_by_one(primary_path: str, lm_for,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    llm = RecurrentLLM(model=primary_path, max_tokens=6)
    alone = [llm.invoke(p) for p in PROMPTS]
    lm = lm_for(primary_path)
    batches: list[int] = []
    real = resolve(lm).generate_batch

    def spy(state: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(state.batch_size)
        return real(state, *args, **kwargs)

    monkeypatch.setattr(resolve(lm), "generate_batch", spy)
    assert llm.batch(PROMPTS) == alone
    assert batches == [len(PROMPTS)]


def test_generate_reports_usage_and_stops(primary_path: str, lm_for) -> None:
    llm = RecurrentLLM(model=primary_path, max_tokens=5)
    result = llm.generate(PROMPTS[:2])
    lm = lm_for(primary_path)
    total_in = 0
    for prompt, [gen] in zip(PROMPTS[:2], result.generations):
        usage = gen.generation_info["usage"]
        assert usage["input_tokens"] == len(lm.encode(prompt, add_special_tokens=True))
        assert usage["output_tokens"] <= 5 and gen.generation_info["finish_reason"] in {"length", "eos", "stop"}
        total_in += usage["input_tokens"]
    assert result.llm_output["token_usage"]["input_tokens"] == total_in
    assert result.llm_output["model_name"] == primary_path


def test_stop_strings_apply_per_row(primary_path: str) -> None:
    llm = RecurrentLLM(model=primary_path, max_tokens=10)
    full = llm.batch(PROMPTS)
    row = max(range(len(full)), key=lambda i: len(full[i]))
    assert len(full[row]) >= 3
    stop = full[row][1:3]
    cut = llm.batch(PROMPTS, stop=[stop])
    for before, after in zip(full, cut):
        assert after == (before[:before.index(stop)] if stop in before else before)


async def test_stream_and_async(primary_path: str) -> None:
    llm = RecurrentLLM(model=primary_path, max_tokens=6)
    expected = llm.invoke(PROMPTS[0])
    handler = Tokens()
    assert "".join(llm.stream(PROMPTS[0], config={"callbacks": [handler]})) == expected == "".join(handler.tokens)
    assert await llm.ainvoke(PROMPTS[0]) == expected
    assert "".join([p async for p in llm.astream(PROMPTS[0])]) == expected
    assert await llm.abatch(PROMPTS[:2]) == llm.batch(PROMPTS[:2])
    results = await asyncio.gather(llm.ainvoke(PROMPTS[0]), llm.ainvoke(PROMPTS[1]))
    assert results == [expected, llm.invoke(PROMPTS[1])]


@pytest.mark.parametrize("family", ["mamba", "rwkv", "recurrent_gemma", "llama"])
def test_batch_equals_one_by_one_on_other_families(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """States of different lengths stack for every recurrent family; the token-replay
    fallback (a transformer) decodes one by one."""
    from oprm_rag.testing import save_tiny_model

    path = str(save_tiny_model(family, tmp_path_factory.mktemp(family)))
    llm = RecurrentLLM(model=path, max_tokens=5)
    assert llm.batch(PROMPTS) == [llm.invoke(p) for p in PROMPTS]
