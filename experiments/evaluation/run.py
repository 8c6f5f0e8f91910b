"""The ``evaluation`` task of ``experiments.eval``: build the methods, evaluate, bucket, report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from experiments.data import batches_to_tensor
from experiments.evaluation.difficulty import Buckets, confidence_buckets, ladder_buckets, score_buckets
from experiments.evaluation.evaluator import EvaluationResult, evaluate_methods
from experiments.evaluation.report import bucket_table, cost_trend, pareto_table, plot_all
from experiments.report import machine_info, markdown_table, pick_device, write_csv
from experiments.utils import Stopwatch, instantiate_list, output_dir, user_facing, write_run_record
from gating.errors import UserError

log = logging.getLogger(__name__)

BUCKET_COLUMNS = ["method", "bucket", "count", "acc", "gflops_mean", "gflops_p95", "blocks_mean", "exit_shares",
                  "batch1_ms_p50", "batch1_ms_p95", "batch_share_ms_mean"]
PARETO_COLUMNS = ["method", "point", "acc", "acc_delta_pts", "gflops_per_img", "flops_cut_pct", "batch_ms_per_img",
                  "speedup", "batch1_ms_p50", "blocks_per_img", "exit_shares"]


def make_buckets(cfg: DictConfig, res: EvaluationResult, n: int) -> Buckets:
    """The difficulty buckets the config asks for (``kind``: ladder, confidence or file)."""
    kind = cfg.kind
    if kind == "ladder":
        missing = [m for m in cfg.ladder if m not in res.outputs]
        if missing:
            raise UserError(f"difficulty.ladder names {missing}, which are not among the evaluated methods "
                            f"({list(res.outputs)}): list them under evaluation.methods")
        labels = None
        correct = []
        for m in cfg.ladder:
            out = res.outputs[m]
            labels = np.array([r["label"] for r in res.records if r["method"] == m]) if labels is None else labels
            correct.append(out.logits.argmax(-1).numpy() == labels)
        return ladder_buckets(correct, list(cfg.ladder))
    if kind == "confidence":
        if cfg.reference not in res.outputs:
            raise UserError(f"difficulty.reference {cfg.reference!r} is not an evaluated method ({list(res.outputs)})")
        probs = res.outputs[cfg.reference].logits.float().softmax(-1)
        if cfg.get("measure", "max_prob") == "entropy":
            conf = 1 + (probs * probs.clamp_min(1e-12).log()).sum(-1) / np.log(probs.shape[-1])
        else:
            conf = probs.amax(-1)
        return confidence_buckets(conf.numpy(), cfg.buckets, cfg.reference)
    if kind == "file":
        return score_buckets(cfg.file, cfg.column, n, cfg.buckets)
    raise UserError(f"difficulty.kind must be ladder, confidence or file, got {kind!r}")


@user_facing
def compare(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every method of ``cfg.evaluation`` on the test split and write the reports."""
    ev = cfg.evaluation
    pl.seed_everything(cfg.seed, workers=True)
    device = pick_device(cfg.get("device", "auto"))
    out = output_dir()
    watch = Stopwatch()
    datamodule = instantiate(cfg.data)
    loader = datamodule.test_dataloader() if ev.get("split", "test") == "test" else datamodule.val_dataloader()
    x, y = batches_to_tensor(loader)
    methods = [instantiate(node, name=name) for name, node in ev.methods.items() if node is not None]
    with watch("evaluate_s"):
        res = evaluate_methods(methods, x, y, device, ev.batch_size, ev.latency)
    buckets = make_buckets(ev.difficulty, res, len(x))
    table = bucket_table(res.records, buckets, {m.name: m.num_stages for m in methods if hasattr(m, "num_stages")})
    kinds = {m.name: m.kind for m in methods}
    trend = cost_trend(table, kinds, [lab for lab in buckets.labels if lab.endswith(":unsolved")])
    pareto = pareto_table(res.points, ev.get("reference"))

    for r in res.records:
        r["bucket"] = buckets.labels[buckets.bucket[r["index"]]]
    write_csv(out / "records.csv", res.records)
    write_csv(out / "points.csv", res.points)
    write_csv(out / "buckets.csv", table)
    write_csv(out / "pareto.csv", pareto)
    plots = plot_all(res.points, table, buckets, out, ev.batch_size)
    statements = [
        f"{m}: mean GFLOPs per image {'rises' if t['monotone_rising'] else 'does NOT rise'} monotonically from the "
        f"easiest to the hardest bucket ({' -> '.join(f'{c:.4g}' for c in t['gflops_by_bucket'])}; hardest/easiest "
        f"{t['hardest_over_easiest']:.2f}x)"
        + "".join(f"; set aside, {b} ({v['count']} inputs no model gets right): {v['gflops_mean']:.4g}"
                  for b, v in t["set_aside"].items())
        for m, t in trend.items()]
    md = "\n".join([
        f"# Evaluation: {cfg.get('run_name')}", "",
        f"Test inputs: {len(x)}. Difficulty: {buckets.definition}. Device: {device}. Batch size {ev.batch_size}.", "",
        "## Per difficulty bucket (main operating point of each method)", "",
        markdown_table(table, [c for c in BUCKET_COLUMNS if any(c in r for r in table)]), "",
        "## Cost by difficulty", "", *[f"- {s}" for s in statements], "",
        "## Operating points", "",
        markdown_table(pareto, [c for c in PARETO_COLUMNS if any(r.get(c) is not None for r in pareto)]), "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], "",
    ])
    (out / "report.md").write_text(md)
    _log_wandb(cfg, table, pareto, plots)

    record = {
        "task": cfg.task_name, "run_name": cfg.get("run_name"), "output_dir": str(out),
        "difficulty": {"definition": buckets.definition, "labels": buckets.labels,
                       "counts": np.bincount(buckets.bucket, minlength=len(buckets.labels)).tolist()},
        "cost_by_difficulty": trend, "statements": statements,
        "metrics": {f"{p['method']}/{p['point']}/{k}": p[k] for p in res.points
                    for k in ("acc", "gflops_per_img", "batch_ms_per_img", "batch1_ms_p50") if p.get(k) is not None},
        "points": res.points, "buckets": table, "plots": [str(p) for p in plots],
        "timings": watch.times, "machine": machine_info(device),
    }
    write_run_record(cfg, record)
    print(f"\nper difficulty bucket ({buckets.definition}):")
    print(markdown_table(table, [c for c in BUCKET_COLUMNS if any(c in r for r in table)]))
    print("\n" + "\n".join(statements))
    print("\noperating points:")
    print(markdown_table(pareto, [c for c in PARETO_COLUMNS if any(r.get(c) is not None for r in pareto)]))
    print(f"\nreport, records and plots: {out}")
    return record


def _log_wandb(cfg: DictConfig, table: list[dict[str, Any]], pareto: list[dict[str, Any]], plots: list[Path]) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for lg in instantiate_list(cfg.get("logger")):
        if isinstance(lg, WandbLogger):
            for key, rows in (("eval/buckets", table), ("eval/pareto", pareto)):
                cols = list(dict.fromkeys(k for r in rows for k in r))
                lg.log_table(key, columns=cols, data=[[str(r.get(c)) if isinstance(r.get(c), list) else r.get(c)
                                                       for c in cols] for r in rows])
            lg.log_image("eval/plots", images=[str(p) for p in plots])
