"""Run a whole study as a sequence of ordinary entry-point runs (train, cascade, eval).

    python -m experiments.pipeline                   # digits: ladder, SkipNet, cascade, evaluation
    python -m experiments.pipeline pipeline=mnist    # the MNIST study of docs/
    python -m experiments.pipeline pipeline=mnist skip_done=true    # resume: finished steps are kept
    python -m experiments.pipeline pipeline=mnist_compress          # compressed stages (reuses pipeline=mnist's runs)

Each step is ``python -m experiments.<task> <overrides>`` in its own process, so it writes its usual
run folder, which the next step finds (``logs/<task>/runs/<run>/``); a ``bench`` step runs
``python bench/<script>.py <overrides>`` (a measurement: it is rerun on resume, writes where its
``output=`` says, and of ``extra_overrides`` takes only the data's, ``data.*``). A failing step stops the
pipeline with its name and log; the last step's tables are printed at the end.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from experiments.runs import newest_run, output_dir
from experiments.utils import run_hydra, user_facing
from gating.errors import UserError

log = logging.getLogger(__name__)
TASKS = {"train", "cascade", "eval", "bench"}


def finished(log_dir: Path, task: str, run: str) -> bool:
    return newest_run(log_dir / task / "runs" / run) is not None


@user_facing
def run_pipeline(cfg: DictConfig) -> list[dict]:
    """Run the steps in order; returns what each did (seconds, status)."""
    done = []
    out = output_dir()
    log_dir = Path(cfg.paths.log_dir)
    for i, step in enumerate(cfg.pipeline.steps, 1):
        if step.task not in TASKS:
            raise UserError(f"pipeline step {i} has task {step.task!r}: use one of {sorted(TASKS)}")
        if step.task == "bench" and not step.get("script"):
            raise UserError(f"pipeline step {i} is a bench step without a script: give script=<a file of bench/, "
                            f"without .py>, e.g. script: compare")
        name = step.get("run") or step.get("script") or step.task
        reuse = cfg.skip_done or step.get("reuse", False)  # reuse: another study's run, kept when it exists
        if reuse and step.task != "bench" and step.get("run") and finished(log_dir, step.task, step.run):
            print(f"[{i}/{len(cfg.pipeline.steps)}] {name}: finished run found, skipped", flush=True)
            done.append({"step": name, "status": "skipped", "seconds": 0.0})
            continue
        entry = ([str(Path(cfg.paths.root_dir) / "bench" / f"{step.script}.py")] if step.task == "bench"
                 else ["-m", f"experiments.{step.task}"])
        # A bench script has its own config: of the extra overrides it takes the data's (data.*) only.
        extra = [o for o in cfg.extra_overrides if step.task != "bench" or o.startswith("data.")]
        cmd = [sys.executable, *entry, *step.overrides, *extra, f"paths.log_dir={log_dir}"]
        print(f"[{i}/{len(cfg.pipeline.steps)}] {name}: {' '.join(cmd[1:])}", flush=True)
        step_log = out / f"step{i:02d}_{name}.log"
        t0 = time.perf_counter()
        last_step = i == len(cfg.pipeline.steps)
        with step_log.open("w") as f:
            proc = subprocess.run(cmd, stdout=None if last_step else f, stderr=subprocess.STDOUT if not last_step
                                  else f, cwd=cfg.paths.root_dir)
        seconds = round(time.perf_counter() - t0, 1)
        done.append({"step": name, "status": "ok" if proc.returncode == 0 else "failed", "seconds": seconds})
        if proc.returncode != 0:
            tail = step_log.read_text().strip().splitlines()[-5:]
            raise UserError(f"step {i} ({name}) failed with exit status {proc.returncode} after {seconds} s; its log "
                            f"is {step_log}; last lines: {' | '.join(tail)}")
        print(f"    done in {seconds} s", flush=True)
    total = sum(d["seconds"] for d in done)
    print(f"\npipeline {cfg.pipeline.name}: {len(done)} steps in {total:.0f} s; step logs in {out}")
    return done


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline.yaml")
def main(cfg: DictConfig) -> None:
    run_pipeline(cfg)


if __name__ == "__main__":
    run_hydra(main)
