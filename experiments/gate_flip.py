"""The single-gate flip test: how far a SkipNet's greedy policy is from the best it could do input by input.

    python -m experiments.gate_flip run=logs/train/runs/mnist_skipnet38_rl
    python -m experiments.gate_flip run=<any SkipNet run> split=val limit=1000

With the run's greedy decisions held fixed, each gate in turn is flipped for every input (a block that
ran is skipped, a skipped block runs) and the input's episode reward is recomputed with the run's own
reward: ``alpha * (cost shares of the skipped blocks) - beta * CE`` (``model.alpha``, ``model.beta``,
``model.reward_cost`` of its config, or ``reward.*`` here). A policy at a per-input optimum of its reward
admits no improving flip. Per block, the share of inputs for which the flip raises the reward is how far
the policy is from that optimum, and on which inputs: a block that always runs and whose skip would pay
on half the inputs is a static choice the reward does not ask for.

Where the data set records a difficulty level per input (``data=mnist_c``: the corruption severity), the
same test per level says whether the run's reward asks for more computation on harder inputs
(:func:`flip_by_level`). For each block the policy decides per input (run for between ``decided_rates``
of the inputs), it also asks whether that decision is worth anything: accuracy with the block on, or off,
for every input against the policy's, and against running it for a random share of the inputs at the
policy's rate, which costs the same (:func:`against_static`, :func:`static_table`); and whether more
computation would help: accuracy with every block run, per level. Writes ``flip.csv`` (one row per
block), ``flip_by_level.csv`` and ``metrics.json`` (the tables, the summary, the reward used).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import experiments  # noqa: F401
from experiments.data import batches_to_tensor
from experiments.report import machine_info, markdown_table, pick_device, write_csv
from experiments.runs import load_net, output_dir, read_run, write_run_record
from experiments.utils import Stopwatch, extras, run_hydra, user_facing
from gating.errors import UserError
from gating.reinforce import correctness_reward, cost_shares, episode_reward
from skipnet import SkipResNet

log = logging.getLogger(__name__)


@dataclass
class Reward:
    """A run's per-input episode reward: SkipNet's ``alpha * sum_i (1 - a_i) c_i - beta * CE`` with cost shares
    ``costs`` (``kind="skip"``), or BlockDrop's ``1 - share**2`` if right, ``-wrong_penalty`` if wrong
    (``kind="correct"``, ``share = sum_i a_i c_i``)."""

    alpha: float
    beta: float
    costs: torch.Tensor
    kind: str = "skip"
    wrong_penalty: float = 1.0

    def __call__(self, actions: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per input ``[B]``, for gate decisions ``actions`` ``[B, G]`` and the logits they gave."""
        costs = self.costs.to(actions.device)
        if self.kind == "correct":
            return correctness_reward(logits.argmax(1) == y, (actions * costs).sum(1), self.wrong_penalty)
        return episode_reward(actions, F.cross_entropy(logits, y, reduction="none"), self.alpha, self.beta, costs)


@torch.no_grad()
def flip_gains(net: SkipResNet, x: torch.Tensor, y: torch.Tensor, reward: Reward) -> tuple[torch.Tensor, torch.Tensor]:
    """For one batch: the greedy decisions ``[B, N]`` (column 0 always 1) and, per input and gate, the
    reward gained by flipping that gate alone with every other decision held ``[B, N - 1]``."""
    out = net(x, mode="greedy", execution="skip")
    actions = out.executed
    base = reward(actions[:, 1:], out.logits, y)
    gains = torch.empty(x.shape[0], net.num_gates, dtype=torch.float64, device=x.device)
    for g in range(net.num_gates):
        flipped = actions.clone()
        flipped[:, g + 1] = 1.0 - flipped[:, g + 1]
        logits = net(x, mode="greedy", execution="skip", actions=flipped).logits
        gains[:, g] = (reward(flipped[:, 1:], logits, y) - base).double()
    return actions.bool(), gains


