"""The layout holds: imports run one way, the server does not import Lightning, every config target
exists (old names through the rename table too), and no function outgrows a screen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_object

from experiments.compat import RENAMED_TARGETS
from tests.conftest import ROOT

PACKAGES = ("gating", "skipnet", "cascades", "models", "experiments", "serve")
# What each package may import of ours (docs/architecture.md).
ALLOWED = {
    "gating": set(),
    "skipnet": {"gating"},
    "cascades": {"gating"},
    "models": {"gating", "skipnet", "cascades"},  # cascades: int8 quantization per stage
    "serve": {"gating"},
    "experiments": {"gating", "skipnet", "cascades", "models", "serve"},
}
MAX_FUNCTION_LINES = 60


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    wrong = {str(p.relative_to(ROOT)): sorted(_our_imports(p) - ALLOWED[package] - {package})
             for p in _sources(package)}
    assert not {p: w for p, w in wrong.items() if w}, f"{package} may import only {sorted(ALLOWED[package])}"


def test_the_server_and_gating_do_not_import_lightning():
    code = ("import serve.app, gating, sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning')]; "
            "assert not bad, bad[:5]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_no_function_over_a_screen():
    long = []
    for path in _sources(*PACKAGES, "bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_every_config_target_exists():
    targets = {t for f in (ROOT / "configs").rglob("*.yaml") for t in _targets(yaml.safe_load(f.read_text()))}
    ours = sorted(t for t in targets if t.split(".")[0] in PACKAGES)
    assert ours and "models.create_model" in ours
    for t in ours:
        assert get_object(t) is not None, t
    assert not set(ours) & set(RENAMED_TARGETS), "configs still name an old target"


def test_renamed_targets_point_at_what_exists():
    for old, new in RENAMED_TARGETS.items():
        assert get_object(new) is not None, (old, new)
