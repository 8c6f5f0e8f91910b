"""Hydra entry points (train, eval, cost) and the data modules they use."""

import os
from pathlib import Path

# configs/paths/default.yaml reads the repository root from PROJECT_ROOT.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
