"""Batch-1 latency of a SkipNet against its plain ResNet, per test input, gates included.

    python bench/batch1.py                                          # prints the table, writes JSON
    python bench/batch1.py output=docs/results/batch1_mnist_cpu.json
    python bench/batch1.py device=cuda
    python bench/batch1.py compile=true                              # torch.compile (Inductor) of every part
    python bench/batch1.py compile=true on_device=true               # the SkipNet as one graph (torch.cond)

For every test input, one timed call of each variant, interleaved (so that machine drift hits them
alike), each directly after an untimed call of the same variant (``primed``: every variant timed with its
own weights in cache, as a server running one model has them; the plain ResNet shares no weights with
the SkipNet variants and was otherwise timed cold):

- ``resnet``: the plain ResNet run (its own training run);
- ``skipnet``: the SkipNet with its own greedy decisions, gates included;
- ``skipnet_all_on``: the SkipNet with every block forced on and its gates still run (what the gates
  and the per-block decisions cost on top of the backbone);
- ``backbone``: the SkipNet's own backbone as a plain network (no gates, no decisions);
- ``skipnet_no_gates``: the SkipNet's own decisions replayed with the gates not run (the blocks alone).

Medians and p90 over the inputs; ratios of medians.
"""

from __future__ import annotations

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.data.base import batches_to_tensor
from experiments.report import machine_info, markdown_table, pick_device, write_json
from experiments.runs import compile_for_inference, load_net
from experiments.utils import run_hydra, user_facing
from gating.cost import LatencyStats, measure_interleaved
from skipnet import OnDeviceDecisions, compile_on_device


def _variants(resnet, skipnet, backbone, xi: torch.Tensor, own: torch.Tensor, all_on: torch.Tensor) -> dict:
    return {"resnet": lambda: resnet(xi), "skipnet": lambda: skipnet(xi),
            "skipnet_all_on": lambda: skipnet(xi, actions=all_on),
            "backbone": lambda: backbone(xi),
            "skipnet_no_gates": lambda: skipnet(xi, actions=own, run_gates=False)}


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/batch1.yaml")
@user_facing
def main(cfg: DictConfig) -> None:
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    x_test, _ = batches_to_tensor(dm.test_dataloader())
    x_test = x_test[: cfg.n_inputs].to(device) if cfg.n_inputs else x_test.to(device)
    resnet, skipnet = (load_net(r).to(device).eval() for r in (cfg.resnet_run, cfg.skipnet_run))
    decide = skipnet  # the decisions every variant replays: the eager SkipNet's
    if cfg.on_device:  # the SkipNet as one graph with its decisions on the device; the backbone whole
        skip_fn = compile_on_device(skipnet, cpp_wrapper=cfg.cpp_wrapper) if cfg.compile else OnDeviceDecisions(skipnet)
        backbone = skipnet.backbone
        if cfg.compile:  # the two plain networks compiled as the SkipNet is (cpp_wrapper alike)
            options = {"cpp_wrapper": bool(cfg.cpp_wrapper)}
            resnet, backbone = (compile_for_inference(m, options=options) for m in (resnet, backbone))
    elif cfg.compile:  # the ResNet whole, the SkipNet's blocks (its gates and decisions stay eager)
        resnet, skip_fn = compile_for_inference(resnet), compile_for_inference(skipnet)
        backbone = skip_fn.backbone
    else:
        skip_fn, backbone = skipnet, skipnet.backbone
    all_on = torch.ones(1, skipnet.num_blocks, device=device)
    samples: dict[str, list[float]] = {}
    executed = []
    with torch.no_grad():
        for i in range(len(x_test)):
            xi = x_test[i:i + 1]
            own = decide(xi).executed
            executed.append(own)
            fns = _variants(resnet, skip_fn, backbone, xi, own, all_on)
            for name, stats in measure_interleaved(fns, device, warmup=1 if i < cfg.warmup else 0, repeats=1,
                                                     primed=cfg.primed).items():
                samples.setdefault(name, []).append(stats.median_ms)  # one call: its time
    stats = {k: LatencyStats.from_samples(v, str(device)) for k, v in samples.items()}
    med = {k: s.median_ms for k, s in stats.items()}
    rows = [{"variant": k, "median_ms": s.median_ms, "p90_ms": s.p90_ms, "vs_resnet": med["resnet"] / s.median_ms,
             "n": len(samples[k])} for k, s in stats.items()]
    ratios = {"skipnet_speedup_over_resnet": med["resnet"] / med["skipnet"],
              "all_on_over_resnet": med["skipnet_all_on"] / med["resnet"],
              "all_on_over_backbone": med["skipnet_all_on"] / med["backbone"],
              "gates_ms": med["skipnet"] - med["skipnet_no_gates"],
              "blocks_executed_mean": float(torch.cat(executed).sum(1).float().mean()),
              "num_blocks": skipnet.num_blocks}
    print(markdown_table(rows, floatfmt=".4g"))
    print("\n" + "  ".join(f"{k}={v:.4g}" for k, v in ratios.items()))
    path = write_json(cfg.output, {"rows": rows, "ratios": ratios, "machine": machine_info(device),
                                   "config": {"resnet_run": cfg.resnet_run, "skipnet_run": cfg.skipnet_run,
                                              "n_inputs": len(x_test), "threads": torch.get_num_threads(),
                                              "compile": bool(cfg.compile), "on_device": bool(cfg.on_device),
                                              "cpp_wrapper": bool(cfg.cpp_wrapper),
                                              "primed": bool(cfg.primed)}})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    run_hydra(main)
