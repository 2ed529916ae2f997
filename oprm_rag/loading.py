"""Load a model and its tokenizer, or fail with a message that says what is wrong.

transformers is lenient where we cannot be: weights that do not match the architecture
are initialised at random with a printed report, a folder without tokenizer files gets
an empty tokenizer, and a hub name without a network retries for half a minute before
a traceback. A random model then answers gibberish with a straight face. So
:func:`load_model_and_tokenizer` checks before and after transformers loads:

* before, for a local folder: ``config.json`` is a JSON object with a ``model_type``;
  some tokenizer file is there; every safetensors weights file (and every shard an
  index names) is present and exactly as long as its header says (a truncated download
  is named, file by file);
* after: the loading info (``output_loading_info=True``) has no missing, unexpected or
  wrongly-shaped weights and no load errors (weights tied to the embeddings are not
  missing: transformers reports them as loaded), and the tokenizer turns text into
  tokens. ``allow_missing_weights=True`` is the explicit opt-in to load anyway;
* a name that is not a local folder is looked up in the Hugging Face cache first; if it
  is not there and downloads are off (``HF_HUB_OFFLINE``) or the hub cannot be reached,
  one line says so instead of retries and a traceback;
* ``device_map`` needs accelerate; without it the error names the extra to install.

Every failure is a :class:`~oprm_rag.errors.ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .model_files import (GGUF_EXTRA, _hub_offline, _hub_unreachable, _looks_local, _names, _one_line, _SHOW,
                          check_gguf_file, check_model_folder)

__all__ = ["load_model_and_tokenizer", "check_model_folder", "check_gguf_file", "ACCELERATE_EXTRA", "GGUF_EXTRA"]

logger = logging.getLogger("oprm_rag")

#: The optional extra that installs accelerate (needed by ``device_map``).
ACCELERATE_EXTRA = "accelerate"

_TOKENIZER_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "gguf_file", "subfolder")


# ---------------------------------------------------------------------------- loading
def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto":
        return dtype
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        from .errors import OptionError

        raise OptionError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def _check_tokenizer(tokenizer: Any, name: str) -> None:
    try:
        ids = tokenizer("The code of alpha is 1234.", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means unusable
        raise ModelLoadError(f"{name}: the tokenizer cannot encode text ({_one_line(exc)})") from exc
    if not ids:
        raise ModelLoadError(f"{name}: the tokenizer turns text into no tokens (its vocabulary is empty); "
                             "copy the tokenizer files of the model these weights came from")


def _check_loading_info(model: Any, info: dict[str, Any], name: str, allow: bool) -> None:
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    errors = [e for e in (info.get("error_msgs") or []) if e]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        shown = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in sorted(mismatched)[:_SHOW]]
        parts.append(f"{len(mismatched)} of the wrong shape ({'; '.join(shown)})")
    if errors:
        parts.append(f"load errors ({_one_line(errors[0], 200)})")
    if not parts:
        return
    arch = type(model).__name__
    what = f"{name}: the weights do not match the {arch} architecture: " + ", ".join(parts)
    if allow:
        logger.warning("%s; loading anyway (allow_missing_weights=True): those weights are random", what)
        return
    raise ModelLoadError(what + ". The model would run with random weights; check that config.json belongs to "
                                "these weights, or pass allow_missing_weights=True to load it anyway")


class _NoLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT: the same facts come back as our one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _load(name: str, trust_remote_code: bool, tok_kwargs: dict[str, Any], model_kwargs: dict[str, Any]
          ) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **tok_kwargs)
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    report_logger.addFilter(quiet)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True, **model_kwargs)
    finally:
        report_logger.removeFilter(quiet)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    return model, tokenizer, info


def load_model_and_tokenizer(
    path: str | Path,
    *,
    dtype: Any = None,
    device: Any = None,
    trust_remote_code: bool = False,
    allow_missing_weights: bool = False,
    **hf_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local folder or a hub name, checked (see the module doc).

    ``dtype``: a ``torch.dtype``, its name (``"bfloat16"``) or ``"auto"``. ``device``: where
    to move the model (ignored with ``device_map``). ``hf_kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (``revision``, ``token``, ``cache_dir``,
    ``local_files_only`` and ``gguf_file`` reach the tokenizer too). Raises
    :class:`ModelLoadError` with one line; the model is returned in eval mode.
    """
    name = str(path)
    hf_kwargs = dict(hf_kwargs)
    if "torch_dtype" in hf_kwargs:
        legacy = hf_kwargs.pop("torch_dtype")
        dtype = legacy if dtype is None else dtype
    if hf_kwargs.get("device_map") is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(f"device_map={hf_kwargs['device_map']!r} needs the accelerate package: "
                             f"pip install 'oprm-rag[{ACCELERATE_EXTRA}]' (or pass device= instead)")
    local = Path(name).expanduser()
    from .rwkv_loading import hub_folder, is_native_rwkv, load_native  # RWKV-6/7: .pth files, HF folders

    rwkv_dir = local if is_native_rwkv(local) else None if local.exists() else hub_folder(name, hf_kwargs)
    if rwkv_dir is not None:
        native = load_native(rwkv_dir, dtype=_resolve_dtype(dtype), device=device, trust_remote_code=trust_remote_code)
        if native is not None:
            return native
    if local.is_dir():
        name = str(local)
        if hf_kwargs.get("gguf_file") is not None:  # the GGUF file holds config, tokenizer and weights
            check_gguf_file(local, hf_kwargs["gguf_file"])
        else:
            check_model_folder(local)
    elif local.exists():
        if local.suffix.lower() == ".gguf":
            raise ModelLoadError(f"{name}: is a GGUF file; pass its folder and the file's name: "
                                 f"from_pretrained({str(local.parent)!r}, gguf_file={local.name!r})")
        raise ModelLoadError(f"{name}: is a file; pass the model folder (config.json, weights, tokenizer files)")
    elif _looks_local(name):
        raise ModelLoadError(f"{name}: no such folder")

    model_kwargs = dict(hf_kwargs)
    model_kwargs["trust_remote_code"] = trust_remote_code
    model_kwargs.setdefault("ignore_mismatched_sizes", True)  # report shapes ourselves, by name
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        model_kwargs["dtype"] = resolved
    tok_kwargs = {k: model_kwargs[k] for k in _TOKENIZER_KWARGS if k in model_kwargs}

    try:
        if local.is_dir() or hf_kwargs.get("local_files_only"):
            model, tokenizer, info = _load(name, trust_remote_code, tok_kwargs, model_kwargs)
        else:
            model, tokenizer, info = _load_from_hub(name, trust_remote_code, tok_kwargs, model_kwargs)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(f"could not load {name!r}: a package is missing ({_one_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - transformers/safetensors/torch raise many types here
        raise ModelLoadError(f"could not load {name!r}: {_one_line(exc)}") from exc
    _check_tokenizer(tokenizer, name)
    _check_loading_info(model, info, name, allow_missing_weights)
    if device is not None and hf_kwargs.get("device_map") is None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ModelLoadError(f"could not move {name!r} to {device!r}: {_one_line(exc)}") from exc
    model.eval()
    return model, tokenizer


def _load_from_hub(name: str, trust_remote_code: bool, tok_kwargs: dict[str, Any], model_kwargs: dict[str, Any]
                   ) -> tuple[Any, Any, dict[str, Any]]:
    """The Hugging Face cache first; the network only when it can answer."""
    cached = {"local_files_only": True}
    try:
        return _load(name, trust_remote_code, {**tok_kwargs, **cached}, {**model_kwargs, **cached})
    except OSError as exc:
        first_error: BaseException = exc
    fix = (f"download it where the hub is reachable (hf download {name} --local-dir DIR), copy DIR here "
           "and pass that folder")
    if _hub_offline():
        raise ModelLoadError(f"{name!r} is not a local folder and not in the Hugging Face cache, and downloads "
                             f"are off here (HF_HUB_OFFLINE=1, offline mode); {fix}") from first_error
    why = _hub_unreachable()
    if why is not None:
        raise ModelLoadError(f"{name!r} is not a local folder and not in the Hugging Face cache, and the model "
                             f"hub cannot be reached from this machine ({why}); {fix}") from first_error
    return _load(name, trust_remote_code, tok_kwargs, model_kwargs)
