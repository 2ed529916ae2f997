"""Model-family backends: each runs one kind of model from explicit states."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, DecodeSession, ForwardOutput

if TYPE_CHECKING:  # pragma: no cover
    from ..mitigation import CollapseMitigation

__all__ = ["Backend", "DecodeSession", "ForwardOutput", "backend_for", "backend_classes"]


def backend_classes() -> list[type[Backend]]:
    """Exact backends first; the token-replay fallback last."""
    from .hf_cache import CacheBackend
    from .mamba import MambaBackend
    from .mamba2 import Mamba2Backend
    from .recurrent_gemma import RecurrentGemmaBackend
    from .replay import ReplayBackend
    from .rwkv import RwkvBackend
    from .rwkv6 import Rwkv6Backend
    from .rwkv7 import Rwkv7Backend

    return [MambaBackend, Mamba2Backend, RwkvBackend, Rwkv6Backend, Rwkv7Backend, RecurrentGemmaBackend,
            CacheBackend, ReplayBackend]


def backend_for(model: Any, kernels: str = "auto", mitigation: "CollapseMitigation | None" = None) -> Backend:
    """The backend that runs ``model``; a mitigation is only taken by Mamba-2 models."""
    from .mamba2 import Mamba2Backend

    for cls in backend_classes():
        if cls.handles(model):
            if mitigation is not None and not mitigation.neutral:
                if cls is not Mamba2Backend:
                    raise ValueError(
                        f"collapse_mitigation applies to Mamba-2 models only; this model is "
                        f"{getattr(model.config, 'model_type', type(model).__name__)!r}. Drop the option.")
                return Mamba2Backend(model, kernels=kernels, mitigation=mitigation)
            return cls(model, kernels=kernels)
    raise TypeError(f"cannot run {type(model).__name__}: it has no forward()")
