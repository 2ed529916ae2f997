"""Load RWKV-6 / RWKV-7 weights natively: BlinkDL ``.pth`` files and Hugging Face folders.

Three layouts are read, all into BlinkDL's own key names (:class:`RwkvNativeModel`):

* **BlinkDL ``.pth``** (``RWKV-x060-World-1B6-...-ctx4096.pth``, ``rwkv7-g1-...pth``): the
  keys as trained (``emb.weight``, ``blocks.{i}.att.time_maa_x``, ``blocks.{i}.att.w1``...).
  RWKV-6 is told by ``att.time_maa_*``, RWKV-7 by ``att.r_k``; RWKV-4/5 files are
  refused (RWKV-4 runs through transformers' ``RwkvForCausalLM``).
* **RWKV's RWKV-6 folders** (``RWKV/v6-Finch-*-HF``, ``RWKV/rwkv-6-world-*``; config
  ``model_type: "rwkv6"``): ``rwkv.embeddings``, ``rwkv.blocks.{i}.pre_ln/ln1/ln2``,
  ``.attention.*`` and ``.feed_forward.*`` (BlinkDL's sub-names and shapes),
  ``rwkv.ln_out``, ``head``.
* **flash-linear-attention RWKV-7 folders** (``fla-hub/rwkv7-*``, config ``model_type:
  "rwkv7"``): ``model.embeddings``, ``model.layers.{i}.pre_norm/attn_norm/ffn_norm``,
  ``.attn.{r,k,v,o}_proj``, the LoRAs as ``.attn.{w,a,v,g}_lora.lora.{0,2}`` (transposed,
  the bias being ``w0/a0/v0``), ``.attn.g_norm``, ``.ffn.key/value/x_k``, ``model.norm``,
  ``lm_head`` (the mapping of fla's ``utils/convert_from_rwkv7.py``, inverted).

Tokenizer: the RWKV "world" vocabulary those releases ship (``rwkv_vocab_v20230424.txt``),
from the folder, from beside the ``.pth``, or from the ``rwkv`` package if installed
(:mod:`oprm_rag.rwkv_tokenizer`). Anything these layouts do not cover (hybrid attention
layers in an fla config, DeepEmbed weights, unknown keys) is refused by name: such a
folder still runs through transformers with ``trust_remote_code=True``, on the replay
backend.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

__all__ = ["NotNativeLayout", "is_native_rwkv", "load_rwkv", "load_native", "hub_folder", "native_model",
           "detect_version", "to_hf_layout", "NATIVE_MODEL_TYPES"]

logger = logging.getLogger("oprm_rag")

#: config.json model types read natively (RWKV's RWKV-6 folders; fla's RWKV-7 folders).
NATIVE_MODEL_TYPES = ("rwkv6", "rwkv7", "rwkv7_fla")
_VOCAB_GLOB = "rwkv_vocab_*.txt"


class NotNativeLayout(ModelLoadError):
    """The weights are not a layout read natively (an older RWKV, a hybrid, unknown keys):
    with ``trust_remote_code`` such a folder may still run through transformers."""
_WORLD_VOCAB = 65536


# ---------------------------------------------------------------------------- what is native
def is_native_rwkv(path: Path) -> bool:
    """True for a ``.pth`` file, or a folder whose config.json names RWKV-6/7 (read natively)."""
    if path.is_file():
        return path.suffix == ".pth"
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False  # check_model_folder explains a broken config
    return model_type in NATIVE_MODEL_TYPES


def hub_folder(name: str, hf_kwargs: dict[str, Any]) -> Path | None:
    """The local snapshot of hub repository ``name`` when its config.json names RWKV-6/7
    (``fla-hub/rwkv7-1.5B-world``, ``RWKV/v6-Finch-1B6-HF``), else None.

    The Hugging Face cache is read first; the hub is asked only when downloads are on and
    it can be reached (then config.json first, the weights and tokenizer files only for an
    RWKV-6/7 repository). Anything else returns None and goes through transformers as before.
    """
    from .model_files import _hub_offline, _hub_unreachable, _looks_local

    if _looks_local(name) or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    kw = {k: hf_kwargs[k] for k in ("revision", "token", "cache_dir") if hf_kwargs.get(k) is not None}
    offline = bool(hf_kwargs.get("local_files_only")) or _hub_offline()
    config = None
    for local_only in (True, False):
        if not local_only and (offline or _hub_unreachable() is not None):
            return None
        try:
            config = Path(hf_hub_download(name, "config.json", local_files_only=local_only, **kw))
            break
        except Exception:  # noqa: BLE001 - not cached / not a repository / no network: not ours to decide
            continue
    if config is None or not is_native_rwkv(config.parent):
        return None
    patterns = ["*.json", "*.safetensors", "rwkv_vocab_*.txt", "*.bin"]
    for local_only in (True, False):
        if not local_only and offline:
            break
        try:
            folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only, **kw))
        except Exception:  # noqa: BLE001
            continue
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            return folder
    return config.parent  # weights missing: the folder checks say which


def detect_version(weights: dict[str, Any]) -> int:
    """6 or 7 from BlinkDL key names; ModelLoadError for anything else."""
    if "blocks.0.att.r_k" in weights:
        return 7
    if any(k.startswith("blocks.0.att.time_maa") for k in weights):
        return 6
    if "emb.weight" in weights and any(k.startswith("blocks.0.att.time_") for k in weights):
        raise NotNativeLayout("this is an RWKV-4 or RWKV-5 checkpoint; only RWKV-6 and RWKV-7 .pth files load "
                             "natively (RWKV-4 runs from a transformers RwkvForCausalLM folder)")
    raise NotNativeLayout("not an RWKV-6/7 checkpoint: no blocks.0.att.time_maa_* (RWKV-6) or "
                         "blocks.0.att.r_k (RWKV-7) weights")


def _expected_keys(version: int, layers: int, has_ln0: bool) -> set[str]:
    keys = {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight"}
    if has_ln0:
        keys |= {"blocks.0.ln0.weight", "blocks.0.ln0.bias"}
    for i in range(layers):
        p = f"blocks.{i}"
        keys |= {f"{p}.{ln}.{wb}" for ln in ("ln1", "ln2", "att.ln_x") for wb in ("weight", "bias")}
        if version == 6:
            att = [f"time_maa_{n}" for n in ("x", "w", "k", "v", "r", "g", "w1", "w2")]
            att += ["time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa"]
            att += [f"{n}.weight" for n in ("receptance", "key", "value", "gate", "output")]
            ffn = ["time_maa_k", "time_maa_r", "key.weight", "receptance.weight", "value.weight"]
        else:
            att = [f"x_{n}" for n in ("r", "w", "k", "v", "a", "g")]
            att += ["w0", "w1", "w2", "a0", "a1", "a2", "g1", "g2", "k_k", "k_a", "r_k"]
            att += [] if i == 0 else ["v0", "v1", "v2"]
            att += [f"{n}.weight" for n in ("receptance", "key", "value", "output")]
            ffn = ["x_k", "key.weight", "value.weight"]
        keys |= {f"{p}.att.{k}" for k in att} | {f"{p}.ffn.{k}" for k in ffn}
    return keys


def _names(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def native_model(weights: dict[str, Any], *, name: str = "", source_format: str = "pth",
                 context_length: int | None = None, ln_x_eps: float | None = None,
                 layer_norm_epsilon: float = 1e-5, dtype: Any = None, special: dict[str, int] | None = None) -> Any:
    """An :class:`RwkvNativeModel` from a BlinkDL-named state dict, checked key by key."""
    import torch

    from .rwkv_model import LN_X_EPS, RwkvNativeConfig, RwkvNativeModel

    version = detect_version(weights)
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    weights = dict(weights)
    if version == 7:  # BlinkDL's reference ignores layer 0's value LoRA; so do we
        for k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            weights.pop(k, None)
    expected = _expected_keys(version, layers, "blocks.0.ln0.weight" in weights)
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else [])
        hint = (" (DeepEmbed weights: this RWKV-7 variant is not supported natively)"
                if any(".s_emb" in k or ".s0" in k for k in unexpected) else "")
        raise NotNativeLayout(f"{name or 'the checkpoint'}: the weights are not an RWKV-{version} model "
                             f"BlinkDL's layout describes: {', '.join(parts)}{hint}")
    vocab, hidden = (int(s) for s in weights["emb.weight"].shape)
    if version == 7:
        heads, head_size = (int(s) for s in weights["blocks.0.att.r_k"].shape)
    else:
        heads, head_size = (int(s) for s in weights["blocks.0.att.time_faaaa"].shape)
    if heads * head_size != hidden:
        raise ModelLoadError(f"{name}: {heads} heads of {head_size} do not make the hidden size {hidden}")
    target = dtype if dtype is not None and dtype != "auto" else weights["emb.weight"].dtype
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise ModelLoadError(f"{name}: cannot run in {target}")
    tensors = {k: _as_tensor(v, k, name).to(target) for k, v in weights.items()}
    special = special or {}
    config = RwkvNativeConfig(
        version=version, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads,
        head_size=head_size, intermediate_size=int(tensors["blocks.0.ffn.key.weight"].shape[0]),
        layer_norm_epsilon=layer_norm_epsilon, ln_x_eps=LN_X_EPS if ln_x_eps is None else ln_x_eps,
        context_length=context_length, source_format=source_format, _name_or_path=name,
        bos_token_id=special.get("bos", 0), eos_token_id=special.get("eos", 0), pad_token_id=special.get("pad", 0))
    model = RwkvNativeModel.from_state_dict(config, tensors)
    try:  # a dry run: shapes that do not fit each other fail here, by name, not mid-answer
        model(torch.zeros(1, 2, dtype=torch.long))
    except RuntimeError as exc:
        raise ModelLoadError(f"{name}: the RWKV-{version} weights do not fit together "
                             f"({' '.join(str(exc).split())[:200]})") from exc
    if target == torch.float16 and version == 6:
        logger.warning("%s: RWKV-6 in float16 can overflow in deep layers (BlinkDL's reference rescales the "
                       "residual every 6 layers in fp16, which this backend does not); prefer bfloat16 or "
                       "float32", name)
    return model


def _as_tensor(value: Any, key: str, name: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ModelLoadError(f"{name}: {key} is not a floating-point tensor")
    return value


# ---------------------------------------------------------------------------- HF layouts
def _from_rwkv_hf(weights: dict[str, Any]) -> dict[str, Any]:
    """RWKV's RWKV-6 HF names -> BlinkDL's (same shapes)."""
    out = {}
    for key, value in weights.items():
        k = key
        for old, new in (("rwkv.embeddings.", "emb."), ("rwkv.ln_out.", "ln_out."), ("rwkv.blocks.", "blocks."),
                         (".pre_ln.", ".ln0."), (".attention.", ".att."), (".feed_forward.", ".ffn.")):
            k = k.replace(old, new) if (old.startswith(".") or k.startswith(old)) else k
        out[k] = value
    return out


_FLA_TOP = {"model.embeddings.weight": "emb.weight", "model.embed_tokens.weight": "emb.weight",
            "model.norm.weight": "ln_out.weight", "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_FLA_PART = {"attn": "att", "ffn": "ffn", "pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_FLA_LORA = {"lora.2.bias": "0", "lora.0.weight": "1", "lora.2.weight": "2"}


def _from_fla(weights: dict[str, Any]) -> dict[str, Any]:
    """flash-linear-attention's RWKV-7 names -> BlinkDL's (LoRAs transposed, vectors (1, 1, C))."""
    out = {}
    for key, value in weights.items():
        if key in _FLA_TOP:
            out[_FLA_TOP[key]] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key)
        if m is None or m.group(2) not in _FLA_PART:
            raise NotNativeLayout(f"unexpected weight {key!r} for an fla RWKV-7 model")
        layer, part, rest = m.group(1), _FLA_PART[m.group(2)], m.group(3)
        if part == "att" and rest == "x_x":  # fla's first RWKV-7 layout: the six token-shift mixes stacked
            for name, row in zip("rwkvag", value.reshape(6, -1)):
                out[f"blocks.{layer}.att.x_{name}"] = row.reshape(1, 1, -1)
            continue
        lora = re.fullmatch(r"([wavg])_lora\.(.+)", rest)
        if part == "att" and lora is not None and lora.group(2) in _FLA_LORA:
            num = _FLA_LORA[lora.group(2)]
            rest = lora.group(1) + num
            value = value.t() if num in ("1", "2") else value.reshape(1, 1, -1)
        else:
            head, _, tail = rest.partition(".")
            if part == "att" and head in _FLA_PROJ:
                rest = f"{_FLA_PROJ[head]}.{tail}"
            elif rest in ("x_k", "k_k", "k_a") or re.fullmatch(r"x_[rwkvag]", rest):
                value = value.reshape(1, 1, -1)
        out[f"blocks.{layer}.{part}.{rest}"] = value
    return out


def to_hf_layout(weights: dict[str, Any], version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """BlinkDL-named weights in the HF layout of ``version`` and a config.json for them
    (what RWKV's RWKV-6 and fla's RWKV-7 releases hold); the inverse of the loader."""
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    vocab, hidden = (int(s) for s in weights["emb.weight"].shape)
    ffn = int(weights["blocks.0.ffn.key.weight"].shape[0])
    if version == 6:
        out = {}
        for k, v in weights.items():
            k = {"emb.weight": "rwkv.embeddings.weight", "ln_out.weight": "rwkv.ln_out.weight",
                 "ln_out.bias": "rwkv.ln_out.bias"}.get(k, k)
            if k.startswith("blocks."):
                k = ("rwkv." + k).replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.").replace(
                    ".ffn.", ".feed_forward.")
            out[k] = v
        heads, head_size = (int(s) for s in weights["blocks.0.att.time_faaaa"].shape)
        config = {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "vocab_size": vocab,
                  "hidden_size": hidden, "num_hidden_layers": layers, "attention_hidden_size": hidden,
                  "head_size": head_size, "head_size_divisor": 8, "intermediate_size": ffn,
                  "layer_norm_epsilon": 1e-5, "rescale_every": 6, "tie_word_embeddings": False,
                  "bos_token_id": 0, "eos_token_id": 0, "context_length": 4096}
        return out, config
    inv_top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
               "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    inv_part = {v: k for k, v in _FLA_PART.items()}
    inv_proj = {v: k for k, v in _FLA_PROJ.items()}
    inv_lora = {v: k for k, v in _FLA_LORA.items()}
    out = {}
    for k, v in weights.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        _, layer, part, rest = k.split(".", 3)
        if k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        if part == "att" and re.fullmatch(r"[wavg][012]", rest):
            rest = f"{rest[0]}_lora.{inv_lora[rest[1]]}"
            v = v.t() if k[-1] in "12" else v.reshape(-1)
        else:
            head, _, tail = rest.partition(".")
            if part == "att" and head in inv_proj:
                rest = f"{inv_proj[head]}.{tail}"
            elif rest in ("x_k", "k_k", "k_a") and not (part == "att" and rest == "x_k"):
                v = v.reshape(-1)
        out[f"model.layers.{layer}.{inv_part[part]}.{rest}"] = v
    heads, head_size = (int(s) for s in weights["blocks.0.att.r_k"].shape)
    config = {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "vocab_size": vocab,
              "hidden_size": hidden, "num_hidden_layers": layers, "head_dim": head_size, "intermediate_size": ffn,
              "hidden_ratio": ffn / hidden, "decay_low_rank_dim": int(weights["blocks.0.att.w1"].shape[1]),
              "gate_low_rank_dim": int(weights["blocks.0.att.g1"].shape[1]),
              "a_low_rank_dim": int(weights["blocks.0.att.a1"].shape[1]),
              "v_low_rank_dim": int(weights.get("blocks.1.att.v1", weights["blocks.0.att.a1"]).shape[1]),
              "norm_first": True, "norm_bias": True, "norm_eps": 1e-5, "attn": None, "fuse_norm": False,
              "value_dim": [hidden] * layers, "tie_word_embeddings": False, "max_position_embeddings": 4096,
              "bos_token_id": 0, "eos_token_id": 0}
    return out, config


# ---------------------------------------------------------------------------- files
def _read_pth(path: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelLoadError(f"{path}: cannot be read as a torch checkpoint ({' '.join(str(exc).split())[:200]}); "
                             "download it again") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict) and "emb.weight" not in data:
            data = data[wrapper]
    if not isinstance(data, dict) or "emb.weight" not in data:
        raise ModelLoadError(f"{path}: not an RWKV checkpoint (no emb.weight)")
    return data


def _read_folder_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        out: dict[str, Any] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("*.pth"))
    if not bins:
        raise ModelLoadError(f"{folder}: no weights (*.safetensors, pytorch_model*.bin)")
    out = {}
    for f in bins:
        out.update(_read_pth(f) if f.suffix == ".pth" else _load_bin(f))
    return out


def _load_bin(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _context_from_name(name: str) -> int | None:
    m = re.search(r"ctx(\d+)", name)
    return int(m.group(1)) if m else None


def _world_vocab_file(near: Path, vocab_size: int) -> Path | None:
    found = sorted(near.glob(_VOCAB_GLOB))
    if found:
        return found[-1]
    if vocab_size == _WORLD_VOCAB:
        spec = importlib.util.find_spec("rwkv")
        if spec is not None and spec.origin:
            shipped = Path(spec.origin).parent / "rwkv_vocab_v20230424.txt"
            if shipped.is_file():
                return shipped
    return None


def _tokenizer_for(folder: Path, vocab_size: int, name: str) -> Any:
    from .rwkv_tokenizer import RwkvWorldTokenizer

    vocab = _world_vocab_file(folder, vocab_size)
    if vocab is not None:
        return RwkvWorldTokenizer.from_folder(folder, vocab_file=vocab)
    for json_name in ("tokenizer.json", "20B_tokenizer.json"):  # RWKV Pile models: GPT-NeoX's tokenizer
        if (folder / json_name).is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(folder / json_name), eos_token="<|endoftext|>")
    raise ModelLoadError(f"{name}: no tokenizer: RWKV world models use the vocabulary file rwkv_vocab_v20230424.txt; "
                         f"put it next to the weights (it ships with the Hugging Face releases and with "
                         f"`pip install rwkv`)")


def load_rwkv(path: Path, *, dtype: Any = None, device: Any = None, trust_remote_code: bool = False,
              **_ignored: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a BlinkDL ``.pth`` file or an RWKV-6/7 HF folder."""
    name = str(path)
    if path.is_file():
        weights = _read_pth(path)
        model = native_model(weights, name=name, context_length=_context_from_name(path.name), dtype=dtype)
        tokenizer = _tokenizer_for(path.parent, model.config.vocab_size, name)
    else:
        from .model_files import check_model_folder

        config = check_model_folder(path)
        if config.get("attn"):
            raise NotNativeLayout(f"{name}: this fla RWKV-7 config has attention layers ({config['attn']}); "
                                 "hybrids are not read natively")
        raw = _read_folder_weights(path)
        fla = any(k.startswith("model.layers.") for k in raw)
        weights = _from_fla(raw) if fla else _from_rwkv_hf(raw) if any(k.startswith("rwkv.") for k in raw) else raw
        if fla:
            head_dim = config.get("head_dim") or int(weights["blocks.0.att.r_k"].shape[1])
            ln_x_eps = float(head_dim) * float(config.get("norm_eps", 1e-5))  # fla's g_norm eps
            eps = float(config.get("norm_eps", 1e-5))
        else:
            ln_x_eps = 1e-5 * float(config.get("head_size_divisor", 8)) ** 2
            eps = float(config.get("layer_norm_epsilon", 1e-5))
        context = config.get("context_length") or config.get("max_position_embeddings")
        tokenizer = None
        model = native_model(weights, name=name, source_format="fla" if fla else "rwkv-hf",
                             context_length=int(context) if isinstance(context, int) else None,
                             ln_x_eps=ln_x_eps, layer_norm_epsilon=eps, dtype=dtype)
        tokenizer = _tokenizer_for(path, model.config.vocab_size, name)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = getattr(tokenizer, "bos_token_id", 0)
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ModelLoadError(f"could not move {name!r} to {device!r}: {' '.join(str(exc).split())}") from exc
    if trust_remote_code:
        logger.info("%s: RWKV-%d read natively (exact states); trust_remote_code is not needed", name,
                    model.config.version)
    return model.eval(), tokenizer


def load_native(path: Path, *, dtype: Any = None, device: Any = None, trust_remote_code: bool = False
                ) -> tuple[Any, Any] | None:
    """:func:`load_rwkv`, or None where a folder is not readable natively but
    ``trust_remote_code`` lets transformers run it (its own remote code, on the replay
    backend): that is said in one log line. Without ``trust_remote_code`` the reason is raised."""
    try:
        return load_rwkv(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except NotNativeLayout as exc:
        if not path.is_dir():
            raise
        if not trust_remote_code:
            raise ModelLoadError(f"{exc}. If the folder ships its own modeling code, trust_remote_code=True runs "
                                 "that instead (token-replay backend, no exact state reuse)") from exc
        logger.warning("%s: not read natively (%s); running its remote code through transformers instead, on the "
                       "token-replay backend (no exact state reuse)", path, exc)
        return None
