"""One type for a batch of recurrent model states, whatever the model family.

A recurrent model's whole inference state is a handful of fixed-size tensors per
sequence (conv windows, SSM states, RWKV's numerators...). ``RecurrentState`` keeps
them in one named dict whose tensors all have the batch on dimension 0, so the
selector, the cache and the decoders can select, expand, stack, move and save states
without knowing which family made them. Saving goes through safetensors, never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

from .errors import StateFormatError  # re-exported: it lived here before errors.py

__all__ = ["RecurrentState", "StateFormatError", "KV_PREFIX"]

_FAMILY_KEY = "oprm_rag.family"
#: Names of attention key/value tensors, [b, heads, T, d], left-padded (see RecurrentState).
KV_PREFIX = "kv."


@dataclass
class RecurrentState:
    """A batch of recurrent states: named tensors, batch on dimension 0.

    ``family`` names the backend that made it (``"mamba"``, ``"mamba2"``, ...), so a
    state is never fed to a model of another kind. Every state carries a ``position``
    tensor (tokens consumed per row), which backends with positional parts need and
    which makes a stored state self-describing.

    Tensors named ``kv.*`` are attention keys or values, ``[b, heads, T, d]``, that grow
    with the text (a transformer's or a hybrid's attention layers). Rows of one batch may
    hold different numbers of tokens, so they are **left-padded**: row ``r``'s real
    entries are its last ``position[r]`` slots (:meth:`kv_valid` derives the mask).
    :meth:`cat` pads to the widest batch, :meth:`with_kv_width` to a fixed width (a
    cache entry's rows all have one shape).
    """

    family: str
    tensors: dict[str, "torch.Tensor"] = field(default_factory=dict)

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return int(self.tensors["position"].shape[0])

    @property
    def positions(self) -> list[int]:
        return [int(p) for p in self.tensors["position"].tolist()]

    @property
    def device(self) -> "torch.device":
        return self.tensors["position"].device

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors (the figure to plan batch and cache budgets with)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __len__(self) -> int:
        return self.batch_size

    # ------------------------------------------------------------------ batch algebra
    def _map(self, fn) -> "RecurrentState":
        return RecurrentState(self.family, {k: fn(v) for k, v in self.tensors.items()})

    def select(self, index: "int | Sequence[int] | torch.Tensor") -> "RecurrentState":
        """Rows ``index`` (an int keeps the batch dimension, with size 1)."""
        import torch

        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if idx.numel() and (int(idx.min()) < -self.batch_size or int(idx.max()) >= self.batch_size):
            raise IndexError(f"state rows {idx.tolist()} out of range for batch {self.batch_size}")
        return self._map(lambda t: t.index_select(0, idx % self.batch_size))

    def expand(self, n: int) -> "RecurrentState":
        """Repeat each row ``n`` times (row-major: r0, r0, ..., r1, r1, ...)."""
        if n < 1:
            raise ValueError("expand needs n >= 1")
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @classmethod
    def cat(cls, states: Sequence["RecurrentState"]) -> "RecurrentState":
        """Stack states along the batch dimension."""
        import torch

        if not states:
            raise ValueError("cat needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.family != first.family or s.tensors.keys() != first.tensors.keys():
                raise ValueError("cannot concatenate states of different models")
        width = max((s.kv_width or 0) for s in states)
        if any(s.kv_width not in (None, width) for s in states):  # different lengths: left-pad
            states = [s.with_kv_width(width) for s in states]
        return cls(first.family, {k: torch.cat([s.tensors[k] for s in states], 0) for k in first.tensors})

    # ------------------------------------------------------------------ attention keys and values
    @property
    def kv_width(self) -> int | None:
        """Slots of the ``kv.*`` tensors (None: the state holds no attention keys)."""
        for k, t in self.tensors.items():
            if k.startswith(KV_PREFIX):
                return int(t.shape[-2])
        return None

    def kv_valid(self) -> "torch.Tensor | None":
        """[b, T] bool: which key slots are real (each row's last ``position`` slots)."""
        import torch

        width = self.kv_width
        if width is None:
            return None
        pos = self.tensors["position"]
        return torch.arange(width, device=pos.device)[None, :] >= (width - pos)[:, None]

    def with_kv_width(self, width: int | None) -> "RecurrentState":
        """The same state with ``kv.*`` tensors left-padded (zeros) or left-trimmed to ``width``
        slots; a state without keys, or already that wide, is returned as is. Trimming only
        drops padding: a row with more than ``width`` tokens raises ``ValueError``."""
        import torch

        have = self.kv_width
        if width is None or have is None or have == width:
            return self
        if int(self.tensors["position"].max()) > width:
            raise ValueError(f"a state of {int(self.tensors['position'].max())} tokens does not fit {width} key slots")

        def fit(name: str, t: "torch.Tensor") -> "torch.Tensor":
            if not name.startswith(KV_PREFIX):
                return t
            if have > width:
                return t[..., have - width:, :]
            pad = t.new_zeros((*t.shape[:-2], width - have, t.shape[-1]))
            return torch.cat([pad, t], dim=-2)

        return RecurrentState(self.family, {k: fit(k, v) for k, v in self.tensors.items()})

    def clone(self) -> "RecurrentState":
        return self._map(lambda t: t.clone())

    def to(self, device: "Any" = None, dtype: "torch.dtype | None" = None) -> "RecurrentState":
        """Move to ``device``; ``dtype`` casts floating tensors only (positions stay ints)."""
        def move(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)
        return self._map(move)

    def same_as(self, other: "RecurrentState", atol: float = 0.0) -> bool:
        """Exact (or within ``atol``) equality of family, keys, shapes and values."""
        import torch

        if self.family != other.family or self.tensors.keys() != other.tensors.keys():
            return False
        for k, t in self.tensors.items():
            o = other.tensors[k]
            if t.shape != o.shape:
                return False
            if atol == 0.0 and not torch.equal(t, o.to(t.device)):
                return False
            if atol > 0.0 and not torch.allclose(t.float(), o.float().to(t.device), atol=atol, rtol=0):
                return False
        return True

    # ------------------------------------------------------------------ persistence
    def to_safetensors_dict(self) -> dict[str, "torch.Tensor"]:
        return {k: t.detach().contiguous().cpu() for k, t in self.tensors.items()}

    def save(self, path: "str | Path", metadata: dict[str, str] | None = None) -> None:
        """Write to a safetensors file (atomically: temp file, then rename)."""
        from .storage.atomic import atomic_write_safetensors

        meta = dict(metadata or {})
        meta[_FAMILY_KEY] = self.family
        atomic_write_safetensors(Path(path), self.to_safetensors_dict(), meta)

    @classmethod
    def load(cls, path: "str | Path", device: "Any" = "cpu",
             expect_metadata: dict[str, str] | None = None) -> "RecurrentState":
        """Read a state saved by :meth:`save`; any damage raises :class:`StateFormatError`."""
        from .storage.atomic import read_safetensors

        tensors, meta = read_safetensors(Path(path), device=device)
        family = meta.get(_FAMILY_KEY)
        if family is None or "position" not in tensors:
            raise StateFormatError(f"{path} is not a recurrent state file")
        for key, value in (expect_metadata or {}).items():
            if meta.get(key) != value:
                raise StateFormatError(f"{path}: {key} is {meta.get(key)!r}, expected {value!r}")
        return cls(family, tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in list(self.tensors.items())[:4])
        more = "" if len(self.tensors) <= 4 else f", ... ({len(self.tensors)} tensors)"
        return f"RecurrentState({self.family!r}, batch={self.batch_size}, {self.nbytes / 2**20:.2f} MiB, {shapes}{more})"