@torch.no_grad()
def local_optimum(net: SkipResNet, x: torch.Tensor, y: torch.Tensor, reward: Reward, start: torch.Tensor,
                  rounds: int) -> torch.Tensor:
    """Per input, coordinate ascent on the reward from the decisions ``start`` ``[B, N]``: each gate in turn is
    flipped where that raises the input's reward, for ``rounds`` sweeps (or until no flip pays). The result
    admits no improving single flip when ascent stopped early: a per-input local optimum of the reward, and
    so an estimate of what the reward asks of a policy, input by input. It knows the label, so it is a
    ceiling for a policy that must decide from the image."""
    actions = start.clone().float()

    def value(a: torch.Tensor) -> torch.Tensor:
        logits = net(x, mode="greedy", execution="skip", actions=a).logits
        return reward(a[:, 1:], logits, y)

    best = value(actions)
    for _ in range(rounds):
        moved = False
        for g in range(1, net.num_blocks):
            trial = actions.clone()
            trial[:, g] = 1.0 - trial[:, g]
            v = value(trial)
            better = v > best
            if better.any():
                moved = True
                actions[better], best[better] = trial[better], v[better]
        if not moved:
            break
    return actions


@torch.no_grad()
def against_static(net: SkipResNet, x: torch.Tensor, y: torch.Tensor, blocks: list[int],
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Is a per-input decision worth more than a static one? Per-input correctness ``[n]`` with the policy's
    own decisions (``"policy"``), with every block run (``"all_on"``: would more computation help?), and for
    each block ``b`` in ``blocks`` with that block forced on (``"on{b}"``) or off (``"off{b}"``) for every
    input, the other decisions as the policy took them."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        res = net(xb, mode="greedy", execution="skip")
        out.setdefault("policy", []).append((res.logits.argmax(-1) == yb).cpu())
        every = net(xb, mode="greedy", execution="skip", actions=torch.ones_like(res.executed), run_gates=False)
        out.setdefault("all_on", []).append((every.logits.argmax(-1) == yb).cpu())
        for b in blocks:
            for name, value in (("on", 1.0), ("off", 0.0)):
                forced = res.executed.clone()
                forced[:, b] = value
                logits = net(xb, mode="greedy", execution="skip", actions=forced).logits
                out.setdefault(f"{name}{b}", []).append((logits.argmax(-1) == yb).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def static_table(correct: dict[str, torch.Tensor], executed: np.ndarray, blocks: list[int],
                 levels: np.ndarray | None) -> list[dict[str, Any]]:
    """One row per block decided per input (:func:`against_static`): its execution rate, accuracy with the
    policy's decisions and with the block on / off for every input, overall and per difficulty level, and:

    - ``gain_over_random_pts``: the policy's accuracy over running the block for a random share of the
      inputs equal to its rate, at the same cost: ``off + rate * (on - off)``, exact in expectation (each
      input is right with probability ``rate * on_i + (1 - rate) * off_i``). > 0: the per-input decision
      picks the inputs the block helps;
    - ``gain_over_best_static_pts``: over the better of always and never (always costs more).
    """
    def acc(c: torch.Tensor, sel: np.ndarray | None = None) -> float:
        c = c.numpy() if sel is None else c.numpy()[sel]
        return 100.0 * float(c.mean())

    rows = []
    for b in blocks:
        pol, on, off = correct["policy"], correct[f"on{b}"], correct[f"off{b}"]
        rate = float(executed[:, b].mean())
        row = {"block": b, "exec_rate": rate, "acc_policy": acc(pol), "acc_on": acc(on), "acc_off": acc(off),
               "gain_over_random_pts": acc(pol) - (acc(off) + rate * (acc(on) - acc(off))),
               "gain_over_best_static_pts": acc(pol) - max(acc(on), acc(off))}
        if levels is not None:
            for key, c in (("policy", pol), ("on", on), ("off", off)):
                row[f"acc_{key}_by_level"] = [round(acc(c, levels == v), 2) for v in np.unique(levels)]
        rows.append(row)
    return rows


def _decided_rates(cfg: DictConfig) -> tuple[float, float]:
    rates = cfg.get("decided_rates", (0.05, 0.95))
    try:
        low, high = (float(r) for r in rates)
    except (TypeError, ValueError):
        low = high = math.nan
    if not low < high:
        raise UserError(f"decided_rates must be two execution rates [low, high] with low < high (a block run for "
                        f"a share of the inputs between them is decided per input), got {rates}")
    return low, high


def _accuracy(correct: torch.Tensor, levels: np.ndarray | None) -> dict[str, Any]:
    c = correct.numpy()
    out: dict[str, Any] = {"acc": 100.0 * float(c.mean())}
    if levels is not None:
        out["acc_by_level"] = [round(100.0 * float(c[levels == v].mean()), 2) for v in np.unique(levels)]
    return out


def optimum_by_level(executed: np.ndarray, optimum: np.ndarray, flops: np.ndarray, optimum_flops: np.ndarray,
                     levels: np.ndarray) -> list[dict[str, Any]]:
    """Per difficulty level: blocks and GFLOPs per input under the policy and at the reward's per-input local
    optimum (:func:`local_optimum`), and each one's cost over the easiest level's: whether the reward itself
    asks for more computation on harder inputs, and by how much."""
    rows = []
    for level in np.unique(levels):
        sel = levels == level
        rows.append({"level": int(level), "n": int(sel.sum()),
                     "blocks_per_img": float(executed[sel].sum(1).mean()),
                     "optimum_blocks_per_img": float(optimum[sel].sum(1).mean()),
                     "gflops_per_img": float(flops[sel].mean()) / 1e9,
                     "optimum_gflops_per_img": float(optimum_flops[sel].mean()) / 1e9})
    for key in ("gflops_per_img", "optimum_gflops_per_img"):
        base = rows[0][key]
        for r in rows:
            r[key.replace("gflops_per_img", "over_easiest")] = r[key] / base if base > 0 else None
    return rows


def flip_table(executed: np.ndarray, gains: np.ndarray, block_names: list[str]) -> list[dict[str, Any]]:
    """One row per gated block: how often it runs, and for what share of the inputs that run it (skip it)
    running it (skipping it) instead would raise the reward."""
    rows = []
    for g in range(gains.shape[1]):
        ran, gain = executed[:, g + 1], gains[:, g]
        up = gain > 0
        rows.append({
            "block": g + 1, "name": block_names[g + 1] if g + 1 < len(block_names) else str(g + 1),
            "exec_rate": float(ran.mean()),
            "flip_raises_reward_pct": 100.0 * float(up.mean()),
            "skip_pays_when_run_pct": 100.0 * float(up[ran].mean()) if ran.any() else None,
            "run_pays_when_skipped_pct": 100.0 * float(up[~ran].mean()) if (~ran).any() else None,
            "mean_gain": float(gain.mean()),
            "mean_gain_when_raised": float(gain[up].mean()) if up.any() else None,
        })
    return rows


def flip_summary(executed: np.ndarray, gains: np.ndarray) -> dict[str, Any]:
    """The whole policy: the share of inputs some single flip improves, and how many flips do per input."""
    up = gains > 0
    patterns = {row.tobytes() for row in np.packbits(executed, axis=1)}
    return {
        "n": int(gains.shape[0]),
        "inputs_with_an_improving_flip_pct": 100.0 * float(up.any(1).mean()),
        "improving_flips_per_input": float(up.sum(1).mean()),
        "best_flip_gain_mean": float(np.maximum(gains.max(1), 0.0).mean()),
        "distinct_patterns": len(patterns),
        "blocks_per_img": float(executed.sum(1).mean()),
    }


def flip_by_level(executed: np.ndarray, gains: np.ndarray, levels: np.ndarray) -> list[dict[str, Any]]:
    """Per difficulty level (a data set's recorded severity): how much the policy runs, and how much its
    own reward asks it to run, judged one flip at a time. ``blocks_asked_per_img`` is the blocks run,
    plus the skipped blocks whose running would raise the reward, minus the run blocks whose skipping
    would: if it rises with the level while ``blocks_per_img`` does not, the reward asks for an
    input-dependent policy that training did not find; if it is flat too, the reward does not ask."""
    run, up = executed[:, 1:], gains > 0
    rows = []
    for level in np.unique(levels):
        sel = levels == level
        r, u = run[sel], up[sel]
        skipped = ~r
        rows.append({
            "level": int(level), "n": int(sel.sum()),
            "blocks_per_img": float(executed[sel].sum(1).mean()),
            "blocks_asked_per_img": float((executed[sel].sum(1) + (u & skipped).sum(1) - (u & r).sum(1)).mean()),
            "run_pays_when_skipped_pct": 100.0 * float(u[skipped].mean()) if skipped.any() else None,
            "skip_pays_when_run_pct": 100.0 * float(u[r].mean()) if r.any() else None,
            "inputs_with_an_improving_flip_pct": 100.0 * float(u.any(1).mean()),
        })
    return rows


def _reward(cfg: DictConfig, run_cfg: DictConfig, net: SkipResNet, x: torch.Tensor) -> Reward:
    model = run_cfg.get("model") or {}
    given = cfg.get("reward") or {}

    def pick(key: str, run_key: str, default: Any) -> Any:
        v = given.get(key)
        return v if v is not None else model.get(run_key, default)

    kind = pick("cost", "reward_cost", "uniform")
    saved = net.saved_flops(net.cost_table(x[:1])) if kind == "flops" else torch.ones(net.num_gates)
    form = pick("kind", "reward", "skip")
    if form not in ("skip", "correct"):
        raise UserError(f"the flip test needs a reward of each input alone; the run's reward {form!r} depends on the "
                        f"whole batch: pass reward.kind=skip (SkipNet's, with reward.alpha) or reward.kind=correct")
    return Reward(float(pick("alpha", "alpha", 0.1)), float(pick("beta", "beta", 1.0)), cost_shares(kind, saved),
                  form, float(pick("wrong_penalty", "wrong_penalty", 1.0)))


def _inputs(cfg: DictConfig, run_cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """The run's own data split, without training augmentation (the test asks about the inputs as they are),
    and the difficulty level the data set records per input (None where it records none)."""
    data_cfg = run_cfg.get("data")
    if data_cfg is None:
        raise UserError(f"run {cfg.run!r} has no data config: pass a SkipNet training run")
    with open_dict(data_cfg):
        if "augment" in data_cfg:
            data_cfg.augment = False
    datamodule = instantiate(data_cfg)
    x, y = batches_to_tensor(datamodule.eval_dataloader(cfg.split), cfg.get("limit"))
    levels = datamodule.difficulty(cfg.split) if hasattr(datamodule, "difficulty") else None
    return x, y, None if levels is None else np.asarray(levels)[:len(x)]


@user_facing
def gate_flip(cfg: DictConfig) -> dict[str, Any]:
    """Run the flip test on ``cfg.run``'s network; write and print the per-block table."""
    folder, run_cfg, _ = read_run(cfg.run)
    net = load_net(folder)
    if not isinstance(net, SkipResNet):
        raise UserError(f"run {str(folder)!r} holds a {type(net).__name__}, not a SkipNet: the flip test needs gates")
    device, watch = pick_device(cfg.get("device", "auto")), Stopwatch()
    net = net.to(device)
    x, y, levels = _inputs(cfg, run_cfg)
    reward = _reward(cfg, run_cfg, net, x.to(device))
    executed, gains = [], []
    with watch("flip_s"):
        for i in range(0, len(x), cfg.batch_size):
            e, g = flip_gains(net, x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device), reward)
            executed.append(e.cpu())
            gains.append(g.cpu())
    ex, ga = torch.cat(executed).numpy(), torch.cat(gains).numpy()
    cost = net.cost_table(x[:1].to(device))
    table = flip_table(ex, ga, list(cost.block_names))
    summary = flip_summary(ex, ga)
    by_level = flip_by_level(ex, ga, levels) if levels is not None else []
    optimum = []
    if cfg.get("ascent_rounds", 0) and levels is not None:
        with watch("ascent_s"):
            opt = torch.cat([local_optimum(net, x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device),
                                           reward, torch.from_numpy(ex[i:i + cfg.batch_size]).to(device),
                                           cfg.ascent_rounds).cpu()
                             for i in range(0, len(x), cfg.batch_size)])
        optimum = optimum_by_level(ex, opt.bool().numpy(), cost.per_sample(torch.from_numpy(ex).float()).numpy(),
                                   cost.per_sample(opt).numpy(), levels)
    low, high = _decided_rates(cfg)
    decided = [b for b in range(1, ex.shape[1]) if low < ex[:, b].mean() < high]
    with watch("static_s"):
        correct = against_static(net, x.to(device), y.to(device), decided, cfg.batch_size)
        static = static_table(correct, ex, decided, levels)
    all_on = {k: _accuracy(correct[k], levels) for k in ("policy", "all_on")}
    out = output_dir()
    write_csv(out / "flip.csv", table)
    if by_level:
        write_csv(out / "flip_by_level.csv", by_level)
    if optimum:
        write_csv(out / "optimum_by_level.csv", optimum)
    record = {"task": cfg.task_name, "run": str(folder), "split": cfg.split, "output_dir": str(out),
              "reward": {"kind": reward.kind, "alpha": reward.alpha, "beta": reward.beta,
                         "wrong_penalty": reward.wrong_penalty, "costs": reward.costs.tolist()},
              "summary": summary, "blocks": table, "by_level": by_level, "optimum_by_level": optimum,
              "against_static": static, "policy_against_all_on": all_on, "timings": watch.times,
              "machine": machine_info(device), "metrics": {f"flip/{k}": v for k, v in summary.items()}}
    write_run_record(cfg, record)
    _print(cfg, record, reward)
    return record


def _print(cfg: DictConfig, record: dict[str, Any], reward: Reward) -> None:
    folder, summary, table = record["run"], record["summary"], record["blocks"]
    by_level, optimum, out = record["by_level"], record["optimum_by_level"], record["output_dir"]
    said = (f"alpha={reward.alpha:g}, beta={reward.beta:g}" if reward.kind == "skip"
            else f"BlockDrop's reward, wrong_penalty={reward.wrong_penalty:g}")
    print(f"\nsingle-gate flip test: {folder} ({cfg.split}, {summary['n']} inputs, {said})")
    print(markdown_table(table, ["block", "exec_rate", "flip_raises_reward_pct", "skip_pays_when_run_pct",
                                 "run_pays_when_skipped_pct", "mean_gain"], floatfmt=".3g"))
    print(f"inputs that some single flip improves: {summary['inputs_with_an_improving_flip_pct']:.1f}%; "
          f"improving flips per input: {summary['improving_flips_per_input']:.2f}; "
          f"distinct skip patterns: {summary['distinct_patterns']}\nrecord: {out}")
    if by_level:
        print("\nby the level the data set records (blocks run, and what the reward asks one flip at a time):")
        print(markdown_table(by_level, floatfmt=".3g"))
    if optimum:
        print(f"\nby level, at the reward's per-input local optimum ({cfg.ascent_rounds} ascent sweeps from the policy's "
              f"decisions, label-aware: a ceiling):")
        print(markdown_table(optimum, floatfmt=".3g"))
    both = record["policy_against_all_on"]
    print(f"\naccuracy with the policy's decisions {both['policy']['acc']:.2f}%, with every block run "
          f"{both['all_on']['acc']:.2f}%" + (f" (by level: {both['policy']['acc_by_level']} against "
                                              f"{both['all_on']['acc_by_level']})" if by_level else ""))
    if record["against_static"]:
        print("\nthe blocks decided per input, against the same block on / off for every input (accuracy, %):")
        print(markdown_table(record["against_static"], ["block", "exec_rate", "acc_policy", "acc_on", "acc_off",
                                                        "gain_over_random_pts", "gain_over_best_static_pts"],
                             floatfmt=".4g"))


@hydra.main(version_base="1.3", config_path="../configs", config_name="gate_flip.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    gate_flip(cfg)


if __name__ == "__main__":
    run_hydra(main)
