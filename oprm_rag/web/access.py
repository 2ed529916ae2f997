"""The web app's access token: any text works everywhere, and it never reaches a log.

Why this module exists: HTTP carries header bytes, not text. Clients send a token's
non-ASCII characters as UTF-8 (curl, browsers, httpx) or, for Latin-1 characters, as
Latin-1 (Python's ``http.client``); the ASGI server hands them over as raw bytes. So the
token is compared as bytes against both encodings, never as Latin-1-decoded text. The
cookie set by ``/?token=`` holds an ASCII digest of the token (not the token, which a
cookie header cannot carry beyond Latin-1, and which then never sits in the browser's
cookie store). A token that no HTTP header can carry (control characters, spaces at its
ends, text that is not valid Unicode) is refused when the server starts, with the reason.

The token reaches the server in ``/?token=...``, which access logs print whole:
:class:`RedactToken` rewrites log records so neither the token nor any ``token=``
query value is ever written.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import unicodedata
from urllib.parse import quote, quote_plus

from ..errors import InputError

__all__ = ["check_token", "token_matches", "query_matches", "cookie_value", "cookie_matches", "RedactToken", "redact",
           "install_redaction"]

_QUERY_TOKEN = re.compile(r"(?i)([?&;]token=)[^&;#\s\"']*")
_MASK = "***"


def check_token(token: str) -> str:
    """The token, if an HTTP client can send it; else an InputError saying why."""
    if not isinstance(token, str) or not token:
        raise InputError("the access token is empty; give a non-empty --token (or $OPRM_WEB_TOKEN)")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the access token is not valid text (its bytes are not UTF-8); give a token typed as "
                         "UTF-8 text") from None
    if token != token.strip():
        raise InputError("the access token starts or ends with whitespace, which HTTP headers drop; remove it")
    bad = [ch for ch in token if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise InputError(f"the access token holds a control character ({ascii(bad[0])}), which an HTTP header "
                         "cannot carry; use printable characters")
    return token


def token_matches(given: bytes, token: str) -> bool:
    """``given`` (a header's raw bytes) is the token, sent as UTF-8 or as Latin-1."""
    ok = hmac.compare_digest(given, token.encode("utf-8"))
    try:
        latin = token.encode("latin-1")
    except UnicodeEncodeError:
        return ok
    return hmac.compare_digest(given, latin) or ok


def query_matches(given: str, token: str) -> bool:
    """A ``?token=`` value (percent-decoded as UTF-8 by the framework; raw bytes arrive
    Latin-1-decoded) is the token."""
    try:
        raw = given.encode("latin-1")
    except UnicodeEncodeError:
        raw = None
    ok = hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))
    return (raw is not None and token_matches(raw, token)) or ok


def cookie_value(token: str) -> str:
    """What the browser's cookie holds: an ASCII digest of the token, not the token."""
    return hmac.new(token.encode("utf-8"), b"oprm-rag web cookie v1", hashlib.sha256).hexdigest()


def cookie_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), cookie_value(token).encode("ascii"))


def redact(text: str, token: str | None) -> str:
    """``text`` with the token (as typed or URL-encoded) and any ``token=`` value masked."""
    text = _QUERY_TOKEN.sub(lambda m: m.group(1) + _MASK, text)
    if token and len(token) >= 4:  # a shorter one would mask common letters (and guards nothing)
        for form in {token, quote(token, safe=""), quote_plus(token, safe=""), quote(token)}:
            text = text.replace(form, _MASK)
    return text


class RedactToken(logging.Filter):
    """Rewrites each record's message and arguments so that no token is logged."""

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.token)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, self.token) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v, self.token) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


#: The loggers a request's path or headers can reach.
LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "uvicorn.asgi", "fastapi", "starlette", "oprm_rag",
           "oprm_rag.web", "")


def install_redaction(token: str | None, log_config: dict | None = None) -> dict:
    """Attach :class:`RedactToken` to every logger that can see a request, and return
    uvicorn's logging config with the filter on each of its handlers (a handler's filter
    also catches records propagated from loggers not named here)."""
    filt = RedactToken(token)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RedactToken)]:
            logger.removeFilter(old)
        logger.addFilter(filt)
        for handler in logger.handlers:
            handler.addFilter(filt)
    if log_config is None:
        from copy import deepcopy

        from uvicorn.config import LOGGING_CONFIG

        log_config = deepcopy(LOGGING_CONFIG)
    log_config.setdefault("filters", {})["oprm_redact_token"] = {"()": RedactToken, "token": token}
    for handler in log_config.get("handlers", {}).values():
        handler.setdefault("filters", []).append("oprm_redact_token")
    return log_config
