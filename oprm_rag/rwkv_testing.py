"""Tiny random RWKV-6 / RWKV-7 checkpoints in BlinkDL's format, for tests and benchmarks.

:func:`random_rwkv_weights` draws a state dict with the keys and shapes of BlinkDL's
``.pth`` files, scaled so that every part of the model visibly matters (matrices
N(0, 1/fan_in), mix vectors U(0, 1), norms near 1, decay biases negative), and
:func:`save_rwkv_pth` writes it with a tiny world vocabulary next to it, so that
``RecurrentLM.from_pretrained("<dir>/model.pth")`` loads it like a real download. The
same weights load into PyPI's ``rwkv`` package (BlinkDL's reference), which is what the
tests compare against. :func:`save_rwkv_hf_folder` writes the same weights as a Hugging
Face folder (RWKV's RWKV-6 layout, or flash-linear-attention's RWKV-7 layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["random_rwkv_weights", "save_rwkv_pth", "save_rwkv_hf_folder", "write_tiny_world_vocab",
           "TINY_VOCAB_TEXT", "blinkdl_reference"]

#: Text the tiny vocabulary is cut from (every byte value is in the vocabulary anyway).
TINY_VOCAB_TEXT = (
    "The code of alpha is 1234. The code of beta is 5678. What is the code of alpha? Error. "
    "Answer the question using only the text below. If the text does not contain the answer, answer "
    "Question: Answer: Text: User: Assistant: the a of and to in is it that was for on are with as"
)


def write_tiny_world_vocab(path: str | Path, extra_tokens: int = 200) -> Path:
    """A world-format vocabulary file: the 256 bytes (ids 1-256) and frequent substrings of
    :data:`TINY_VOCAB_TEXT` (ids from 257), in BlinkDL's ``id repr(token) length`` lines."""
    from collections import Counter

    tokens: list[bytes] = [bytes([i]) for i in range(256)]
    counts: Counter[bytes] = Counter()
    data = TINY_VOCAB_TEXT.encode()
    for n in range(2, 9):
        for i in range(len(data) - n + 1):
            counts[data[i:i + n]] += 1
    tokens += [t for t, _ in counts.most_common() if len(t) > 1][:extra_tokens]
    tokens.append(b"\n\n")
    lines = []
    for i, tok in enumerate(tokens, start=1):
        try:
            text = tok.decode("utf-8")
            lit = repr(text)
        except UnicodeDecodeError:
            lit = repr(tok)
        lines.append(f"{i} {lit} {len(tok)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_rwkv_weights(version: int, *, layers: int = 2, hidden: int = 64, head_size: int = 32,
                        vocab: int = 512, ffn: int | None = None, lora: int = 16, seed: int = 0,
                        head_scale: float = 4.0) -> dict[str, Any]:
    """A random RWKV-``version`` (6 or 7) state dict in BlinkDL's ``.pth`` format (float32).

    Keys come in the order BlinkDL's trainer writes them (RWKV-6's reference reads its
    head count from the key order: ``time_maa_*`` before ``time_decay``/``time_faaaa``).
    ``head_scale`` widens the output logits so that greedy choices are not near-ties.
    """
    import torch

    if version not in (6, 7):
        raise ValueError("version must be 6 or 7")
    if hidden % head_size:
        raise ValueError("hidden must be a multiple of head_size")
    g = torch.Generator().manual_seed(seed)
    c, h, n = hidden, hidden // head_size, head_size
    f = ffn or (4 * c if version == 7 else (c * 7) // 2)

    def mat(*shape: int, fan_in: int | None = None) -> "torch.Tensor":
        return torch.randn(*shape, generator=g) / (fan_in or shape[-1]) ** 0.5

    def lin(out: int, inp: int) -> "torch.Tensor":  # BlinkDL's Linear weights: (out, in)
        return mat(out, inp, fan_in=inp)

    def mix() -> "torch.Tensor":
        return torch.rand(1, 1, c, generator=g)

    def norm(prefix: str, sd: dict[str, Any]) -> None:
        sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)

    sd: dict[str, Any] = {"emb.weight": torch.randn(vocab, c, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}"
        if i == 0:
            norm(f"{p}.ln0", sd)
        norm(f"{p}.ln1", sd)
        norm(f"{p}.ln2", sd)
        a = f"{p}.att"
        if version == 6:
            for name in ("x", "w", "k", "v", "r", "g"):
                sd[f"{a}.time_maa_{name}"] = mix()
            sd[f"{a}.time_maa_w1"] = mat(c, 5 * lora, fan_in=c)
            sd[f"{a}.time_maa_w2"] = mat(5, lora, c, fan_in=lora)
            sd[f"{a}.time_decay"] = (-1.5 + torch.randn(1, 1, c, generator=g)).clamp_max(0.5)
            sd[f"{a}.time_decay_w1"] = mat(c, 2 * lora, fan_in=c)
            sd[f"{a}.time_decay_w2"] = mat(2 * lora, c, fan_in=2 * lora)
            sd[f"{a}.time_faaaa"] = 0.5 * torch.randn(h, n, generator=g)
            for name in ("receptance", "key", "value", "gate", "output"):
                sd[f"{a}.{name}.weight"] = lin(c, c)
            norm(f"{a}.ln_x", sd)
            sd[f"{p}.ffn.time_maa_k"] = mix()
            sd[f"{p}.ffn.time_maa_r"] = mix()
            sd[f"{p}.ffn.key.weight"] = lin(f, c)
            sd[f"{p}.ffn.receptance.weight"] = lin(c, c)
            sd[f"{p}.ffn.value.weight"] = lin(c, f)
        else:
            for name in ("r", "w", "k", "v", "a", "g"):
                sd[f"{a}.x_{name}"] = mix()
            sd[f"{a}.w0"] = -1.0 + torch.randn(1, 1, c, generator=g)
            sd[f"{a}.w1"] = mat(c, lora, fan_in=c)
            sd[f"{a}.w2"] = mat(lora, c, fan_in=lora)
            sd[f"{a}.a0"] = torch.randn(1, 1, c, generator=g)
            sd[f"{a}.a1"] = mat(c, lora, fan_in=c)
            sd[f"{a}.a2"] = mat(lora, c, fan_in=lora)
            if i > 0:
                sd[f"{a}.v0"] = torch.randn(1, 1, c, generator=g)
                sd[f"{a}.v1"] = mat(c, lora, fan_in=c)
                sd[f"{a}.v2"] = mat(lora, c, fan_in=lora)
            sd[f"{a}.g1"] = mat(c, 2 * lora, fan_in=c)
            sd[f"{a}.g2"] = mat(2 * lora, c, fan_in=2 * lora)
            sd[f"{a}.k_k"] = torch.rand(1, 1, c, generator=g)
            sd[f"{a}.k_a"] = torch.rand(1, 1, c, generator=g)
            sd[f"{a}.r_k"] = 0.5 * torch.randn(h, n, generator=g)
            for name in ("receptance", "key", "value", "output"):
                sd[f"{a}.{name}.weight"] = lin(c, c)
            norm(f"{a}.ln_x", sd)
            sd[f"{p}.ffn.x_k"] = mix()
            sd[f"{p}.ffn.key.weight"] = lin(f, c)
            sd[f"{p}.ffn.value.weight"] = lin(c, f)
    norm("ln_out", sd)
    sd["head.weight"] = head_scale * mat(vocab, c, fan_in=c)
    return sd


def save_rwkv_pth(folder: str | Path, version: int, name: str | None = None, vocab_file: bool = True,
                  **kwargs: Any) -> Path:
    """Write random weights as ``folder/<name>.pth`` (and a tiny world vocabulary beside
    it); returns the ``.pth`` path. ``kwargs`` go to :func:`random_rwkv_weights`."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = kwargs.setdefault("vocab", 512)
    if vocab_file:
        write_tiny_world_vocab(folder / "rwkv_vocab_v20230424.txt", extra_tokens=min(200, vocab - 258))
    path = folder / f"{name or f'RWKV-x0{version}0-tiny-ctx512'}.pth"
    torch.save(random_rwkv_weights(version, **kwargs), path)
    return path


def save_rwkv_hf_folder(folder: str | Path, version: int, **kwargs: Any) -> Path:
    """The same random weights as a Hugging Face folder: RWKV's RWKV-6 layout
    (``rwkv.blocks.{i}.attention.*``) for 6, flash-linear-attention's RWKV-7 layout
    (``model.layers.{i}.attn.*``) for 7, with config.json, safetensors and the
    tokenizer files those releases ship (vocabulary text, tokenizer_config.json)."""
    from safetensors.torch import save_file

    from .rwkv_loading import to_hf_layout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = kwargs.setdefault("vocab", 512)
    sd = random_rwkv_weights(version, **kwargs)
    weights, config = to_hf_layout(sd, version)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tiny_world_vocab(folder / "rwkv_vocab_v20230424.txt", extra_tokens=min(200, vocab - 258))
    tok_config = {"tokenizer_class": "RwkvTokenizer", "use_fast": False,
                  "auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.RwkvTokenizer", None]},
                  "bos_token": "<|rwkv_tokenizer_end_of_text|>", "eos_token": "\n\n",
                  "unk_token": "<|rwkv_tokenizer_end_of_text|>", "pad_token": "<|rwkv_tokenizer_end_of_text|>",
                  "added_tokens_decoder": {"0": {"content": "<|rwkv_tokenizer_end_of_text|>", "special": True}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return folder


def blinkdl_reference(version: int, pth: str | Path) -> Any:
    """BlinkDL's own model (PyPI ``rwkv``) on ``pth``, in float32 on the CPU: the reference.

    ``rwkv.model`` picks RWKV-7 or RWKV-4..6 when it is imported (``RWKV_V7_ON``), so
    each version gets its own copy of the module, loaded from the installed file; the
    CUDA kernels stay off. Raises ImportError when ``rwkv`` is not installed.
    """
    import contextlib
    import importlib.util
    import io
    import os

    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.origin:
        raise ImportError("the reference needs the rwkv package: pip install rwkv")
    source = Path(spec.origin).parent / "model.py"
    os.environ["RWKV_CUDA_ON"] = "0"  # read at every forward, not only at import
    os.environ.setdefault("RWKV_JIT_ON", "0")
    before = os.environ.get("RWKV_V7_ON")
    try:
        if version == 7:
            os.environ["RWKV_V7_ON"] = "1"
        else:
            os.environ.pop("RWKV_V7_ON", None)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its loading steps
            module_spec = importlib.util.spec_from_file_location(f"_blinkdl_rwkv_v{version}", source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
            path = str(pth)
            # RWKV-7's class appends ".pth" itself; RWKV-6's only when it is missing
            return module.RWKV(model=path[:-4] if version == 7 and path.endswith(".pth") else path,
                               strategy="cpu fp32")
    finally:
        if before is None:
            os.environ.pop("RWKV_V7_ON", None)
        else:
            os.environ["RWKV_V7_ON"] = before
