"""Export a Mamba-2 model folder to GGUF (float32), for llama.cpp's ``llama-server``.

Why this exists: a user who serves models with llama.cpp needs the model as GGUF, and
this project's tests run a real ``llama-server`` on the shipped demo model to prove the
served engine (``oprm_rag.served``) against the in-process one. Written on PyPI's
``gguf`` package (the ``[served]`` extra); tensor names and metadata keys follow
llama.cpp's ``mamba2`` architecture.

What it writes, and why:

* **float32 only.** On the demo model f16 moves log-probs by up to 4.5e-3 and q8_0 by up
  to 0.18 nats, enough to change which chunk has the lowest entropy. Quantise afterwards
  with llama.cpp's own tools if you accept that.
* **The true training context** (``training_log.json``'s ``train_context_tokens``, else
  the config's ``max_position_embeddings``...) as ``mamba2.context_length``, never a
  placeholder: servers report it (llama-server's ``/v1/models`` ``n_ctx_train``) and
  ``chunk_tokens="auto"`` over a served model reads it from there.
* **The tokenizer** as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``).
  llama.cpp re-implements each pre-tokenizer in C++ and knows it by name, so the exporter
  must name one whose splits give the same tokens. A folder's pre-tokenizer is mapped
  only when that is known to hold: GPT-2's own (a plain byte-level split), or a
  tokenizer whose fingerprint is in :data:`KNOWN_PRE_TOKENIZERS` (the shipped demo
  model: it isolates single digits, which equals GPT-2's digit runs because its only
  digit merges are space+digit). Anything else needs ``pre_tokenizer=`` from a user who
  has checked. Even then llama.cpp tokenises a few strings differently (two or more
  whitespace characters, the last not a plain space, before a digit): the served engine
  always sends token ids, tokenised on the client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, ModelLoadError
from .user_files import check_output_file, exclusive_output, refuse_overwriting_inputs, replace_atomically

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import numpy as np

__all__ = ["export_gguf", "tokenizer_fingerprint", "training_context", "KNOWN_PRE_TOKENIZERS",
           "add_parser", "run"]

logger = logging.getLogger("oprm_rag")

#: Tokenizers (by :func:`tokenizer_fingerprint`) checked to tokenise like one of
#: llama.cpp's named pre-tokenizers. The shipped demo model's: digits are isolated by a
#: ``Split(" ?[0-9]")`` before the byte-level split, and its vocabulary's only digit
#: merges are space+digit, so GPT-2's digit runs give the same tokens (fuzzed: 18 of
#: 3,000 strings differ, all whitespace runs before a digit; ids are sent, never text).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "53d68edc98d65fc50173e71df531564d7059786bb00daa02861361d1decf8942": "gpt-2",
}

_GGUF_ARCH = "mamba2"
_TOKEN_NORMAL, _TOKEN_UNUSED, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4  # gguf.TokenType values


# ---------------------------------------------------------------------- folder facts
#: The largest context length GGUF stores (``mamba2.context_length`` is a uint32).
MAX_CONTEXT_LENGTH = 2**32 - 1


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from the model folder; anything else is the folder's problem, in one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: no {path.name} ({what}); is this a transformers model folder?") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: {what} is not UTF-8 text; restore it from the original model") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: {what} is not valid JSON (line {exc.lineno}: {exc.msg}); restore it from the "
                         "original model") from None
    except RecursionError:
        raise InputError(f"{path}: {what} is nested too deeply to be a real one; restore it from the original "
                         "model") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} holds a JSON {type(data).__name__}, not an object; restore it from the "
                         "original model")
    return data


def training_context(model_dir: str | Path, config: dict[str, Any] | None = None) -> int | None:
    """The context length the model was trained on: the folder's ``training_log.json``
    (``train_context_tokens``), else the config's position limit, else None."""
    model_dir = Path(model_dir)
    log = model_dir / "training_log.json"
    if log.is_file():
        try:
            value = int(json.loads(log.read_text(encoding="utf-8"))["train_context_tokens"])
            if value > 0:
                return value
        except (OSError, KeyError, IndexError, ValueError, TypeError, RecursionError):
            pass  # a log without a usable number: fall back to the config
    config = config if config is not None else _read_json(model_dir / "config.json", "the model config")
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "context_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def tokenizer_fingerprint(tokenizer_json: dict[str, Any]) -> str:
    """SHA-256 of what decides how text becomes ids: normalizer, pre-tokenizer, vocabulary
    and merges (canonical JSON). Two files with equal fingerprints tokenise alike."""
    model = tokenizer_json.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    key = {"normalizer": tokenizer_json.get("normalizer"), "pre_tokenizer": tokenizer_json.get("pre_tokenizer"),
           "type": model.get("type"), "vocab": model.get("vocab"), "merges": merges}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _is_plain_byte_level(pre: Any) -> bool:
    """GPT-2's own pre-tokenizer: one byte-level split with its regex, no prefix space."""
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def _pre_tokenizer_name(tok: dict[str, Any], override: str | None) -> str:
    if override is not None:
        if not isinstance(override, str) or not override.strip():
            raise InputError("pre_tokenizer must be a llama.cpp pre-tokenizer name such as 'gpt-2'")
        return override
    fp = tokenizer_fingerprint(tok)
    if fp in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[fp]
    if tok.get("normalizer") is None and _is_plain_byte_level(tok.get("pre_tokenizer")):
        return "gpt-2"
    _check_byte_level_bpe(tok)  # --pre-tokenizer cannot help a tokenizer of another kind
    raise InputError(
        f"this tokenizer's pre-tokenizer ({json.dumps(tok.get('pre_tokenizer'))[:200]}) is not one llama.cpp is "
        f"known to reproduce (fingerprint {fp}). If you have checked that one of llama.cpp's named "
        "pre-tokenizers splits text into the same tokens, pass it: pre_tokenizer='gpt-2' (CLI: --pre-tokenizer). "
        "The served engine sends token ids, so only the server's own text tokenisation is affected.")


