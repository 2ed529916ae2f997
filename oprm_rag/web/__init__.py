"""The long-document QA web app (FastAPI): ``create_app`` builds it, ``main`` serves it.

Needs the ``[web]`` extra (fastapi, uvicorn, python-multipart). Run it with
``python -m oprm_rag.web --host 127.0.0.1 --port 8000 [--model PATH]``.
"""

from __future__ import annotations

from .app import WebSettings, create_app, main

__all__ = ["create_app", "main", "WebSettings"]
