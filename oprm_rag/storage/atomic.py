"""Whole safetensors files, checked: a saved ``RecurrentState`` with a SHA-256 of its
tensors in the header, written to a temp file that is renamed into place, so a crash
never leaves a half-written file under the final name. Any failure of the writer (a full
disk makes safetensors raise its own ``SafetensorError``) comes out as an ``OSError`` and
leaves no file behind; a file that does not read back as written is refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StateFormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["atomic_write_safetensors", "read_safetensors", "tensors_digest"]

_DIGEST_KEY = "oprm_rag.sha256"


def tensors_digest(tensors: dict[str, "torch.Tensor"]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write_safetensors(path: Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> None:
    """Write a whole safetensors file atomically; any failure raises ``OSError``, no file left."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta[_DIGEST_KEY] = tensors_digest(tensors)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            raise
        except Exception as exc:  # safetensors' SafetensorError on a full disk, among others
            raise OSError(errno.EIO, f"could not write {path}: {exc}") from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_safetensors(path: Path, device: Any = "cpu") -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Load tensors and header metadata; raise ``StateFormatError`` on any damage."""
    from safetensors import safe_open

    try:
        tensors: dict[str, "torch.Tensor"] = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises several types for bad headers
        raise StateFormatError(f"{path}: unreadable safetensors file ({exc})") from exc
    expected = meta.get(_DIGEST_KEY)
    if expected is None or tensors_digest(tensors) != expected:
        raise StateFormatError(f"{path}: checksum mismatch (file corrupt or edited)")
    if device is not None and str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


# ---------------------------------------------------------------------------- directories
