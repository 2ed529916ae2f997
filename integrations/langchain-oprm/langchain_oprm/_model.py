"""How the LangChain classes name and reach the one shared model.

LangChain builds components often (configurable fields rebuild them per call, the
standard tests build chat models in a loop), so a component only keeps what the user
gave: a loaded ``RecurrentLM``, an ``Engine`` (a served model), or a path. Everything
here is the core's (``oprm_rag.integration``): weights load on first use, through
``oprm_rag.resolve``, once per process and path. Importing this package does not import torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Union

from oprm_rag.integration import check_model, in_process, model_name

if TYPE_CHECKING:
    from oprm_rag.engine import Engine
    from oprm_rag.lm import RecurrentLM

    #: A loaded model, a served model, or the folder / hub name to load it from.
    ModelLike = Union[RecurrentLM, Engine, str, os.PathLike[str]]
else:  # pydantic sees Any: the real check is `check_model` (no torch import needed)
    ModelLike = Any

__all__ = ["ModelLike", "check_model", "validate_model_field", "model_name", "in_process"]


def validate_model_field(value: Any) -> Any:
    """``check_model`` for pydantic validators (which report ValueError, not TypeError)."""
    try:
        return check_model(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
