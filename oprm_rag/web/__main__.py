"""``python -m oprm_rag.web``: serve the QA page."""

import sys

from .app import main

sys.exit(main())
