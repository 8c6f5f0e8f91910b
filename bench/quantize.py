"""Int8 post-training quantization against float: accuracy on the test split, weight bytes, and
latency at each batch size with the two variants timed in interleaved rounds.

    python bench/quantize.py                                        # prints the table, writes JSON
    python bench/quantize.py output=docs/results/quantize_mnist_cpu.json
    python bench/quantize.py 'runs={resnet38: logs/train/runs/mnist_resnet38}' 'batch_sizes=[1,64,256]'

Calibration uses the val split only; the test split is scored once per variant. A SkipNet is quantized
per block (gates float); its rows also give the mean number of blocks each variant executes.
"""

from __future__ import annotations

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.data.base import batches_to_tensor
from experiments.report import machine_info, markdown_table, write_json
from experiments.runs import load_net
from experiments.utils import run_hydra, user_facing
from gating.cost import count_flops, int8_ops, measure_interleaved, model_cost
from models.quantize import quantize_int8
from cascades.model import CascadeOutput
from skipnet import SkipOutput


def mean_cost(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Float GFLOPs and int8 GOPs per input, averaged over the inputs of ``x`` one at a time (a SkipNet's
    work depends on the input), with params and weight bytes (once: they do not)."""
    whole = model_cost(net, x[:1])
    n = len(x)
    return {"gflops": sum(count_flops(net, x[i:i + 1]) for i in range(n)) / n / 1e9,
            "int8_gops": sum(int8_ops(net, x[i:i + 1]) for i in range(n)) / n / 1e9,
            "params": whole.params, "weight_kib": whole.weight_bytes / 1024}


def predict(net: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float | None]:
    """Predicted labels, and the mean units of work executed per input: blocks for a SkipNet, stages
    for a cascade (None for a static model)."""
    labels, blocks = [], []
    for i in range(0, len(x), batch_size):
        out = net(x[i:i + batch_size])
        if isinstance(out, SkipOutput):
            blocks.append(out.executed.sum(1))
            out = out.logits
        elif isinstance(out, CascadeOutput):
            blocks.append(out.exit_stage.float() + 1)
            out = out.logits
        labels.append(out.argmax(1))
    return torch.cat(labels), (float(torch.cat(blocks).mean()) if blocks else None)


def read_splits(cfg: DictConfig) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Read once for every model: ``cfg.calibration_batches`` val batches, and the whole test split
    (inputs, labels). Sets ``cfg.threads`` first."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    dm.setup("fit")
    calib = [x for _, (x, _) in zip(range(cfg.calibration_batches), dm.val_dataloader())]
    x_test, y_test = batches_to_tensor(dm.test_dataloader())
    return calib, x_test, y_test


def _rows(cfg: DictConfig, name: str, run: str, calib: list[torch.Tensor], x_test: torch.Tensor,
          y_test: torch.Tensor) -> list[dict]:
    net = load_net(run).cpu().eval()
    qnet = quantize_int8(net, calib, backend=cfg.backend)
    (pred_f, blocks_f), (pred_q, blocks_q) = (predict(m, x_test, cfg.data.batch_size) for m in (net, qnet))
    acc_f, acc_q = float((pred_f == y_test).float().mean()), float((pred_q == y_test).float().mean())
    base = {"model": name, "acc_float": acc_f, "acc_int8": acc_q, "acc_delta_pts": 100 * (acc_q - acc_f),
            "blocks_float": blocks_f, "blocks_int8": blocks_q,
            "agreement": float((pred_f == pred_q).float().mean()),
            **{f"{k}_{kind}": v for kind, m in (("float", net), ("int8", qnet))
               for k, v in mean_cost(m, x_test[:cfg.cost_inputs]).items()}}
    rows = []
    for b in cfg.batch_sizes:
        x = x_test[:b]
        t = measure_interleaved({"float": lambda: net(x), "int8": lambda: qnet(x)}, warmup=cfg.warmup,
                                repeats=cfg.repeats, max_seconds=cfg.max_case_seconds)
        rows.append({**base, "batch": b, "ms_float": t["float"].median_ms, "ms_int8": t["int8"].median_ms,
                     "ms_float_p90": t["float"].p90_ms, "ms_int8_p90": t["int8"].p90_ms,
                     "speedup": t["float"].median_ms / t["int8"].median_ms, "repeats": t["int8"].repeats})
        print(markdown_table(rows[-1:], floatfmt=".4g").splitlines()[-1], flush=True)
    return rows


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/quantize.yaml")
@user_facing
def main(cfg: DictConfig) -> None:
    calib, x_test, y_test = read_splits(cfg)
    rows = [r for name, run in cfg.runs.items() for r in _rows(cfg, name, run, calib, x_test, y_test)]
    cols = ["model", "batch", "acc_float", "acc_int8", "acc_delta_pts", "agreement", "blocks_float", "blocks_int8",
            "gflops_float", "gflops_int8", "int8_gops_int8", "weight_kib_float",
            "weight_kib_int8", "ms_float", "ms_int8", "speedup", "repeats"]
    print("\n" + markdown_table(rows, cols, floatfmt=".4g"))
    path = write_json(cfg.output, {"rows": rows, "machine": machine_info("cpu"), "config": {
        "backend": cfg.backend, "calibration_batches": cfg.calibration_batches, "warmup": cfg.warmup,
        "repeats": cfg.repeats, "max_case_seconds": cfg.max_case_seconds}})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    run_hydra(main)
