"""Plain-text tables and machine descriptions for reports and benchmark records."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """Rows of dicts as a Markdown table (floats formatted with ``floatfmt``)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a timing was measured on: CPU model and cores, torch version, threads, GPU name, and the
    memory allocator's settings (``LD_PRELOAD``, glibc's ``MALLOC_*``): on the CPU, glibc's default
    returns large freed tensors to the system, and the page faults of taking them back slowed full-batch
    passes by 20-40% at batch 64 here (docs/compression.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device or "cpu"),
        "allocator_env": {k: v for k, v in sorted(os.environ.items()) if k == "LD_PRELOAD" or k.startswith("MALLOC_")},
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return path


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Rows of dicts as CSV; the columns are every key that appears, in order of first appearance."""
    if not rows:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    return path


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from gating.errors import UserError

        raise UserError("device=cuda asked for but no CUDA device is visible: use device=cpu or device=auto")
    return torch.device(name)
