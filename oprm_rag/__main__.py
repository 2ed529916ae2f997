"""``python -m oprm_rag demo`` and the other ``oprm-rag`` commands."""

import sys

from .cli import main

sys.exit(main())
