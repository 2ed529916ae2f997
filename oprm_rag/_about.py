"""The package's version and where its shipped model lives: importing this loads nothing else."""

from pathlib import Path

__version__ = "0.1.0"

#: Folder of the shipped demo model (a small Mamba-2 trained on associative recall).
DEMO_MODEL: str = str(Path(__file__).parent / "demo" / "model")
