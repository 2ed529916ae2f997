"""``oprm_rag.resolve``: what a user passes becomes one engine, once, at the edge; the
engine owns its model, capabilities are types, and old public names still import."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import oprm_rag
from oprm_rag import Engine, OPRMSelector, resolve
from oprm_rag.engine import QuestionLikelihood, StatefulEngine
from oprm_rag.engine.local import InProcessEngine, LocalEngine, ReplayEngine
from oprm_rag.errors import OptionError


def test_a_model_has_one_engine_and_the_engine_owns_it(load_lm):
    lm = load_lm("mamba2")
    engine = resolve(lm)
    assert isinstance(engine, LocalEngine) and engine.lm is lm
    assert resolve(lm) is engine and resolve(engine) is engine
    assert not hasattr(lm, "context")  # the model keeps nothing about its use
    assert OPRMSelector(lm).engine is engine and OPRMSelector(engine).engine is engine


def test_a_path_loads_once_and_resolves_to_the_same_engine(model_dir):
    a, b = resolve(str(model_dir("mamba"))), resolve(model_dir("mamba"))
    assert a is b and isinstance(a, StatefulEngine)


def test_capabilities_are_types_not_flags(load_lm):
    from oprm_rag.testing import FALLBACK_FAMILIES

    exact, replay = resolve(load_lm("mamba2")), resolve(load_lm(FALLBACK_FAMILIES[0]))
    assert isinstance(exact, StatefulEngine) and isinstance(exact, QuestionLikelihood)
    assert isinstance(replay, ReplayEngine) and not isinstance(replay, StatefulEngine)
    assert isinstance(replay, QuestionLikelihood) and isinstance(replay, InProcessEngine)
    with pytest.raises(OptionError, match="keeps no reusable states"):
        OPRMSelector(replay, chunk_tokens=16).prepare("The code of alpha is 1234. " * 8)


def test_describe_is_what_the_selector_resolves_chunks_from(load_lm):
    engine = resolve(load_lm("mamba2"))
    info = engine.describe()
    assert info.name == engine.name and info.identity == engine.identity and info.family == "mamba2"
    sel = OPRMSelector(engine)
    assert sel.chunk_tokens == info.auto_chunk.tokens and info.auto_chunk.reason in sel.chunk.reason


def test_a_server_url_resolves_to_the_served_engine_without_a_request():
    from oprm_rag.served import OpenAICompatibleLM

    engine = resolve("http://127.0.0.1:9/v1", model="demo")  # port 9: nothing listens, nothing is asked
    assert isinstance(engine, OpenAICompatibleLM) and isinstance(engine, Engine)
    assert not isinstance(engine, (StatefulEngine, QuestionLikelihood, InProcessEngine))


@pytest.mark.parametrize("bad, match", [(3, "got int"), (b"path", "got bytes"), ("  ", "empty string"),
                                        (None, "got NoneType")])
def test_what_cannot_be_a_model_is_refused_with_a_message(bad, match):
    with pytest.raises(OptionError, match=match):
        resolve(bad)


def test_loading_options_for_a_built_model_are_refused(load_lm):
    with pytest.raises(OptionError, match="already built"):
        resolve(load_lm("mamba2"), dtype="float16")


def test_old_public_names_still_import_with_a_warning_that_names_their_module():
    with pytest.warns(DeprecationWarning, match="oprm_rag.engine.local.LocalEngine"):
        assert oprm_rag.ModelContext is LocalEngine
    with pytest.warns(DeprecationWarning, match="oprm_rag.engine.resolve.load_model"):
        from oprm_rag.engine.resolve import load_model

        assert oprm_rag.resolve_lm is load_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert oprm_rag.OPRMSelector is OPRMSelector  # a public name: no warning
    with pytest.raises(AttributeError):
        oprm_rag.no_such_name  # noqa: B018


def test_importing_the_package_loads_no_torch():
    code = "import sys, oprm_rag, oprm_rag.integration, oprm_rag.engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
