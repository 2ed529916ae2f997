"""RWKV-6 ("Finch") and RWKV-7 ("Goose") weights, held natively under BlinkDL's names.

transformers ships no RWKV-6 or RWKV-7 model; the Hugging Face releases run on remote
code (``trust_remote_code``) whose cache cannot be handed a stored state, so they would
fall back to token replay. We hold the weights ourselves, in a plain ``nn.Module`` whose
``state_dict()`` keys are exactly those of BlinkDL's ``.pth`` files (``emb.weight``,
``blocks.{i}.att.x_r``, ``blocks.{i}.ffn.key.weight``, ``head.weight``...), with their
shapes, and run them in :mod:`oprm_rag.backends.rwkv6` / :mod:`~oprm_rag.backends.rwkv7`
from explicit states. Hugging Face folders are renamed to these keys on load
(:mod:`oprm_rag.rwkv_loading`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["RwkvNativeConfig", "RwkvNativeModel", "LN_X_EPS"]

#: BlinkDL's GroupNorm epsilon for ``ln_x`` (``1e-5 * head_size_divisor**2``, divisor 8).
LN_X_EPS = 64e-5


@dataclass
class RwkvNativeConfig:
    """What a native RWKV-6/7 model is: read from its weights (and its folder's config)."""

    version: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_size: int
    intermediate_size: int
    layer_norm_epsilon: float = 1e-5
    ln_x_eps: float = LN_X_EPS
    #: The training context (BlinkDL's ``ctx4096`` file names, a folder's config), or None.
    context_length: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    #: Where the weights came from: "pth" (BlinkDL), "rwkv-hf" (RWKV's RWKV-6 folders),
    #: "fla" (flash-linear-attention's RWKV-7 folders).
    source_format: str = "pth"
    _name_or_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return f"rwkv{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_type"] = self.model_type
        return out


class _Node(nn.Module):
    """A container of parameters under their checkpoint names (no forward of its own)."""


class RwkvNativeModel(nn.Module):
    """An RWKV-6 or RWKV-7 language model whose parameters carry BlinkDL's key names.

    Build it with :meth:`from_state_dict`; every key of the dict becomes a parameter at
    that dotted path, so ``model.state_dict()`` round-trips the checkpoint. The math
    lives in the backends (:mod:`.rwkv6`, :mod:`.rwkv7`), which run it from states.
    """

    def __init__(self, config: RwkvNativeConfig) -> None:
        super().__init__()
        self.config = config
        self.generation_config = None

    @classmethod
    def from_state_dict(cls, config: RwkvNativeConfig, weights: dict[str, torch.Tensor]) -> "RwkvNativeModel":
        model = cls(config)
        for key, tensor in weights.items():
            *path, leaf = key.split(".")
            node: nn.Module = model
            for part in path:
                child = node._modules.get(part)
                if child is None:
                    top = node is model and leaf == "weight"  # head and emb: real modules (hookable)
                    child = (nn.Linear(1, 1, bias=False) if top and part == "head" else
                             nn.Embedding(1, 1) if top and part == "emb" else _Node())
                    node.add_module(part, child)
                node = child
            if isinstance(node, nn.Linear):
                node.in_features, node.out_features = int(tensor.shape[1]), int(tensor.shape[0])
            elif isinstance(node, nn.Embedding):
                node.num_embeddings, node.embedding_dim = int(tensor.shape[0]), int(tensor.shape[1])
            setattr(node, leaf, nn.Parameter(tensor.detach(), requires_grad=False))
        return model.eval()

    @property
    def version(self) -> int:
        return self.config.version

    def layers(self) -> list[nn.Module]:
        """The blocks in order (``blocks.0``, ``blocks.1``, ...; a loaded dict may sort them as text)."""
        blocks = self._modules["blocks"]._modules  # type: ignore[union-attr]
        return [blocks[k] for k in sorted(blocks, key=int)]  # type: ignore[misc]

    def get_input_embeddings(self) -> nn.Module:
        return self._modules["emb"]  # type: ignore[return-value]

    def get_output_embeddings(self) -> nn.Module:
        return self._modules["head"]  # type: ignore[return-value]

    @property
    def native_rwkv_version(self) -> int:
        """The mark the RWKV-6/7 backends recognise this model by."""
        return self.config.version

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, t, v] of ``input_ids`` from the empty state (a plain forward)."""
        from .backends import backend_for

        return backend_for(self, kernels="torch").forward(input_ids, all_logits=True).logits

    def __repr__(self) -> str:
        c = self.config
        return (f"RwkvNativeModel(rwkv{c.version}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_heads}x{c.head_size}, vocab={c.vocab_size})")
