"""Chunks cut so that ``[P, C_i]`` ends on the server's prefix-cache block grid.

vLLM caches a recurrent (Mamba, hybrid) model's state only at block boundaries
(``--mamba-cache-mode align``; block 128 tokens on its CPU build, larger on GPUs). A
scoring prompt is ``[P, C_i, Q]``: if ``[P, C_i]`` ends exactly on a block boundary, the
server holds the state after the chunk in its cache, and a follow-up question about the
same document, ``[P, C_i, Q']``, can resume from it and run only ``Q'``, the served
counterpart of the in-process document cache. Anywhere else, the nearest cached state is
up to a block earlier and the end of the chunk is run again for every question.

The alignment is a chunk length: every chunk but a document's last is exactly
``chunk_tokens`` tokens when ``boundary=None``, and ``P`` is the same for every chunk, so
``len(P) + chunk_tokens`` a multiple of the block puts every full chunk's end on the grid.

What is not proven here: the saving itself. vLLM's CPU build crashes with prefix caching
on Mamba-2 (a vLLM bug) and no GPU was available, so this module's promise is the
alignment (tested), not a measured speed-up (``docs/served.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import OptionError

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine

__all__ = ["aligned_chunk_tokens", "block_aligned_selector", "VLLM_CPU_BLOCK"]

#: vLLM's prefix-cache block on its CPU build (``--block-size`` default there).
VLLM_CPU_BLOCK = 128


def aligned_chunk_tokens(chunk_tokens: int, prefix_tokens: int, block: int) -> int:
    """The largest chunk length ``L <= chunk_tokens`` with ``prefix_tokens + L`` a multiple
    of ``block``: the end of ``[P, C]`` on the block grid."""
    for name, value, low in (("chunk_tokens", chunk_tokens, 1), ("prefix_tokens", prefix_tokens, 0),
                             ("block", block, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"{name} must be a whole number >= {low}, got {value!r}")
    size = (prefix_tokens + chunk_tokens) // block * block - prefix_tokens
    if size < 1:
        raise OptionError(f"no chunk of at most {chunk_tokens} tokens ends on the {block}-token block grid after a "
                          f"{prefix_tokens}-token prompt prefix; use chunk_tokens >= "
                          f"{block - prefix_tokens % block} or a smaller block")
    return size


def block_aligned_selector(engine: "Engine", block: int = VLLM_CPU_BLOCK, **options: Any) -> Any:
    """An ``OPRMSelector`` over ``engine`` whose chunks end ``[P, C_i]`` on a ``block``-token
    grid: ``chunk_tokens`` (default "auto") is lowered to the nearest aligned length, and
    chunks are cut at exactly that length (``boundary=None``; a sentence boundary would
    move the end off the grid). Other ``options`` are ``OPRMSelector``'s."""
    from ..selector import OPRMSelector

    if options.get("boundary") is not None:
        raise OptionError("block-aligned chunks are cut at exact lengths: leave boundary out (it is None here)")
    options["boundary"] = None
    probe = OPRMSelector(engine, **options)
    if probe.chunk_tokens is None:
        raise OptionError("chunk_tokens=None (whole documents) has no chunk to align")
    prefix = len(probe._prefix_ids())
    size = aligned_chunk_tokens(probe.chunk_tokens, prefix, block)
    if size == probe.chunk_tokens:
        return probe
    return OPRMSelector(engine, **{**options, "chunk_tokens": size})
