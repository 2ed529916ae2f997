"""``oprm-rag export-gguf``: the file it writes, read back, and the folders it refuses.

Numerics against transformers (through a real llama-server) are in
``test_llama_server.py``; here the file itself is checked, without a server.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import oprm_rag
from oprm_rag.errors import InputError, ModelLoadError
from oprm_rag.gguf_export import KNOWN_PRE_TOKENIZERS, add_parser, export_gguf, run, tokenizer_fingerprint

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_demo_model_round_trips(demo_gguf: Path) -> None:
    from safetensors.numpy import load_file

    r = gguf.GGUFReader(str(demo_gguf))
    cfg = json.loads((Path(oprm_rag.DEMO_MODEL) / "config.json").read_text())
    assert _field(r, "general.architecture") == "mamba2"
    assert _field(r, "general.file_type") == 0  # all f32
    assert _field(r, "mamba2.context_length") == 512  # the true training context, not 2**20
    assert _field(r, "mamba2.ssm.time_step_rank") == cfg["num_heads"]
    assert _field(r, "mamba2.ssm.inner_size") == cfg["expand"] * cfg["hidden_size"]
    assert _field(r, "mamba2.ssm.group_count") == cfg["n_groups"]
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    tok = json.loads((Path(oprm_rag.DEMO_MODEL) / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    assert len(_field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert _field(r, "tokenizer.ggml.eos_token_id") == 0 and _field(r, "tokenizer.ggml.padding_token_id") == 1

    w = load_file(str(Path(oprm_rag.DEMO_MODEL) / "model.safetensors"))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    assert np.array_equal(t["token_embd.weight"], w["backbone.embeddings.weight"])
    assert "output.weight" not in t  # tied: llama.cpp reuses the embedding
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}.mixer."
        np.testing.assert_allclose(t[f"blk.{i}.ssm_a"].ravel(), -np.exp(w[p + "A_log"]), rtol=1e-6)
        assert np.array_equal(t[f"blk.{i}.ssm_d"].ravel(), w[p + "D"])
        assert np.array_equal(t[f"blk.{i}.ssm_dt.bias"], w[p + "dt_bias"])
        assert np.array_equal(t[f"blk.{i}.ssm_conv1d.weight"], w[p + "conv1d.weight"][:, 0, :])
        assert np.array_equal(t[f"blk.{i}.ssm_in.weight"], w[p + "in_proj.weight"])
        assert np.array_equal(t[f"blk.{i}.ssm_norm.weight"].ravel(), w[p + "norm.weight"])
    assert len(t) == 2 + 9 * cfg["num_hidden_layers"]


def test_fingerprint_of_the_shipped_tokenizer_is_known() -> None:
    """If the demo model is retrained with a new tokenizer, check that it still tokenises
    like GPT-2's pre-tokenizer (see gguf_export's docstring) and record its fingerprint."""
    tok = json.loads((Path(oprm_rag.DEMO_MODEL) / "tokenizer.json").read_text())
    assert KNOWN_PRE_TOKENIZERS.get(tokenizer_fingerprint(tok)) == "gpt-2"


def _copy_demo(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(oprm_rag.DEMO_MODEL, folder)
    return folder


def test_unknown_pre_tokenizer_needs_an_explicit_name(tmp_path: Path) -> None:
    folder = _copy_demo(tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = " ?[0-9]+"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match="pre_tokenizer='gpt-2'"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()
    out = export_gguf(folder, tmp_path / "x.gguf", pre_tokenizer="gpt-2")
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_refuses_models_llama_cpp_would_compute_differently(tmp_path: Path) -> None:
    folder = _copy_demo(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for change, match in (({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "only Mamba-2"),
                          ({"use_bias": True}, "use_bias"),
                          ({"time_step_limit": [0.0, 0.1]}, "does not clamp dt"),
                          ({"num_heads": 4}, "num_heads")):
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(InputError, match=match):
            export_gguf(folder, tmp_path / "y.gguf")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "training_log.json").unlink()
    with pytest.raises(InputError, match="records no training context"):
        export_gguf(folder, tmp_path / "y.gguf")
    assert export_gguf(folder, tmp_path / "y.gguf", context_length=512).is_file()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        export_gguf(folder, tmp_path / "y.gguf")
    with pytest.raises(InputError, match="not a folder"):
        export_gguf(tmp_path / "nothing", tmp_path / "y.gguf")


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="oprm-rag")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-gguf", oprm_rag.DEMO_MODEL, str(tmp_path / "d.gguf")])
    assert args.func is run and run(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "d.gguf").stat().st_size > 2_000_000
