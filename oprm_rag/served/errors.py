"""What can go wrong with a model server, one class per cause.

Every class is a :class:`~oprm_rag.errors.ServerError`, so entry points report them as
the server's fault (not the user's input) and callers can catch them all at once. Each
message names the server (its base URL), the cause and what to do. A failure anywhere
in a batch of chunk requests fails the whole selection: a partial set of scores is
never passed off as a selection.
"""

from __future__ import annotations

from ..errors import ServerError

__all__ = ["ServerError", "ServerUnavailableError", "ModelNotFoundError", "NoLogprobsError",
           "TokenIdsRejectedError", "ContextOverflowError", "ServerTimeoutError", "ServerResponseError",
           "ImpossibleLogprobsError", "IncompleteAnswerError"]


class ServerUnavailableError(ServerError):
    """Nothing answers at the base URL (connection refused, unknown host, reset)."""


class ModelNotFoundError(ServerError):
    """The server does not serve a model of that name; the message lists the ones it has."""


class NoLogprobsError(ServerError):
    """The server answered without log-probabilities, so chunks cannot be scored."""


class TokenIdsRejectedError(ServerError):
    """The server refuses prompts given as token ids (it takes only text)."""


class ContextOverflowError(ServerError):
    """A prompt ``[P, C_i, Q]`` is longer than the server's context (per slot)."""


class ServerTimeoutError(ServerError):
    """A request did not finish within ``timeout`` seconds: the whole request (streams
    included, retries included), not each read."""


class ServerResponseError(ServerError):
    """Any other failure: an HTTP error status (``status_code``), or an answer in a shape
    OPRM cannot read (``status_code`` None)."""

    status_code: int | None = None


class ImpossibleLogprobsError(ServerResponseError):
    """The server returned log-probabilities no distribution can have (a positive
    log-probability, mass above 1, a token twice in one top list, an id outside the
    vocabulary, a token text the model's tokenizer cannot map): the row cannot be scored,
    and a broken score must never win a selection."""


class IncompleteAnswerError(ServerResponseError):
    """A completion (usually a stream) ended without the server saying why it stopped (no
    finish reason): the answer may be cut off, so it is not passed off as complete.
    ``partial_text`` holds what had arrived."""

    partial_text: str = ""
