"""Real skipping against masked execution (SkipNet's public code): do saved FLOPs become saved time?

    python bench/skip_engine.py                                  # prints the table, writes JSON
    python bench/skip_engine.py output=docs/results/skip_engine_cpu.json
    python bench/skip_engine.py device=cuda 'batch_sizes=[1,8,64,256]'

Each case forces i.i.d. decisions at a skip rate (every block but the first skipped with that
probability, per sample) and times one forward pass of the whole batch each way, gates included,
the variants interleaved round by round so that machine drift hits them alike.
FLOPs speedup = masked FLOPs / real FLOPs (exact, from the cost table); realized speedup = masked
time / real time; the ratio of the two says how much of the FLOPs saving became wall-clock saving.
``ms_plain`` is the backbone alone; ``ms_engine_no_gates`` the real-skipping engine with the same
decisions but the gates not run. Their ratios at 0% skip separate the engine's own overhead from the
gates' cost.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.report import machine_info, markdown_table, pick_device, write_json
from experiments.utils import run_hydra
from gating.cost import measure_interleaved
from models import create_model


def forced_actions(batch: int, blocks: int, skip_rate: float, generator: torch.Generator) -> torch.Tensor:
    a = (torch.rand(batch, blocks, generator=generator) >= skip_rate).float()
    a[:, 0] = 1.0
    return a


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/skip_engine.yaml")
def main(cfg: DictConfig) -> None:
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = []
    for spec in cfg.models:
        net = create_model(spec.model_name, num_classes=spec.num_classes, in_chans=spec.input_shape[0])
        net = net.to(device).eval()
        table = net.cost_table(torch.randn(1, *spec.input_shape, device=device))
        for batch in cfg.batch_sizes:
            x = torch.randn(batch, *spec.input_shape, device=device)
            for rate in cfg.skip_rates:
                g = torch.Generator().manual_seed(cfg.seed)
                actions = forced_actions(batch, net.num_blocks, rate, g).to(device)
                t = measure_interleaved({
                    "plain": lambda: net.backbone(x),
                    "masked": lambda: net(x, execution="masked", actions=actions),
                    "real": lambda: net(x, execution="skip", actions=actions),
                    "engine": lambda: net(x, execution="skip", actions=actions, run_gates=False),
                }, device=device, warmup=cfg.warmup, repeats=cfg.repeats, max_seconds=cfg.max_case_seconds)
                real_flops = float(table.per_sample(actions.cpu()).mean())
                flops_speedup = table.full_flops / real_flops
                realized = t["masked"].median_ms / t["real"].median_ms
                rows.append({
                    "model": spec.model_name,
                    "input": "x".join(map(str, spec.input_shape)),
                    "batch": batch,
                    "skip_pct": round(100 * (1 - float(actions[:, 1:].mean())), 1),
                    "gflops_per_img_masked": table.full_flops / 1e9,
                    "gflops_per_img_real": real_flops / 1e9,
                    "flops_speedup": flops_speedup,
                    "ms_masked": t["masked"].median_ms,
                    "ms_real": t["real"].median_ms,
                    "ms_real_p90": t["real"].p90_ms,
                    "ms_plain": t["plain"].median_ms,
                    "ms_engine_no_gates": t["engine"].median_ms,
                    "realized_speedup": realized,
                    "realized_over_flops": realized / flops_speedup,
                    "real_over_plain": t["real"].median_ms / t["plain"].median_ms,
                    "engine_over_plain": t["engine"].median_ms / t["plain"].median_ms,
                    "repeats": t["real"].repeats,
                })
                print(markdown_table(rows[-1:], floatfmt=".3f").splitlines()[-1], flush=True)
    cols = ["model", "batch", "skip_pct", "gflops_per_img_real", "flops_speedup", "ms_masked", "ms_real", "ms_plain",
            "ms_engine_no_gates", "realized_speedup", "realized_over_flops", "real_over_plain", "engine_over_plain"]
    print("\n" + markdown_table(rows, cols, floatfmt=".3f"))
    path = write_json(cfg.output, {"rows": rows, "machine": machine_info(device), "config": {
        "warmup": cfg.warmup, "repeats": cfg.repeats, "max_case_seconds": cfg.max_case_seconds, "seed": cfg.seed}})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    run_hydra(main)
