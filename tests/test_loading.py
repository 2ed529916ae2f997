"""Model loading fails loudly: weights that do not fit the architecture, truncated files,
broken configs, missing tokenizers, hub names without a hub, device_map without accelerate."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from oprm_rag.errors import ModelLoadError
from oprm_rag.loading import load_model_and_tokenizer
from oprm_rag.testing import save_tiny_model, tiny_model


@pytest.fixture()
def folder(model_dir, tmp_path):
    """A fresh copy of a tiny Mamba-2 folder (tied embeddings) to damage."""
    def make(family="mamba2"):
        dst = tmp_path / family
        shutil.copytree(model_dir(family), dst)
        return dst
    return make


def _rewrite(path, change):
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_a_healthy_folder_loads_and_tied_embeddings_are_not_missing(folder, caplog):
    path = folder("mamba2")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")  # tied: not stored
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        model, tok = load_model_and_tokenizer(path, dtype="float32", device="cpu")
    assert not model.training and model.dtype == torch.float32 and tok("a b")["input_ids"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert "weights do not match" not in caplog.text
    ref, _ = tiny_model("mamba2")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["mamba2", "llama"])
def test_a_missing_weight_is_named(folder, family, capfd):
    path = folder(family)
    gone = "backbone.layers.1.mixer.A_log" if family == "mamba2" else "model.layers.0.self_attn.v_proj.weight"
    _rewrite(path / "model.safetensors", lambda sd: sd.pop(gone))
    logging.getLogger("transformers").setLevel(logging.WARNING)  # the report would show at the default level
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    msg = _one_line(info)
    assert gone in msg and "1 missing" in msg and "allow_missing_weights" in msg
    assert "LOAD REPORT" not in capfd.readouterr().err  # one line, not transformers' table as well


def test_a_cut_off_pytorch_bin_file_is_named(folder):
    from oprm_rag.testing import tiny_model

    path = folder("mamba2")
    (path / "model.safetensors").unlink()
    model, _ = tiny_model("mamba2")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    raw = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin \(a zip archive without its end"):
        load_model_and_tokenizer(path)


def test_the_explicit_opt_in_loads_with_a_warning(folder, caplog):
    path = folder("mamba2")
    _rewrite(path / "model.safetensors", lambda sd: sd.pop("backbone.layers.1.mixer.A_log"))
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        model, _ = load_model_and_tokenizer(path, allow_missing_weights=True)
    assert model is not None and "backbone.layers.1.mixer.A_log" in caplog.text


def test_an_unexpected_weight_is_named(folder):
    path = folder("mamba2")
    _rewrite(path / "model.safetensors", lambda sd: sd.__setitem__("stray.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"1 unexpected \(stray\.weight\)"):
        load_model_and_tokenizer(path)


def test_a_weight_of_the_wrong_shape_is_named_with_both_shapes(folder):
    path = folder("mamba2")
    _rewrite(path / "model.safetensors", lambda sd: sd.__setitem__("backbone.layers.1.mixer.A_log", torch.zeros(3)))
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    assert "backbone.layers.1.mixer.A_log: checkpoint [3] vs model [8]" in _one_line(info)


def test_weights_of_another_architecture_are_refused(folder):
    path = folder("mamba2")
    shutil.copy(folder("mamba") / "model.safetensors", path / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    msg = _one_line(info)
    assert "missing" in msg and "Mamba2ForCausalLM" in msg


def test_a_truncated_weights_file_is_named(folder):
    path = folder("mamba2")
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    msg = _one_line(info)
    assert "model.safetensors" in msg and "truncated" in msg


@pytest.fixture()
def sharded(tmp_path):
    model, tok = tiny_model("mamba2")
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    tok.save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    return path, shards


def test_a_sharded_folder_loads(sharded):
    path, _ = sharded
    model, _ = load_model_and_tokenizer(path)
    ref, _ = tiny_model("mamba2")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_a_truncated_shard_is_named(sharded):
    path, shards = sharded
    victim = shards[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    msg = _one_line(info)
    assert victim.name in msg and all(s.name not in msg for s in shards if s != victim)


def test_a_missing_shard_is_named(sharded):
    path, shards = sharded
    shards[0].unlink()
    with pytest.raises(ModelLoadError, match=shards[0].name):
        load_model_and_tokenizer(path)


def test_a_weight_dropped_from_a_shard_is_named(sharded):
    path, shards = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = shards[-1]
    sd = load_file(victim)
    gone = sorted(sd)[0]
    del sd[gone]
    save_file(sd, victim, metadata={"format": "pt"})
    index["weight_map"].pop(gone)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=gone.replace(".", r"\.")):
        load_model_and_tokenizer(path)


@pytest.mark.parametrize("content, expect", [
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ('"mamba2"', "holds a JSON str, not an object"),
    ("{not json", "is not valid JSON"),
    ("{}", "no \"model_type\""),
    (None, "no config.json"),
])
def test_a_broken_config_gets_a_clear_error(folder, content, expect):
    path = folder("mamba2")
    if content is None:
        (path / "config.json").unlink()
    else:
        (path / "config.json").write_text(content)
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(path)
    assert expect in _one_line(info) and "config.json" in str(info.value)


def test_a_folder_without_tokenizer_files_says_so(folder):
    path = folder("mamba2")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model_and_tokenizer(path)


def test_a_missing_local_folder_and_a_file_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model_and_tokenizer(tmp_path / "nope")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model_and_tokenizer(tmp_path / "f.bin")


def test_a_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setattr("oprm_rag.loading._hub_offline", lambda: True)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("state-spaces/mamba-130m-hf")
    msg = _one_line(info)
    assert "not in the Hugging Face cache" in msg and "offline" in msg and "hf download" in msg
    assert time.perf_counter() - t0 < 30  # no network retries (a generous bound: the point is no 5x backoff)


def test_a_hub_name_without_a_reachable_hub_is_one_clear_line(monkeypatch):
    monkeypatch.setattr("oprm_rag.loading._hub_offline", lambda: False)
    monkeypatch.setattr("oprm_rag.loading._hub_unreachable", lambda timeout=3.0: "huggingface.co: Name or service not known")
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("state-spaces/mamba-130m-hf")
    assert "cannot be reached" in _one_line(info) and "Name or service not known" in str(info.value)


def test_device_map_without_accelerate_names_the_extra(folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real(n, *a))
    with pytest.raises(ModelLoadError, match=r"pip install 'oprm-rag\[accelerate\]'"):
        load_model_and_tokenizer(folder("mamba2"), device_map="cpu")


def test_recurrent_lm_from_pretrained_goes_through_the_checks(folder):
    """Needs RecurrentLM.from_pretrained to call load_model_and_tokenizer (issue 16 wiring)."""
    from oprm_rag import RecurrentLM

    path = folder("mamba2")
    _rewrite(path / "model.safetensors", lambda sd: sd.pop("backbone.layers.1.mixer.A_log"))
    with pytest.raises(ModelLoadError, match="backbone.layers.1.mixer.A_log"):
        RecurrentLM.from_pretrained(path)


def test_save_tiny_model_folders_are_what_the_checks_expect(tmp_path):
    for family in ("mamba", "rwkv"):
        path = save_tiny_model(family, tmp_path / family)
        model, tok = load_model_and_tokenizer(path)
        assert model is not None and tok is not None
