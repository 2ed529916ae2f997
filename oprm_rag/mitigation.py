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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .kernels.ssd import SSDParams

__all__ = ["CollapseMitigation", "PRESETS"]


@dataclass(frozen=True)
class CollapseMitigation:
    alpha_scale: float = 1.0
    b_scale: float = 1.0
    normalize_state: bool = False
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or int(self.window) < 1):
            raise ValueError(f"window must be a positive number of tokens, got {self.window}")
        if self.window is not None and self.normalize_state:
            raise ValueError("normalize_state and window cannot be combined (the window keeps no running state)")
        if not 0.0 < self.alpha_scale <= 1.0:
            raise ValueError(f"alpha_scale (c_alpha) must be in (0, 1], got {self.alpha_scale}")
        if not 0.0 < self.b_scale <= 1.0:
            raise ValueError(f"b_scale (c_B) must be in (0, 1], got {self.b_scale}")

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
            return cls(window=int(spec.split(":", 1)[1]))
        if isinstance(spec, str):
            try:
                return PRESETS[spec]
            except KeyError:
                raise ValueError(f"unknown collapse_mitigation {spec!r}; choose one of {sorted(PRESETS)} "
                                 "or 'window:N', or pass CollapseMitigation(...)") from None
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError("collapse_mitigation must be a CollapseMitigation, a preset name or a dict")


PRESETS: dict[str, CollapseMitigation] = {
    "none": CollapseMitigation(),
    "forget": CollapseMitigation(alpha_scale=0.9999, b_scale=0.75),
    "normalize": CollapseMitigation(normalize_state=True),
}