def _check_byte_level_bpe(tok: dict[str, Any]) -> None:
    """Only byte-level BPE exports (llama.cpp's ``gpt2`` tokenizer model): say so first, so a
    WordPiece or Unigram tokenizer is never told to try ``--pre-tokenizer``."""
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    kind = model.get("type")
    if kind != "BPE":
        raise InputError(f"the tokenizer is {kind or 'of an unknown kind'!r}; this exporter writes only byte-level "
                         "BPE tokenizers (GPT-2 style), so this model cannot be exported by oprm-rag (no option "
                         "changes that; llama.cpp's own convert_hf_to_gguf.py knows more tokenizer kinds)")
    decoder = tok.get("decoder") if isinstance(tok.get("decoder"), dict) else {}
    if decoder.get("type") != "ByteLevel":
        raise InputError(f"the tokenizer is BPE but not byte-level (decoder {decoder.get('type')!r}); this exporter "
                         "writes only byte-level BPE tokenizers (GPT-2 style), and no option changes that")


def _vocabulary(tok: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings, llama.cpp token types and merges, for ``n_vocab`` embedding rows."""
    _check_byte_level_bpe(tok)
    model = tok["model"]
    by_id: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    special: dict[int, bool] = {}
    for added in tok.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        special[int(added["id"])] = bool(added.get("special"))
    if not by_id or max(by_id) >= n_vocab:
        raise ModelLoadError(f"the tokenizer has ids up to {max(by_id, default=-1)}, the model only {n_vocab} "
                             "embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(_TOKEN_CONTROL if special[i] else _TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def _special_ids(model_dir: Path, tok: dict[str, Any], config: dict[str, Any]) -> dict[str, int]:
    """bos/eos/pad ids: the tokenizer config's token strings, else the model config's ids."""
    ids = {a["content"]: int(a["id"]) for a in tok.get("added_tokens") or []}
    ids.update({t: int(i) for t, i in ((tok.get("model") or {}).get("vocab") or {}).items()})
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path, "the tokenizer config") if tcfg_path.is_file() else {}
    out: dict[str, int] = {}
    for role in ("bos", "eos", "pad", "unk"):
        value = tcfg.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            out[role] = ids[value]
        elif isinstance(config.get(f"{role}_token_id"), int):
            out[role] = int(config[f"{role}_token_id"])
    return out


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tcfg_path = model_dir / "tokenizer_config.json"
    if tcfg_path.is_file():
        value = _read_json(tcfg_path, "the tokenizer config").get("chat_template")
        if isinstance(value, str):
            return value
    return None


# ---------------------------------------------------------------------- weights
def _load_weights(model_dir: Path) -> dict[str, "np.ndarray"]:
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (export needs safetensors, not .bin)")
    out: dict[str, Any] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as exc:  # safetensors raises its own types for truncated files
            raise ModelLoadError(f"{f}: unreadable safetensors file ({exc})") from exc
        for name, value in part.items():
            out[name.removeprefix("model.")] = value  # Codestral-style names: model.backbone...
    return out


def _hparams(config: dict[str, Any], weights: dict[str, "np.ndarray"]) -> dict[str, Any]:
    """The Mamba-2 sizes llama.cpp needs, checked against what its ``mamba2`` graph computes."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "mamba2" and "Mamba2ForCausalLM" not in archs:
        raise InputError(f"only Mamba-2 models export (model_type 'mamba2'); this folder holds "
                         f"{config.get('model_type') or archs or 'an unknown model'}")
    d_model = int(config["hidden_size"])
    expand = int(config.get("expand", 2))
    d_inner = expand * d_model
    head_dim = int(config.get("head_dim", 64))
    n_heads = int(config.get("num_heads", d_inner // head_dim))
    if n_heads * head_dim != d_inner:
        raise InputError(f"num_heads*head_dim ({n_heads}*{head_dim}) != expand*hidden_size ({d_inner}): llama.cpp's "
                         "mamba2 derives the head size from d_inner / heads and would compute another model")
    if config.get("use_bias"):
        raise InputError("use_bias=True (biases on in_proj/out_proj): llama.cpp's mamba2 has no such biases")
    limit = config.get("time_step_limit")
    if isinstance(limit, (list, tuple)) and len(limit) == 2:
        low, high = (float(v.get("__float__")) if isinstance(v, dict) else float(v) for v in limit)
        if low > 0 or math.isfinite(high):
            raise InputError(f"time_step_limit={limit}: llama.cpp's mamba2 does not clamp dt; the export would "
                             "compute another model")
    n_layers = int(config["num_hidden_layers"])
    if "backbone.embeddings.weight" not in weights:
        raise ModelLoadError("no backbone.embeddings.weight in the weights: not a Mamba2ForCausalLM checkpoint")
    return {"d_model": d_model, "d_inner": d_inner, "n_heads": n_heads, "n_layers": n_layers,
            "d_state": int(config.get("state_size", 128)), "d_conv": int(config.get("conv_kernel", 4)),
            "n_groups": int(config.get("n_groups", 1)), "eps": float(config.get("layer_norm_epsilon", 1e-5)),
            "n_vocab": int(weights["backbone.embeddings.weight"].shape[0]),
            "tied": bool(config.get("tie_word_embeddings", True))}


def _tensors(weights: dict[str, "np.ndarray"], hp: dict[str, Any]) -> list[tuple[str, "np.ndarray"]]:
    """(GGUF name, float32 array in the orientation llama.cpp reads) for every weight."""
    import numpy as np

    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    taken: set[str] = set()

    def take(name: str) -> "np.ndarray":
        if name not in weights:
            raise ModelLoadError(f"missing weight {name!r}: not a complete Mamba2ForCausalLM checkpoint")
        taken.add(name)
        return weights[name]

    out = [("token_embd.weight", f32(take("backbone.embeddings.weight"))),
           ("output_norm.weight", f32(take("backbone.norm_f.weight")))]
    if "lm_head.weight" in weights:
        head = take("lm_head.weight")
        if not (hp["tied"] and np.array_equal(head, weights["backbone.embeddings.weight"])):
            out.append(("output.weight", f32(head)))  # llama.cpp reuses token_embd when this is absent
    for i in range(hp["n_layers"]):
        p = f"backbone.layers.{i}."
        b = f"blk.{i}."
        conv = take(p + "mixer.conv1d.weight")
        conv_bias = weights.get(p + "mixer.conv1d.bias")
        if conv_bias is None:  # use_conv_bias=False: llama.cpp wants a bias, zeros are the same model
            conv_bias = np.zeros(conv.shape[0], dtype=np.float32)
        else:
            taken.add(p + "mixer.conv1d.bias")
        out += [
            (b + "attn_norm.weight", f32(take(p + "norm.weight"))),
            (b + "ssm_in.weight", f32(take(p + "mixer.in_proj.weight"))),
            (b + "ssm_conv1d.weight", f32(conv.reshape(conv.shape[0], conv.shape[-1]))),
            (b + "ssm_conv1d.bias", f32(conv_bias)),
            (b + "ssm_dt.bias", f32(take(p + "mixer.dt_bias"))),
            # llama.cpp stores A itself (not its log) and A, D as [heads, 1]
            (b + "ssm_a", f32(-np.exp(take(p + "mixer.A_log").astype(np.float64))).reshape(-1, 1)),
            (b + "ssm_d", f32(take(p + "mixer.D")).reshape(-1, 1)),
            (b + "ssm_norm.weight", f32(take(p + "mixer.norm.weight")).reshape(hp["n_groups"], -1)),
            (b + "ssm_out.weight", f32(take(p + "mixer.out_proj.weight"))),
        ]
    left = sorted(set(weights) - taken)
    if left:
        raise ModelLoadError(f"weights the export does not know where to put: {left[:6]}; the model has parts "
                             "llama.cpp's mamba2 does not compute")
    return out


# ---------------------------------------------------------------------- export
def export_gguf(model_dir: str | Path, out_path: str | Path, *, pre_tokenizer: str | None = None,
                context_length: int | None = None, name: str | None = None) -> Path:
    """Write ``model_dir`` (a ``Mamba2ForCausalLM`` folder with a byte-level BPE
    ``tokenizer.json``) to ``out_path`` as float32 GGUF; return the path.

    ``pre_tokenizer`` names llama.cpp's pre-tokenizer for tokenizers this module does not
    know (see the module docstring); ``context_length`` overrides the recorded training
    context (default: the folder's own, see :func:`training_context`).
    """
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError("GGUF export needs the 'gguf' package: pip install 'oprm-rag[served]'") from exc

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: not a folder; pass a transformers model folder (config.json, "
                         "model.safetensors, tokenizer.json)")
    if context_length is not None:
        _check_context_length(context_length)
    out_path = _check_output(model_dir, Path(out_path))  # before the weights are read: fail in a second
    config = _read_json(model_dir / "config.json", "the model config")
    tok = _read_json(model_dir / "tokenizer.json", "the tokenizer (tokenizer.json)")
    weights = _load_weights(model_dir)
    try:
        hp = _hparams(config, weights)
        tokens, types, merges = _vocabulary(tok, hp["n_vocab"])
        pre = _pre_tokenizer_name(tok, pre_tokenizer)
        specials = _special_ids(model_dir, tok, config)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{model_dir}: config.json or tokenizer.json is not in the shape a Mamba-2 model's is "
                         f"({type(exc).__name__}: {exc}); restore them from the original model") from None
    ctx = context_length if context_length is not None else training_context(model_dir, config)
    if ctx is None:
        raise InputError(f"{model_dir} records no training context (training_log.json or max_position_embeddings); "
                         "pass context_length= (CLI: --context-length) with the length the model was trained on")
    _check_context_length(ctx)
    try:
        tensors = _tensors(weights, hp)
    except (IndexError, TypeError, ValueError) as exc:  # a weight of a shape config.json does not describe
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{model_dir}: the weights do not have the shapes config.json describes "
                         f"({type(exc).__name__}: {exc}); check that config.json belongs to these weights") from None
    with exclusive_output(out_path, "export-gguf"), replace_atomically(out_path, "cannot write the GGUF file") as tmp:
        _write(gguf, tmp, model_dir, name, int(ctx), hp, pre, tokens, types, merges, specials, tensors)
    logger.info("exported %s -> %s (mamba2, f32, context %d, pre-tokenizer %s)", model_dir, out_path, ctx, pre)
    return out_path


def _check_context_length(ctx: Any) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 0 < ctx <= MAX_CONTEXT_LENGTH:
        raise InputError(f"context_length must be a whole number from 1 to {MAX_CONTEXT_LENGTH:,} (GGUF stores it "
                         f"as 32 bits), got {ctx!r}")


def _model_inputs(model_dir: Path) -> list[Path]:
    """Every file of the model folder the export reads (the output must be none of them)."""
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "training_log.json")
    files = [model_dir / n for n in names if (model_dir / n).exists()]
    return files + sorted(model_dir.glob("*.safetensors"))


