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


# ---------------------------------------------------------------------- hardening (issue 24)
def _cli(*argv: str) -> int:
    from oprm_rag.cli import main

    try:
        return main(["export-gguf", *argv])
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


def test_a_temp_file_of_another_run_is_never_touched(tmp_path: Path) -> None:
    """Two exports to one output used the fixed name OUT.part: each run now has its own temp file."""
    other = tmp_path / "x.gguf.part"
    other.write_bytes(b"another run's half-written file")
    out = export_gguf(oprm_rag.DEMO_MODEL, tmp_path / "x.gguf")
    assert other.read_bytes() == b"another run's half-written file"
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "mamba2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf", "x.gguf.part"]  # no temp file left


def test_the_temp_file_goes_on_failure_and_on_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []
    real = gguf.GGUFWriter.write_tensors_to_file

    for exc in (KeyboardInterrupt(), OSError(28, "No space left on device")):
        def fail(self, *a, _exc=exc, **k):
            seen.append(Path(self.path) if getattr(self, "path", None) else tmp_path)
            raise _exc
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
        expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else InputError
        with pytest.raises(expected) as info:
            export_gguf(oprm_rag.DEMO_MODEL, tmp_path / "x.gguf")
        assert list(tmp_path.iterdir()) == []  # neither the output nor a temp file
        if expected is InputError:
            assert "disk is full" in str(info.value)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    assert seen and all(p.parent == tmp_path for p in seen if p != tmp_path)


def test_refuses_to_write_over_the_models_own_files(tmp_path: Path) -> None:
    folder = _copy_demo(tmp_path)
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    (tmp_path / "link.gguf").symlink_to(weights)
    import os

    os.link(weights, tmp_path / "hard.gguf")
    for out in (weights, folder / "." / "model.safetensors", tmp_path / "link.gguf", tmp_path / "hard.gguf",
                folder / "config.json"):
        with pytest.raises(InputError, match="input file"):
            export_gguf(folder, out)
        assert _cli(str(folder), str(out)) == 1
    assert weights.read_bytes() == before


def test_bad_folders_and_outputs_are_the_users_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy_demo(tmp_path)
    good = (folder / "config.json").read_bytes()
    for content, match in ((b"[1, 2]", "JSON list, not an object"), (b"[" * 100_000 + b"]" * 100_000, "nested"),
                           (b"\xff\xfe{}", "not UTF-8"), (b'{"model_type": "mamba2"}', "not in the shape")):
        (folder / "config.json").write_bytes(content)
        with pytest.raises(InputError, match=match):
            export_gguf(folder, tmp_path / "y.gguf")
        assert _cli(str(folder), str(tmp_path / "y.gguf")) == 1
    (folder / "config.json").write_bytes(good)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        export_gguf(folder, blocker / "sub" / "y.gguf")
    assert _cli(str(folder), str(blocker / "y.gguf")) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf"))


def test_context_length_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (2**32, 0, -5):
        with pytest.raises(InputError, match="1 to 4,294,967,295"):
            export_gguf(oprm_rag.DEMO_MODEL, tmp_path / "c.gguf", context_length=bad)
    assert _cli(oprm_rag.DEMO_MODEL, str(tmp_path / "c.gguf"), "--context-length", str(2**32)) == 2
    assert "4,294,967,295" in capsys.readouterr().err
    out = export_gguf(oprm_rag.DEMO_MODEL, tmp_path / "c.gguf", context_length=2**32 - 1)
    assert gguf.GGUFReader(str(out)).fields["mamba2.context_length"].contents() == 2**32 - 1


def test_a_wordpiece_tokenizer_is_not_told_to_try_pre_tokenizer(tmp_path: Path) -> None:
    folder = _copy_demo(tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tok["model"] = {"type": "WordPiece", "vocab": vocab, "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                    "max_input_chars_per_word": 100}
    tok["pre_tokenizer"] = {"type": "BertPreTokenizer"}
    tok["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    for pre in (None, "gpt-2"):
        with pytest.raises(InputError, match="WordPiece") as info:
            export_gguf(folder, tmp_path / "w.gguf", pre_tokenizer=pre)
        assert "pre_tokenizer" not in str(info.value) and "--pre-tokenizer" not in str(info.value)


def test_the_output_keeps_a_normal_file_mode(tmp_path: Path) -> None:
    import os
    import stat

    out = export_gguf(oprm_rag.DEMO_MODEL, tmp_path / "m.gguf")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_weights_of_other_shapes_than_the_config_says(tmp_path: Path) -> None:
    folder = _copy_demo(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_groups": 7}))  # ssm_norm cannot split in 7 groups
    with pytest.raises(InputError, match="shapes config.json describes"):
        export_gguf(folder, tmp_path / "s.gguf")
    assert _cli(str(folder), str(tmp_path / "s.gguf")) == 1


def test_a_second_export_to_the_same_file_is_refused_while_one_runs(tmp_path: Path) -> None:
    """Two runs to one output: the second is refused at once (no run reports success for a
    file the other then replaces); once the first is done the output can be written again."""
    import subprocess
    import sys

    out = tmp_path / "x.gguf"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom oprm_rag.user_files import exclusive_output\n"
        f"with exclusive_output({str(out)!r}, 'export-gguf'):\n"
        "    print('held', flush=True)\n    sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match="another process is writing this file"):
            export_gguf(oprm_rag.DEMO_MODEL, out)
        assert _cli(oprm_rag.DEMO_MODEL, str(out)) == 1
        assert not out.exists()
    finally:
        holder.communicate("done\n", timeout=30)
    assert export_gguf(oprm_rag.DEMO_MODEL, out).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no lock or temp file left
