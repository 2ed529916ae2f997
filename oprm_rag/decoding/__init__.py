"""Decoding answers from stored states: options, the loop, text assembly, streams.

* :mod:`.config`: ``GenerationConfig`` (every decoding option, its default and check, the
  one alias table) and ``Generation`` (a finished answer);
* :mod:`.loop`: ``Decoder`` (a batch of answers, rows stop independently), ``TokenStream``
  (its batch-1 stream) and sampling (``choose_next``);
* :mod:`.text`: token ids to safe text deltas (``TextAssembler``, the reference, and
  ``IncrementalTextAssembler``, constant time per token);
* :mod:`.stream`: ``BaseTextStream``, the base of every answer stream.

Decoding is ours rather than ``model.generate`` because generate re-feeds the whole
prompt on top of a passed state and is wrong for batched RWKV: here the prompt is
already inside the state and only new tokens are fed, one at a time. The loop (torch)
loads only when imported; the rest is light.
"""

from .config import GENERATION_ALIASES, SUMMARY_MAX_NEW_TOKENS, Generation, GenerationConfig
from .stream import BaseTextStream

__all__ = ["GenerationConfig", "Generation", "GENERATION_ALIASES", "SUMMARY_MAX_NEW_TOKENS", "BaseTextStream"]
