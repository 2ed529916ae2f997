"""The web app's access token over real HTTP (uvicorn on a local port): any text works as
Bearer header, as ``/?token=`` and as the cookie that sets; a token no client can send is
refused at start-up; and neither the token nor a ``token=`` query value reaches a log."""

from __future__ import annotations

import http.client
import logging
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import quote, urlsplit

import httpx
import pytest

from oprm_rag.errors import InputError
from oprm_rag.web import WebSettings, create_app, main
from oprm_rag.web.access import RedactToken, check_token, install_redaction, redact

from live_server import serve

TOKEN = "pässwörd-✓"


@contextmanager
def _served(app, token: str) -> Iterator[str]:
    try:
        with serve(app, log_level="info", log_config=install_redaction(token), access_log=True) as base:
            yield base
    finally:
        for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):  # leave logging as other tests expect
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, RedactToken)]:
                logging.getLogger(name).removeFilter(f)


def _latin1_request(base: str, path: str, auth: str) -> int:
    """http.client sends header text as Latin-1 (what Python's standard library does)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.putrequest("GET", path)
        conn.putheader("Authorization", auth)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_non_ascii_token_works_as_header_query_and_cookie(demo_lm, capfd: pytest.CaptureFixture[str]) -> None:
    app = create_app(demo_lm, settings=WebSettings(token=TOKEN))
    with _served(app, TOKEN) as base:
        with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as c:
            assert c.get("/api/health").status_code == 401
            ok = c.get("/api/health", headers={"authorization": f"Bearer {TOKEN}".encode("utf-8")})
            assert ok.status_code == 200
            bad = c.get("/api/health", headers={"authorization": "Bearer pässwörd-✗".encode("utf-8")})
            assert bad.status_code == 401
            page = c.get(f"/?token={quote(TOKEN)}")
            assert page.status_code == 303 and page.headers["location"] == "/"
            cookie = page.cookies.get("oprm_token")
            assert cookie and cookie.isascii() and TOKEN not in cookie and quote(TOKEN) not in cookie
            assert c.get("/").status_code == 200
            assert c.get("/api/health").status_code == 200  # the cookie carries the API calls
        with httpx.Client(base_url=base, timeout=30, cookies={"oprm_token": "forged"}) as forged:
            assert forged.get("/api/health").status_code == 401
        with httpx.Client(base_url=base, timeout=30) as other:
            assert other.get("/?token=wrong").status_code == 200  # the page, without a cookie
            assert other.get("/api/health").status_code == 401
    out = capfd.readouterr()
    logs = out.out + out.err
    assert "GET /?token=*** " in logs  # the access log is on, and masked
    assert TOKEN not in logs and quote(TOKEN) not in logs and quote(TOKEN, safe="") not in logs


def test_a_latin1_token_sent_as_latin1_works(demo_lm) -> None:
    token = "pässwörd"
    app = create_app(demo_lm, settings=WebSettings(token=token))
    with _served(app, token) as base:
        assert _latin1_request(base, "/api/health", f"Bearer {token}") == 200
        assert _latin1_request(base, "/api/health", "Bearer passwort") == 401
        with httpx.Client(base_url=base, timeout=30) as c:  # and as UTF-8 from another client
            assert c.get("/api/health", headers={"authorization": f"Bearer {token}".encode()}).status_code == 200


@pytest.mark.parametrize("token, reason", [("", "empty"), (" lead", "whitespace"), ("trail\t", "whitespace"),
                                           ("new\nline", "control character"), ("bell\x07", "control character"),
                                           ("bad\udcffbytes", "not valid text"), ("zero\u200bwidth", "control")])
def test_a_token_no_client_can_send_is_refused_at_start_up(token, reason, capsys, monkeypatch) -> None:
    with pytest.raises(InputError, match=reason):
        check_token(token)
    if token:
        with pytest.raises(InputError, match=reason):
            create_app("unused-model-name", settings=WebSettings(token=token))
        monkeypatch.setenv("OPRM_WEB_TOKEN", token)
        assert main(["--port", "0", "--model", "/nonexistent"]) == 2  # before the model is loaded
        assert reason in capsys.readouterr().err


def test_redaction_masks_every_form_of_the_token() -> None:
    line = f'127.0.0.1 - "GET /?token={quote(TOKEN)}&x=1 HTTP/1.1" 303; raw {TOKEN}; plus {quote(TOKEN, safe="")}'
    masked = redact(line, TOKEN)
    assert TOKEN not in masked and quote(TOKEN) not in masked and "token=***&x=1" in masked
    assert redact("GET /static/app.js?Token=abc HTTP/1.1", None) == "GET /static/app.js?Token=*** HTTP/1.1"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"',
                               ("127.0.0.1", "GET", f"/?token={TOKEN}"), None)
    RedactToken(TOKEN).filter(record)
    assert TOKEN not in record.getMessage() and "token=***" in record.getMessage()
