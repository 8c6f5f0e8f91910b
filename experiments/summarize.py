"""Tabulate finished runs from their records: one row per ``metrics.json``, optionally against a reference.

    python -m experiments.summarize runs=logs/train/multiruns/mnist_skipnet38_rl/<time> \\
        reference=logs/train/runs/mnist_resnet38 'params=[model.alpha]'

Prints a Markdown table and writes ``summary.md``/``summary.csv``/``summary.json`` in the run folder.
Runs whose record measured adaptivity (a SkipNet trained on data with a recorded difficulty) also get
its headline figures: ``hardest_over_easiest``, ``spearman_rho``, ``shape`` and ``distinct_patterns``.
With a reference, each row also gets ``acc_delta_pts`` (accuracy change in points) and
``flops_cut_pct`` (FLOPs saved per image, in percent), and the same on val (``val_acc_delta_pts``,
``val_flops_cut_pct``).

``select.*`` chooses one row **on val only** (a sweep's alpha, a fine-tune length): the rows whose val
FLOPs cut and val accuracy drop meet the bounds, then the best by ``select.by``. Test figures are
printed for every row but never used to choose; the chosen row is marked ``selected``.

    python -m experiments.summarize runs=<sweep> reference=<base run> 'params=[model.alpha]' \
        select.min_val_cut_pct=50
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


def _deltas(row: dict[str, Any], ref: dict[str, Any], split: str) -> None:
    prefix = "" if split == "test" else f"{split}_"
    acc, ref_acc = row.get(f"{split}/acc"), ref.get(f"{split}/acc")
    # A static reference costs the same on every split; its record may hold the test figure only.
    gflops = row.get(f"{split}/gflops_per_img")
    ref_gflops = ref.get(f"{split}/gflops_per_img") or ref.get("test/gflops_per_img")
    if acc is not None and ref_acc is not None:
        row[f"{prefix}acc_delta_pts"] = 100 * (acc - ref_acc)
    if gflops and ref_gflops:
        row[f"{prefix}flops_cut_pct"] = 100 * (1 - gflops / ref_gflops)


def select_on_val(rows: list[dict[str, Any]], select: DictConfig | dict | None) -> dict[str, Any] | None:
    """The row ``select`` picks from val figures alone (None when no row meets its bounds or no rule is set)."""
    if not select or not select.get("by"):
        return None
    lo_cut, max_drop = select.get("min_val_cut_pct"), select.get("max_val_drop_pts")
    ok = [r for r in rows if r.get(select.by) is not None
          and (lo_cut is None or (r.get("val_flops_cut_pct") or float("-inf")) >= lo_cut)
          and (max_drop is None or (r.get("val_acc_delta_pts") or float("-inf")) >= -max_drop)]
    return max(ok, key=lambda r: r[select.by]) if ok else None


ADAPTIVITY = ("hardest_over_easiest", "spearman_rho", "shape", "distinct_patterns")


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
    adaptivity = record.get("adaptivity") or {}
    row.update({k: adaptivity.get(k) for k in ADAPTIVITY if adaptivity})
    row["folder"] = str(record_path.parent)
    return row


@user_facing
def summarize(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build the rows; returns them (reference first)."""
    folders = list(cfg.runs) if isinstance(cfg.runs, ListConfig) else [cfg.runs]
    params, metrics = list(cfg.params), list(cfg.metrics)
    rows = [_row(p, params, metrics) for f in folders for p in _records(Path(f).expanduser())]
    deltas = []
    if cfg.reference:
        ref_records = _records(Path(cfg.reference).expanduser())
        ref = _row(sorted(ref_records, key=lambda p: p.parent.name)[-1], params, metrics)
        ref["run"] = f"{ref['run']} (reference)"
        for r in rows:
            _deltas(r, ref, "val")
            _deltas(r, ref, "test")
        deltas = ["val_acc_delta_pts", "val_flops_cut_pct", "acc_delta_pts", "flops_cut_pct"]
        chosen = select_on_val(rows, cfg.get("select"))
        for r in rows:
            r["selected"] = r is chosen
        rows = [ref, *rows]
    adaptive = [k for k in ADAPTIVITY if any(k in r for r in rows)]
    cols = ["run", *params, *metrics, *deltas, *adaptive] + (["selected"] if cfg.get("select", {}).get("by") else [])
    text = markdown_table(rows, cols, floatfmt=".4f")
    print(text)
    _print_choice(rows, cfg)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*cols, "folder"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json(out / "summary.json", rows)
    return rows


def _print_choice(rows: list[dict[str, Any]], cfg: DictConfig) -> None:
    select = cfg.get("select") or {}
    if not select.get("by"):
        return
    chosen = next((r for r in rows if r.get("selected")), None)
    rule = (f"best {select.by} with val cut >= {select.get('min_val_cut_pct')}% and val drop <= "
            f"{select.get('max_val_drop_pts')} pts")
    print(f"selected on val ({rule}): {chosen['run'] if chosen else 'none meets the bounds'}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="summarize.yaml")
def main(cfg: DictConfig) -> None:
    summarize(cfg)


if __name__ == "__main__":
    run_hydra(main)
