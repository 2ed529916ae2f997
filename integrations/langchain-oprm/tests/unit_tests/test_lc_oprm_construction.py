"""Construction checks settings and never loads weights (LangChain builds components often)."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document
from oprm_rag.errors import ModelLoadError
from pydantic import ValidationError

from langchain_oprm import ChatRecurrent, OPRMCompressor, OPRMSelector, RecurrentLLM, create_oprm_qa_chain, oprm_tool

MISSING = "/nonexistent/oprm-model"


def _loaded() -> int:
    from oprm_rag.engine.resolve import loaded_models

    return len(loaded_models())


def test_nothing_loads_at_construction() -> None:
    before = _loaded()
    chat = ChatRecurrent(model=MISSING)
    llm = RecurrentLLM(model=Path(MISSING))
    sel = OPRMSelector(model=MISSING, chunk_tokens=64, top_k=2)
    comp = OPRMCompressor(model=MISSING)
    chain = create_oprm_qa_chain(MISSING, chunk_tokens=64)
    tool = oprm_tool(MISSING, {"a": "some text"})
    assert _loaded() == before
    assert chat.model_name == MISSING and llm.model_name == MISSING and llm.model == MISSING
    assert sel.model_name == MISSING and comp.model_name == MISSING
    assert chain is not None and tool.name == "oprm_search"
    # The model loads on first use, and a missing folder says so then.
    with pytest.raises(ModelLoadError, match="no such folder"):
        chat.invoke("hi")


@pytest.mark.parametrize("bad", [
    {"top_k": 0},
    {"chunk_tokens": 4},
    {"chunk_tokens": True},
    {"chunk_tokens": 32, "chunk_overlap": 32},
    {"boundary": "page"},
    {"criterion": "bm25"},
    {"fallback": "first"},
    {"max_batch_tokens": 0},
])
def test_selector_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(ValidationError):
        OPRMSelector(model=MISSING, **bad)
    with pytest.raises(ValidationError):
        OPRMCompressor(model=MISSING, **bad)


@pytest.mark.parametrize("cls", [ChatRecurrent, RecurrentLLM, OPRMSelector])
def test_model_must_be_a_path_or_a_recurrent_lm(cls: type) -> None:
    with pytest.raises(ValidationError, match="RecurrentLM, an oprm_rag Engine or a path"):
        cls(model=123)
    with pytest.raises(ValidationError):
        cls(model="  ")


def test_bad_generation_arguments_fail_before_loading() -> None:
    chat = ChatRecurrent(model=MISSING)
    with pytest.raises(TypeError, match="unsupported generation argument"):
        chat.invoke("hi", max_new_token=3)
    with pytest.raises(ValidationError):
        ChatRecurrent(model=MISSING, temperature=-1)
    with pytest.raises(ValidationError):
        RecurrentLLM(model=MISSING, top_p=0)


def test_selector_rejects_call_arguments() -> None:
    with pytest.raises(TypeError, match="takes no call arguments"):
        OPRMSelector(model=MISSING).invoke({"question": "q", "documents": "d"}, top_k=3)


def test_tool_checks_its_documents_up_front() -> None:
    with pytest.raises(ValueError, match="non-empty dict"):
        oprm_tool(MISSING, {})
    with pytest.raises(ValueError, match="has no text"):
        oprm_tool(MISSING, {"a": "   "})
    with pytest.raises(TypeError, match="a string, a Document, or a list"):
        oprm_tool(MISSING, {"a": 42})
    with pytest.raises(TypeError, match="str or a langchain Document"):
        oprm_tool(MISSING, {"a": [Document(page_content="x"), 42]})
    with pytest.raises(TypeError, match="not both"):
        oprm_tool(OPRMSelector(model=MISSING), {"a": "text"}, top_k=2)


def test_ls_params_name_the_model_and_honour_overrides() -> None:
    chat = ChatRecurrent(model=MISSING, max_tokens=7, stop=["x"])
    params = chat._get_ls_params()
    assert params["ls_provider"] == "oprm" and params["ls_model_name"] == MISSING
    assert params["ls_max_tokens"] == 7 and params["ls_stop"] == ["x"] and params["ls_model_type"] == "chat"
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
    llm = RecurrentLLM(model=MISSING)
    assert llm._get_ls_params(model="other", temperature=0.5)["ls_temperature"] == 0.5


def test_schema_names_the_documents() -> None:
    tool = oprm_tool(MISSING, {"manual": "a", "notes": ["b"], "plain": "c"})
    schema = tool.get_input_schema().model_json_schema()
    assert set(schema["properties"]) == {"question", "document_id"}
    assert "'manual', 'notes', 'plain'" in schema["properties"]["document_id"]["description"]
    assert "'manual', 'notes', 'plain'" in tool.description
    assert tool.response_format == "content_and_artifact"


def test_selector_schemas_describe_its_input_and_output() -> None:
    from langchain_core.runnables import ConfigurableField

    sel = OPRMSelector(model=MISSING)
    schema = sel.get_input_jsonschema()
    fields = schema["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    assert set(fields["required"]) == {"question", "documents"}
    assert fields["properties"]["question"]["type"] == "string"
    output = sel.get_output_jsonschema()
    assert output["type"] == "array" and output["items"]["$ref"].endswith("/Document")
    configurable = sel.configurable_fields(top_k=ConfigurableField(id="k", name="Top k"))
    assert "k" in configurable.get_config_jsonschema()["$defs"]["Configurable"]["properties"]


def test_selector_and_compressor_take_every_core_option() -> None:
    """Their fields are the core's: the same names and defaults, progress included."""
    from oprm_rag.options import SelectorOptions

    for cls in (OPRMSelector, OPRMCompressor):
        made = cls(model=MISSING, show_progress=True, idk_threshold=0.5, chunk_tokens=None)
        assert made.core_options() == SelectorOptions(show_progress=True, idk_threshold=0.5, chunk_tokens=None)
        assert cls(model=MISSING).core_options() == SelectorOptions()  # no defaults of its own
        with pytest.raises(ValidationError, match="did you mean 'chunk_tokens'"):
            cls(model=MISSING, chunk_tokns=64)
