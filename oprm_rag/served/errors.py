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
           "TokenIdsRejectedError", "ContextOverflowError", "ServerTimeoutError", "ServerResponseError"]


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
    """A request got no answer in time (after retries), part-way through a batch."""


class ServerResponseError(ServerError):
    """Any other failure: an HTTP error status (``status_code``), or an answer in a shape
    OPRM cannot read (``status_code`` None)."""

    status_code: int | None = None
