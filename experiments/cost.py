"""Print a model's per-block cost table (exact FLOPs, and latency on this device).

    python -m experiments.cost model=resnet110 data=cifar10
    python -m experiments.cost model=tv_resnet50 data=imagenet batch_size=8 device=cuda

Writes ``cost.json`` into the run folder. The FLOPs are checked three ways: the block table's sum, a
whole-model FlopCounterMode pass, and an independent count from layer shapes.
"""

from __future__ import annotations

import logging

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.report import machine_info, markdown_table, pick_device, write_json
from experiments.runs import output_dir
from experiments.utils import run_hydra, user_facing
from gating.cost import analytic_flops, build_cost_table, count_flops, profile_blocks

log = logging.getLogger(__name__)


@user_facing
def cost(cfg: DictConfig) -> dict:
    """Build the cost table of ``cfg.model.net`` at ``cfg.data``'s input shape; print it, write ``cost.json``."""
    record = cost_record(cfg)
    print_cost(record, cfg.latency)
    write_json(output_dir() / "cost.json", record)
    return record


def cost_record(cfg: DictConfig) -> dict:
    """The per-block table (MFLOPs, share, latency if asked) and the three-way FLOPs check."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    net = instantiate(cfg.model.net).to(device).eval()
    shape = (cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)
    x = torch.randn(cfg.batch_size, *shape, device=device)
    table = build_cost_table(net, x)
    whole, by_shape = count_flops(net, x[:1]), analytic_flops(net, x[:1])
    rows = table.rows()
    lat = profile_blocks(net, x, warmup=cfg.warmup, repeats=cfg.repeats) if cfg.latency else {}
    for r in rows:
        if r["unit"] in lat:
            r["latency_ms_p50"] = lat[r["unit"]].median_ms
            r["latency_ms_p90"] = lat[r["unit"]].p90_ms
        r["mflops"] = r.pop("flops") / 1e6
        r["skipped_mflops"] = r.pop("skipped_flops") / 1e6
    summary = {
        "model": cfg.model.get("name"),
        "input_shape": list(shape),
        "gflops_per_img": table.full_flops / 1e9,
        "gmacs_per_img": table.full_flops / 2e9,
        "flop_counter_gflops": whole / 1e9,
        "layer_shape_gflops": by_shape / 1e9,
        "agree": whole == int(table.full_flops) == by_shape,
    }
    if cfg.latency:
        summary[f"latency_ms_p50_batch{cfg.batch_size}"] = lat["(model)"].median_ms
    return {"summary": summary, "table": table.to_dict(), "rows": rows, "machine": machine_info(device)}


def print_cost(record: dict, latency: bool) -> None:
    cols = ["unit", "mflops", "skipped_mflops", "share_pct"] + (["latency_ms_p50", "latency_ms_p90"] if latency else [])
    print(markdown_table(record["rows"], cols, ".4g"))
    print("\n" + markdown_table([record["summary"]], floatfmt=".6g"))


@hydra.main(version_base="1.3", config_path="../configs", config_name="cost.yaml")
def main(cfg: DictConfig) -> None:
    cost(cfg)


if __name__ == "__main__":
    run_hydra(main)
