"""Training-free state-collapse mitigations for Mamba-2 (Stuffed Mamba, Chen et al. 2024).

Past its training length a Mamba-2 model's loss can blow up because a few state
channels explode: the model never learned to forget. These options change the
recurrence at inference time, with no training, and apply alike to plain inference
and to OPRM's chunk prefill (they live in our SSD scan, ``kernels/ssd.py``):

* ``alpha_scale`` / ``b_scale`` ("forget more, remember less"): alpha_t <- c_alpha alpha_t,
  B_t <- c_B B_t, both constants below 1; one reported setting is (0.9999, 0.75);
* ``normalize_state``: h_t <- h_t / ||h_t|| after each update (recurrent form, slower);
* ``window`` (r tokens): sliding window by state difference, h_t - alpha_{t-r+1:t} h_{t-r}:
  each position sees only the last r tokens' inputs. Its state is the last r - 1
  tokens' SSM inputs per layer (fixed size, O(r)).

At their neutral values (1, 1, False, None) the model is exactly the plain model.

The window's state is not small: per sequence it holds (r - 1) x layers x heads x
(head_dim + d_state + 1) float32 values, about 0.44 MB per window token on the smallest
Mamba-2 (130m). So a window is checked twice: against :data:`MAX_WINDOW_TOKENS` when the
option is made (no model is known yet), and against ``max_state_bytes`` per sequence
once the model is (:meth:`CollapseMitigation.check_for_model`, called by the Mamba-2
backend), so a window too big for memory fails with the figure instead of allocating it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError
from .kernels.ssd import SSDParams

__all__ = ["CollapseMitigation", "PRESETS", "MAX_WINDOW_TOKENS", "DEFAULT_MAX_STATE_BYTES"]

#: The longest window accepted at all. Stuffed Mamba sets the window near the training
#: length (Mamba-2 checkpoints train on 2k-8k tokens); a window of 65,536 tokens already
#: keeps about 29 GB per sequence on the smallest Mamba-2.
MAX_WINDOW_TOKENS = 1 << 16

#: Default bound on one sequence's window state; batches hold several sequences.
DEFAULT_MAX_STATE_BYTES = 2 << 30


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


@dataclass(frozen=True)
class CollapseMitigation:
    """Stuffed-Mamba settings; ``max_state_bytes`` bounds one sequence's window state
    (raise it knowingly; it is not part of the model's identity)."""

    alpha_scale: float = 1.0
    b_scale: float = 1.0
    normalize_state: bool = False
    window: int | None = None
    max_state_bytes: int = field(default=DEFAULT_MAX_STATE_BYTES, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral) or self.window < 1:
                raise InputError(f"window must be a positive whole number of tokens, got {self.window!r}")
            if self.window > MAX_WINDOW_TOKENS:
                raise InputError(
                    f"window={int(self.window):,} tokens: the window keeps every one of those tokens' SSM "
                    f"inputs per layer (about 0.44 MB per token on the smallest Mamba-2), and is meant to be "
                    f"near the model's training length; choose a window of at most {MAX_WINDOW_TOKENS:,} tokens")
        if self.window is not None and self.normalize_state:
            raise InputError("normalize_state and window cannot be combined (the window keeps no running state)")
        if not 0.0 < self.alpha_scale <= 1.0:
            raise InputError(f"alpha_scale (c_alpha) must be in (0, 1], got {self.alpha_scale}")
        if not 0.0 < self.b_scale <= 1.0:
            raise InputError(f"b_scale (c_B) must be in (0, 1], got {self.b_scale}")
        if isinstance(self.max_state_bytes, bool) or not isinstance(self.max_state_bytes, numbers.Integral) \
                or self.max_state_bytes < 1:
            raise InputError(f"max_state_bytes must be a positive number of bytes, got {self.max_state_bytes!r}")

    # ------------------------------------------------------------------ memory
    @staticmethod
    def _window_token_bytes(model: Any) -> int:
        """Bytes of window state per token of window, per sequence, on a Mamba-2 ``model``."""
        cfg = model.config
        try:
            layers, heads = int(cfg.num_hidden_layers), int(cfg.num_heads)
            head_dim, d_state = int(cfg.head_dim), int(cfg.state_size)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputError(f"cannot size the window state: the model's config is not a Mamba-2 config ({exc})") \
                from exc
        return layers * heads * (head_dim + d_state + 1) * 4  # x*dt, B and dA per head, float32

    def window_state_bytes(self, model: Any) -> int:
        """Bytes one sequence's window state takes on ``model`` (0 without a window)."""
        if self.window is None:
            return 0
        return (int(self.window) - 1) * self._window_token_bytes(model)

    def check_for_model(self, model: Any) -> None:
        """Raise :class:`InputError` if one sequence's window state on ``model`` would pass
        ``max_state_bytes``; the message gives the memory, the limit and the largest window
        that fits. Call it before any state is allocated."""
        need = self.window_state_bytes(model)
        if need <= self.max_state_bytes:
            return
        per_token = self._window_token_bytes(model)
        largest = self.max_state_bytes // per_token + 1
        raise InputError(
            f"window={int(self.window or 0):,} tokens would keep {_size(need)} of state per sequence on this model "
            f"({_size(per_token)} per window token), above max_state_bytes={_size(self.max_state_bytes)}; "
            f"choose window <= {largest:,}, or raise max_state_bytes if the memory is there")

    @property
    def neutral(self) -> bool:
        return (self.alpha_scale == 1.0 and self.b_scale == 1.0 and not self.normalize_state
                and self.window is None)

    def ssd_params(self) -> SSDParams:
        return SSDParams(alpha_scale=self.alpha_scale, b_scale=self.b_scale, normalize_state=self.normalize_state)

    @classmethod
    def parse(cls, spec: "CollapseMitigation | str | Mapping[str, Any]") -> "CollapseMitigation":
        """Accept an instance, a preset name (see ``PRESETS``) or a dict of fields."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str) and spec.startswith("window:"):
            raw = spec.split(":", 1)[1].strip()
            if not raw.isdigit():
                raise InputError(f"collapse_mitigation {spec!r}: the window must be a whole number of tokens, "
                                 "e.g. 'window:2048'")
            return cls(window=int(raw))
        if isinstance(spec, str):
            try:
                return PRESETS[spec]
            except KeyError:
                raise InputError(f"unknown collapse_mitigation {spec!r}; choose one of {sorted(PRESETS)} "
                                 "or 'window:N', or pass CollapseMitigation(...)") from None
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError("collapse_mitigation must be a CollapseMitigation, a preset name or a dict")


PRESETS: dict[str, CollapseMitigation] = {
    "none": CollapseMitigation(),
    "forget": CollapseMitigation(alpha_scale=0.9999, b_scale=0.75),
    "normalize": CollapseMitigation(normalize_state=True),
}
