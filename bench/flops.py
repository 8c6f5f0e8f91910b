"""Exact FLOPs of the registry's backbones, counted three independent ways, against published figures.

    python bench/flops.py                          # prints the table, writes JSON in the run folder
    python bench/flops.py output=docs/results/flops.json

Columns: FlopCounterMode over the whole forward pass; the per-block cost table's sum; a count from
layer shapes (hooks on Conv2d/Linear); GMACs (= FLOPs / 2); torchvision's published GMACs where it has
one (``weights.meta["_ops"]``, no download needed).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig
from torchvision import models as tvm

import experiments  # noqa: F401
from experiments.report import machine_info, markdown_table, write_json
from experiments.utils import run_hydra
from gating.cost import analytic_flops, build_cost_table, count_flops
from models import create_model


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/flops.yaml")
def main(cfg: DictConfig) -> None:
    rows = []
    for spec in cfg.models:
        kw = {"num_classes": spec.num_classes, "in_chans": spec.input_shape[0], "image_size": spec.get("image_size")}
        net = create_model(spec.model_name, **kw).eval()
        x = torch.randn(1, *spec.input_shape)
        counted, by_shape = count_flops(net, x), analytic_flops(net, x)
        table = build_cost_table(net, x)
        published = None
        if spec.get("torchvision_weights"):
            published = float(getattr(tvm, spec.torchvision_weights).IMAGENET1K_V1.meta["_ops"])
        rows.append({
            "model": spec.model_name,
            "input": "x".join(map(str, spec.input_shape)),
            "flop_counter_flops": counted,
            "block_table_flops": int(table.full_flops),
            "layer_shape_flops": by_shape,
            "gflops": counted / 1e9,
            "gmacs": counted / 2e9,
            "torchvision_gmacs": published,
            "blocks": table.num_blocks,
            "agree": counted == int(table.full_flops) == by_shape
            and (published is None or abs(counted / 2e9 - published) < 5e-4),
        })
    print(markdown_table(rows, floatfmt=".4f"))
    path = write_json(cfg.output, {"rows": rows, "machine": machine_info()})
    print(f"\nwritten: {path}")
    if not all(r["agree"] for r in rows):
        raise SystemExit("FLOPs disagree: see the table")


if __name__ == "__main__":
    run_hydra(main)