def _check_output(model_dir: Path, out_path: Path) -> Path:
    """The output can be written, and is not one of the model's own files."""
    if out_path.is_dir():
        raise InputError(f"{out_path} is a folder; pass the .gguf file to write")
    refuse_overwriting_inputs([out_path], _model_inputs(model_dir), f"export-gguf {out_path}")
    return check_output_file(out_path, "export-gguf: the output")


def _write(gguf: Any, tmp: Path, model_dir: Path, name: str | None, ctx: int, hp: dict[str, Any], pre: str,
           tokens: list[str], types: list[int], merges: list[str], specials: dict[str, int],
           tensors: list[tuple[str, "np.ndarray"]]) -> None:
    """The GGUF file itself, written to ``tmp``."""
    writer = gguf.GGUFWriter(str(tmp), _GGUF_ARCH)
    try:
        writer.add_name(name or model_dir.resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(ctx)
        writer.add_embedding_length(hp["d_model"])
        writer.add_feed_forward_length(0)  # unused by mamba2, but llama.cpp reads the key
        writer.add_head_count(0)
        writer.add_block_count(hp["n_layers"])
        writer.add_ssm_conv_kernel(hp["d_conv"])
        writer.add_ssm_inner_size(hp["d_inner"])
        writer.add_ssm_state_size(hp["d_state"])
        writer.add_ssm_time_step_rank(hp["n_heads"])
        writer.add_ssm_group_count(hp["n_groups"])
        writer.add_layer_norm_rms_eps(hp["eps"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for role, tid in specials.items():
            getattr(writer, f"add_{role}_token_id")(tid)
        writer.add_add_bos_token(False)  # the HF tokenizer adds no BOS: ids must match it
        template = _chat_template(model_dir)
        if template:
            writer.add_chat_template(template)
        for tname, array in tensors:
            writer.add_tensor(tname, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers: "argparse._SubParsersAction") -> "argparse.ArgumentParser":
    """``oprm-rag export-gguf MODEL_DIR OUT.gguf``."""
    p = subparsers.add_parser("export-gguf", help="export a Mamba-2 model folder to GGUF (f32) for llama.cpp",
                              description="Export a Mamba2ForCausalLM folder (byte-level BPE tokenizer) to a "
                                          "float32 GGUF file that llama.cpp's llama-server loads as 'mamba2'.")
    p.add_argument("model_dir", help="the model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--pre-tokenizer", default=None,
                   help="llama.cpp pre-tokenizer name for a tokenizer the exporter does not know (e.g. gpt-2)")
    p.add_argument("--context-length", type=_context_arg, default=None,
                   help="training context to record (default: the folder's own)")
    p.set_defaults(func=run)
    return p


def _context_arg(value: str) -> int:
    import argparse

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {value!r}") from None
    if not 0 < n <= MAX_CONTEXT_LENGTH:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_CONTEXT_LENGTH:,} tokens (GGUF stores 32 bits), got {n}")
    return n


def run(args: "argparse.Namespace") -> int:
    path = export_gguf(args.model_dir, args.out, pre_tokenizer=args.pre_tokenizer,
                       context_length=args.context_length)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
