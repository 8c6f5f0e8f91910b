"""Tabulate finished runs from their records: one row per ``metrics.json``, optionally against a reference.

    python -m experiments.summarize runs=logs/train/multiruns/mnist_skipnet38_rl/<time> \\
        reference=logs/train/runs/mnist_resnet38 'params=[model.alpha]'

Prints a Markdown table and writes ``summary.md``/``summary.csv``/``summary.json`` in the run folder.
With a reference, each row also gets ``acc_delta_pts`` (accuracy change in points) and
``flops_cut_pct`` (FLOPs saved per image, in percent).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import hydra
import yaml
from omegaconf import DictConfig, ListConfig

import experiments  # noqa: F401
from experiments.report import markdown_table, write_json
from experiments.runs import output_dir
from experiments.utils import run_hydra, user_facing
from gating.errors import UserError


def _records(folder: Path) -> list[Path]:
    if (folder / "metrics.json").is_file():
        return [folder / "metrics.json"]
    found = sorted(folder.rglob("metrics.json"))
    if not found:
        raise UserError(f"no metrics.json under {str(folder)!r}: point runs= at a finished run or sweep folder")
    return found


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _row(record_path: Path, params: list[str], metrics: list[str]) -> dict[str, Any]:
    record = json.loads(record_path.read_text())
    cfg_path = record_path.parent / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    row: dict[str, Any] = {"run": record.get("run_name") or record_path.parent.name}
    row.update({p: _lookup(cfg, p) for p in params})
    row.update({m: record.get("metrics", {}).get(m) for m in metrics})
    row["folder"] = str(record_path.parent)
    return row


@user_facing
def summarize(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build the rows; returns them (reference first)."""
    folders = list(cfg.runs) if isinstance(cfg.runs, ListConfig) else [cfg.runs]
    params, metrics = list(cfg.params), list(cfg.metrics)
    rows = [_row(p, params, metrics) for f in folders for p in _records(Path(f).expanduser())]
    if cfg.reference:
        ref_records = _records(Path(cfg.reference).expanduser())
        ref = _row(sorted(ref_records, key=lambda p: p.parent.name)[-1], params, metrics)
        ref["run"] = f"{ref['run']} (reference)"
        for r in rows:
            if r.get("test/acc") is not None and ref.get("test/acc") is not None:
                r["acc_delta_pts"] = 100 * (r["test/acc"] - ref["test/acc"])
            if r.get("test/gflops_per_img") and ref.get("test/gflops_per_img"):
                r["flops_cut_pct"] = 100 * (1 - r["test/gflops_per_img"] / ref["test/gflops_per_img"])
        rows = [ref, *rows]
    cols = ["run", *params, *metrics] + (["acc_delta_pts", "flops_cut_pct"] if cfg.reference else [])
    text = markdown_table(rows, cols, floatfmt=".4f")
    print(text)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*cols, "folder"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json(out / "summary.json", rows)
    return rows


@hydra.main(version_base="1.3", config_path="../configs", config_name="summarize.yaml")
def main(cfg: DictConfig) -> None:
    summarize(cfg)


if __name__ == "__main__":
    run_hydra(main)
