"""The ``evaluation`` task of ``experiments.eval``: load the models, evaluate, bucket, report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.data import batches_to_tensor
from experiments.evaluation.adaptivity import adaptivity_metrics, adaptivity_statements, plot_skip_heatmaps
from experiments.evaluation.difficulty import (
    Buckets,
    confidence_buckets,
    ladder_buckets,
    score_buckets,
    severity_buckets,
)
from experiments.evaluation.evaluator import EvaluationResult, evaluate_models
from experiments.evaluation.report import (
    bucket_table,
    cost_trend,
    frontier_statements,
    latency_frontiers,
    pareto_table,
    plot_all,
    print_report,
    render_report,
    trend_statements,
)
from experiments.report import machine_info, pick_device, write_csv
from experiments.runs import load_run, output_dir, write_run_record
from experiments.utils import Stopwatch, instantiate_list, user_facing
from gating.adapters import ModelAdapter
from gating.errors import UserError
from skipnet import RandomSkipAdapter

log = logging.getLogger(__name__)


def load_models(methods: DictConfig) -> list[ModelAdapter]:
    """One adapter per entry of ``evaluation.methods`` (name -> run reference and options; null drops one)."""
    return [load_run(name=name, **OmegaConf.to_container(node, resolve=True)) for name, node in methods.items()
            if node is not None]


def make_buckets(cfg: DictConfig, res: EvaluationResult, labels: np.ndarray,
                 recorded: "np.ndarray | None" = None) -> Buckets:
    """The difficulty buckets the config asks for (``kind``: ladder, confidence, file, or severity: the
    per-sample level the data set records, passed as ``recorded``)."""
    kind = cfg.kind
    if kind == "severity":
        if recorded is None:
            raise UserError("difficulty.kind=severity needs a data set that records a severity per sample "
                            "(data=mnist_c or data=digits_c)")
        return severity_buckets(recorded)
    if kind == "ladder":
        missing = [m for m in cfg.ladder if m not in res.outputs]
        if missing:
            raise UserError(f"difficulty.ladder names {missing}, which are not among the evaluated methods "
                            f"({list(res.outputs)}): list them under evaluation.methods")
        correct = [res.outputs[m].logits.argmax(-1).numpy() == labels for m in cfg.ladder]
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
        return score_buckets(cfg.file, cfg.column, len(labels), cfg.buckets)
    raise UserError(f"difficulty.kind must be ladder, confidence, file or severity, got {kind!r}")


def summarize(res: EvaluationResult, buckets: Buckets, models: list[ModelAdapter],
              reference: str | None) -> dict[str, Any]:
    """The tables computed from the records: per bucket, cost by difficulty, operating points."""
    table = bucket_table(res.records, buckets, {m.name: m.num_stages for m in models if m.num_stages > 1})
    unsolved = [lab for lab in buckets.labels if lab.endswith(":unsolved")]
    kinds = {m.name: m.kind for m in models}
    trend = cost_trend(table, kinds, unsolved)
    random_of = {m.match_name: m.name for m in models if isinstance(m, RandomSkipAdapter) and m.match_name}
    adaptivity = adaptivity_metrics(res.records, buckets, kinds, random_of, unsolved)
    for r in res.records:
        r["bucket"] = buckets.labels[buckets.bucket[r["index"]]]
    front = latency_frontiers(res.points)
    return {"buckets": table, "trend": trend, "adaptivity": adaptivity, "frontier": front,
            "pareto": pareto_table(res.points, reference, front)}


@user_facing
def compare(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every model of ``cfg.evaluation`` on the test split and write the reports."""
    ev = cfg.evaluation
    pl.seed_everything(cfg.seed, workers=True)
    device = pick_device(cfg.get("device", "auto"))
    out, watch = output_dir(), Stopwatch()
    datamodule = instantiate(cfg.data)
    loader = datamodule.test_dataloader() if ev.get("split", "test") == "test" else datamodule.val_dataloader()
    x, y = batches_to_tensor(loader)
    recorded = datamodule.difficulty(ev.get("split", "test")) if hasattr(datamodule, "difficulty") else None
    models = load_models(ev.methods)
    with watch("evaluate_s"):
        res = evaluate_models(models, x, y, device, ev.batch_size, ev.latency)
    buckets = make_buckets(ev.difficulty, res, y.numpy(), None if recorded is None else recorded.numpy())
    tables = summarize(res, buckets, models, ev.get("reference"))
    statements = (trend_statements(tables["trend"]) + adaptivity_statements(tables["adaptivity"])
                  + frontier_statements(tables["frontier"], ev.batch_size))
    for name, rows in (("records", res.records), ("points", res.points), ("buckets", tables["buckets"]),
                       ("pareto", tables["pareto"])):
        write_csv(out / f"{name}.csv", rows)
    plots = plot_all(res.points, tables["buckets"], buckets, out, ev.batch_size)
    plots += plot_skip_heatmaps(tables["adaptivity"], buckets, out)
    head = {"run_name": cfg.get("run_name"), "n": len(x), "difficulty": buckets.definition, "device": str(device),
            "batch_size": ev.batch_size}
    (out / "report.md").write_text(render_report(head, tables, statements, plots))
    _log_wandb(cfg, tables["buckets"], tables["pareto"], plots)
    record = {
        "task": cfg.task_name, "run_name": cfg.get("run_name"), "output_dir": str(out),
        "difficulty": {"definition": buckets.definition, "labels": buckets.labels,
                       "counts": np.bincount(buckets.bucket, minlength=len(buckets.labels)).tolist()},
        "cost_by_difficulty": tables["trend"], "adaptivity": tables["adaptivity"], "statements": statements,
        "latency_frontier": tables["frontier"],
        "metrics": {f"{p['method']}/{p['point']}/{k}": p[k] for p in res.points
                    for k in ("acc", "gflops_per_img", "int8_gops_per_img", "batch_ms_per_img", "batch1_ms_p50")
                    if p.get(k) is not None},
        "points": res.points, "buckets": tables["buckets"], "plots": [str(p) for p in plots],
        "timings": watch.times, "machine": machine_info(device),
    }
    write_run_record(cfg, record)
    print_report(buckets, tables, statements, out)
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
