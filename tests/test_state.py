"""The one state type: batch algebra and checked safetensors files."""

import pytest
import torch

from oprm_rag.state import RecurrentState, StateFormatError


def _state(b=3):
    return RecurrentState("mamba", {
        "position": torch.arange(b),
        "conv.0": torch.randn(b, 4, 3),
        "ssm.0": torch.randn(b, 4, 2),
    })


def test_select_expand_cat_clone():
    s = _state()
    assert s.select([2, 0]).tensors["position"].tolist() == [2, 0]
    assert s.select(1).batch_size == 1
    e = s.select(1).expand(4)
    assert e.batch_size == 4 and torch.equal(e.tensors["ssm.0"][3], s.tensors["ssm.0"][1])
    c = RecurrentState.cat([s, s.select(0)])
    assert c.batch_size == 4 and torch.equal(c.tensors["conv.0"][3], s.tensors["conv.0"][0])
    k = s.clone()
    k.tensors["ssm.0"].add_(1)
    assert not s.same_as(k)
    assert s.nbytes == sum(t.numel() * t.element_size() for t in s.tensors.values())
    with pytest.raises(IndexError):
        s.select([5])


def test_cat_refuses_other_families():
    other = RecurrentState("rwkv", {"position": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(ValueError):
        RecurrentState.cat([_state(), other])


def test_to_keeps_positions_integral():
    s = _state().to(dtype=torch.float16)
    assert s.tensors["position"].dtype == torch.long and s.tensors["ssm.0"].dtype == torch.float16


def test_save_load_roundtrip_and_metadata(tmp_path):
    s = _state()
    f = tmp_path / "s.safetensors"
    s.save(f, {"model": "m1"})
    back = RecurrentState.load(f, expect_metadata={"model": "m1"})
    assert back.same_as(s)
    with pytest.raises(StateFormatError):
        RecurrentState.load(f, expect_metadata={"model": "m2"})


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    f = tmp_path / "s.safetensors"
    _state().save(f)
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF  # flip a byte inside the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(StateFormatError, match="checksum"):
        RecurrentState.load(f)
    f.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(StateFormatError):
        RecurrentState.load(f)


def test_no_temp_files_left_behind(tmp_path):
    _state().save(tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
