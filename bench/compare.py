"""Trained models side by side on one cost axis: test accuracy, float GFLOPs and int8 GOPs per input,
parameters, weight bytes, and latency at each batch size with every model timed in the same
interleaved rounds; the accuracy/latency Pareto frontier at each batch size is named and plotted.

    python bench/compare.py                                   # ResNet-38 against its pruned run, float and int8
    python bench/compare.py output=docs/results/compare_mnist_cpu.json
    python bench/compare.py 'models=[{name: a, run: logs/train/runs/mnist_resnet38}, {name: b, run: ..., int8: true}]'

A model is a training run (a plain classifier or a SkipNet) or an ``experiments.cascade`` run (a
calibrated cascade, run with compaction: each stage on the inputs deferred to it), optionally
quantized to int8 here (``int8: true``, calibrated on val batches as ``bench/quantize.py`` does; a
cascade's stages each, its float thresholds kept). ``units`` is the mean work executed per test
input: blocks for a SkipNet, stages for a cascade.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.report import machine_info, markdown_table, write_json
from experiments.runs import load_run
from experiments.utils import run_hydra, user_facing
from gating.cost import measure_interleaved
from gating.errors import UserError
from gating.thresholds import pareto_front
from models.quantize import quantize_int8
from quantize import mean_cost, predict, read_splits  # the sibling benchmark's helpers (bench/ is the script's folder)


def load_model(run: str) -> torch.nn.Module:
    """The network a run holds, of whatever kind ``load_run`` finds there (a classifier, a SkipNet, a
    calibrated or IDK-head cascade)."""
    (net,) = load_run(run).modules()
    return net.cpu().eval()


def _plot(rows: list[dict], batch_sizes: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        at = [r for r in rows if r["batch"] == b]
        front = {r["model"] for r in at if r["frontier"]}
        for r in at:
            ax.scatter(r["ms_per_batch"], 100 * r["acc"], marker="o" if r["model"] in front else "x")
            ax.annotate(r["model"], (r["ms_per_batch"], 100 * r["acc"]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
        f = sorted((r for r in at if r["model"] in front), key=lambda r: r["ms_per_batch"])
        ax.plot([r["ms_per_batch"] for r in f], [100 * r["acc"] for r in f], "--", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor tick labels overlap on a narrow range
        ax.set(xlabel=f"median latency at batch {b} (ms)", ylabel="test accuracy (%)",
               title=f"batch {b}: frontier o, dominated x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/compare.yaml")
@user_facing
def main(cfg: DictConfig) -> None:
    calib, x_test, y_test = read_splits(cfg)
    nets, base, loaded = {}, {}, {}
    for spec in cfg.models:
        name = spec.get("name")
        if not name or "run" not in spec or name in nets:
            raise UserError(f"each of models needs a name of its own and a run (a training or cascade run folder), e.g. "
                            f"{{name: resnet38, run: logs/train/runs/mnist_resnet38}}; got {dict(spec)}")
        # A run named twice (float and int8) is read once; quantize_int8 copies, so the float net stays.
        net = loaded.get(str(spec.run)) or loaded.setdefault(str(spec.run), load_model(str(spec.run)))
        if spec.get("int8", False):
            net = quantize_int8(net, calib, backend=cfg.backend)
        pred, blocks = predict(net, x_test, cfg.data.batch_size)
        nets[name] = net
        base[name] = {"model": name, "run": str(spec.run), "int8": bool(spec.get("int8", False)),
                      "acc": float((pred == y_test).float().mean()), "units": blocks,
                      **mean_cost(net, x_test[:cfg.cost_inputs])}
    rows = []
    for b in cfg.batch_sizes:
        x = x_test[:b]
        t = measure_interleaved({n: (lambda m=m: m(x)) for n, m in nets.items()}, warmup=cfg.warmup,
                                repeats=cfg.repeats, max_seconds=cfg.max_case_seconds, primed=cfg.primed)
        front = pareto_front(list(nets), cost=lambda n: t[n].median_ms, accuracy=lambda n: base[n]["acc"])
        ref = t[next(iter(nets))].median_ms
        for n in nets:
            rows.append({**base[n], "batch": b, "ms_per_batch": t[n].median_ms, "ms_p90": t[n].p90_ms,
                         "speedup_vs_first": ref / t[n].median_ms, "repeats": t[n].repeats, "frontier": n in front})
        print(f"batch {b}: frontier (fastest first) {', '.join(front)}", flush=True)
    cols = ["model", "batch", "acc", "units", "gflops", "int8_gops", "params", "weight_kib", "ms_per_batch", "ms_p90",
            "speedup_vs_first", "frontier", "repeats"]
    print("\n" + markdown_table(rows, cols, floatfmt=".4g"))
    out = Path(cfg.output)
    plot = _plot(rows, list(cfg.batch_sizes), out.with_suffix(".png"))
    path = write_json(out, {"rows": rows, "plot": str(plot), "machine": machine_info("cpu"), "config": {
        "backend": cfg.backend, "calibration_batches": cfg.calibration_batches, "warmup": cfg.warmup,
        "repeats": cfg.repeats, "max_case_seconds": cfg.max_case_seconds}})
    print(f"\nwritten: {path}, {plot}")


if __name__ == "__main__":
    run_hydra(main)
