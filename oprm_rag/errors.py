"""The exceptions oprm-rag raises, under one base class.

Entry points (the CLI, the web app, the LangChain and LlamaIndex tools) tell the user's
mistakes from our faults by type, never by message: only :class:`InputError` (and its
subclasses) is reported as "your input is wrong"; anything else is an internal fault
and is reported as one, with its type. ``InputError`` subclasses ``ValueError`` so code
written against plain ``ValueError`` keeps working.

This module imports nothing from the package, so every module can import it without
an import circle.
"""

from __future__ import annotations

__all__ = [
    "OPRMError",
    "InputError",
    "OptionError",
    "InputTypeError",
    "DocumentError",
    "ModelLoadError",
    "StateFormatError",
    "NonFiniteScoresError",
    "ServerError",
]


class OPRMError(Exception):
    """Base class of every error oprm-rag raises on purpose."""


class InputError(OPRMError, ValueError):
    """The caller's input cannot be used (a bad option, question or document).

    The message says what is wrong and what to do instead.
    """


class OptionError(InputError, TypeError):
    """An option with a wrong name, type or value, or passed where it does not belong.

    Both a ``TypeError`` (Python's convention for a bad argument) and an ``InputError``
    (the user's mistake, reported as such by the CLI and the web app).
    """


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (a document that is not a string, a question that is
    not text): a ``TypeError`` by Python's convention, and the user's mistake."""


class DocumentError(InputError):
    """A document file or upload could not be read as text (missing, binary, encrypted...)."""


class ModelLoadError(OPRMError):
    """A model folder or hub name could not be loaded, or loaded into something unusable
    (missing or unexpected weights, a truncated file, a config that is not a model's)."""


class StateFormatError(OPRMError, ValueError):
    """A saved state file is corrupt, truncated, of another model, or not ours."""


class NonFiniteScoresError(OPRMError):
    """The model produced NaN or infinite logits (often a float16 overflow): nothing it
    scored or decoded can be trusted. The message suggests a safer dtype."""


class ServerError(OPRMError):
    """A model server (OpenAI-compatible: vLLM, llama.cpp, SGLang, Ollama) failed or
    answered in a way OPRM cannot use; the message names the server and the cause."""
