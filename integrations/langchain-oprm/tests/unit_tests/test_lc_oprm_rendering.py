"""Prompt rendering: chat template vs raw text, and the QA chain's exact [P, C, Q] text."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from lc_oprm_support import DOC, QUESTION

from langchain_oprm import ChatRecurrent, OPRMSelector, oprm_prompt_messages


def test_chat_mode_uses_the_tokenizer_template(chat_path: str, lm_for) -> None:
    lm = lm_for(chat_path)
    assert lm.prompt.use_chat_template
    chat = ChatRecurrent(model=chat_path)
    messages = [SystemMessage("Be brief."), HumanMessage("Hello"), AIMessage("Hi"), HumanMessage("Code?")]
    text, special = chat.render(messages)
    expected = lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Code?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected and special is False
    # A lone human message also goes through the template in chat mode.
    assert chat.render([HumanMessage("Hello")])[0] == "User: Hello\nAssistant:"


def test_raw_mode_passes_a_lone_human_message_through(tiny_raw: str, lm_for) -> None:
    lm = lm_for(tiny_raw)
    assert not lm.prompt.use_chat_template
    chat = ChatRecurrent(model=tiny_raw)
    assert chat.render([HumanMessage("The code of alpha is")]) == ("The code of alpha is", True)
    # A conversation still needs roles: the tokenizer's template renders it.
    text, _ = chat.render([HumanMessage("a"), AIMessage("b"), HumanMessage("c")])
    assert text == "User: a\nAssistant: b\nUser: c\nAssistant:"


def test_explicit_template_flag_wins(tiny_raw: str, chat_path: str) -> None:
    assert ChatRecurrent(model=tiny_raw, use_chat_template=True).render([HumanMessage("x")])[0] == \
        "User: x\nAssistant:"
    raw = ChatRecurrent(model=chat_path, use_chat_template=False)
    assert raw.render([SystemMessage("s"), HumanMessage("x")]) == ("s\n\nx", True)


def test_content_blocks_and_roles(chat_path: str) -> None:
    chat = ChatRecurrent(model=chat_path)
    msg = HumanMessage([{"type": "text", "text": "Hel"}, "lo", {"type": "reasoning", "reasoning": "skip"}])
    assert chat.render([msg])[0] == "User: Hello\nAssistant:"
    tool_turn = ToolMessage("42", tool_call_id="1")
    assert "Tool: 42" in chat.render([HumanMessage("q"), AIMessage(""), tool_turn])[0]
    with pytest.raises(ValueError, match="text only"):
        chat.render([HumanMessage([{"type": "image", "url": "https://example.com/x.png"}])])


@pytest.mark.parametrize("top_k", [1, 2])
def test_qa_prompt_reproduces_the_scored_text(mode_path: str, top_k: int) -> None:
    """What the chain sends renders to exactly P + C + Q (one chunk) or the engine's join."""
    selector = OPRMSelector(model=mode_path, chunk_tokens=24, top_k=top_k, idk_filter=False)
    docs = selector.invoke({"question": QUESTION, "documents": [DOC]})
    assert len(docs) == top_k
    engine = selector.core_selector()
    text, _ = ChatRecurrent(model=mode_path).render(oprm_prompt_messages(selector, QUESTION, docs))
    if top_k == 1:
        assert text == engine.prompt_text(QUESTION, docs[0].page_content)
    else:
        ordered = sorted(docs, key=lambda d: d.metadata["oprm_char_start"])
        adjacent = ordered[0].metadata["oprm_char_end"] == ordered[1].metadata["oprm_char_start"]
        joined = ordered[0].page_content + ("" if adjacent else "\n\n") + ordered[1].page_content
        assert text == engine.prompt_text(QUESTION, joined)


def test_qa_prompt_needs_a_selection(chat_path: str) -> None:
    with pytest.raises(ValueError, match="no documents"):
        oprm_prompt_messages(OPRMSelector(model=chat_path), QUESTION, [])
