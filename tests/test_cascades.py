"""IDK deciders, the early-exit engine, the cascade model, its training objective and calibration."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from cascades import Ensemble, IDKCascade, build_cascade, load_cascade_state
from cascades.calibrate import CascadeRecords, collect, fit_temperatures
from experiments.cascade import verify
from experiments.stats import mean_interval, wilson_interval
from experiments.systems import IDKCascadeModule
from gating import UserError
from gating.calibration import expected_calibration_error, fit_temperature
from gating.cost import StageCosts, count_flops
from gating.execution import run_exits
from gating.idk import AgreementIDK, EntropyIDK, LearnedIDK, MaxProbIDK
from gating.thresholds import ThresholdSearch, exit_stages
from models import create_model


def _stages(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {
        "linear": create_model("linear", num_classes=10, in_chans=1, image_size=12),
        "tiny_cnn": create_model("tiny_cnn", num_classes=10, in_chans=1, width=4),
        "resnet20": create_model("resnet20_cifar", num_classes=10, in_chans=1),
    }


# ------------------------------------------------------------------------------------------ deciders
def test_deciders_confidence_and_defer_rule():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    mp = MaxProbIDK()
    d = mp(probs, 0.5)
    assert torch.allclose(d.confidence, torch.tensor([0.9, 0.4, 1 / 3]))
    assert d.defer.tolist() == [False, True, True]
    ent = EntropyIDK().confidence(probs)
    assert ent[0] > ent[1] > ent[2] and ent[2] == pytest.approx(0.0, abs=1e-6)
    assert EntropyIDK().confidence(torch.tensor([[1.0, 0.0, 0.0]]))[0] == pytest.approx(1.0)
    # Agreement: three members; sample 0 unanimous, sample 1 two against one.
    members = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.8, 0.2], [0.3, 0.7]], [[0.7, 0.3], [0.9, 0.1]]])
    agree = AgreementIDK()(members, 1.0)
    assert torch.allclose(agree.confidence, torch.tensor([1.0, 2 / 3]))
    assert agree.defer.tolist() == [False, True]
    assert torch.allclose(MaxProbIDK().confidence(members), members.mean(0).amax(-1))


def test_learned_decider_learns_when_the_stage_is_wrong():
    torch.manual_seed(0)
    n, c = 2000, 10
    sharp = torch.rand(n) < 0.5
    logits = torch.randn(n, c) * torch.where(sharp, 6.0, 0.3)[:, None]
    probs = logits.softmax(-1)
    right = sharp  # the stage is right exactly where it is sharp
    head = LearnedIDK(hidden=16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(head.logit(probs), right.float())
        loss.backward()
        opt.step()
    decision = head(probs, 0.5)
    assert (decision.defer == ~right).float().mean() > 0.95
    with pytest.raises(ValueError, match="features"):
        LearnedIDK(use_features=True).confidence(probs)


# ------------------------------------------------------------------------------------------ engine
def test_run_exits_compacts_and_restores_order():
    x = torch.arange(8.0)[:, None]
    seen: list[int] = []

    def stage(k: int, exit_at: set):
        def run(rows):
            seen.append(rows.shape[0])
            done = torch.tensor([int(r) in exit_at for r in rows[:, 0]])
            return (rows * 10 + k, rows[:, 0] + 100 * k), done, rows
        return run

    (out, tag), exits = run_exits([stage(0, {1, 4}), stage(1, {0, 7, 5}), stage(2, set())], x)
    assert seen == [8, 6, 3]  # each stage sees only the rows still in flight
    assert exits.tolist() == [1, 0, 2, 2, 0, 1, 2, 1]
    assert torch.equal(out[:, 0], torch.arange(8.0) * 10 + exits)
    assert torch.equal(tag, torch.arange(8.0) + 100 * exits)
    # A tuple state travels with its rows: here the input and a per-row counter of stages run.
    def counting(k: int, exit_at: set):
        def run(state):
            rows, count = state
            done = torch.tensor([int(r) in exit_at for r in rows[:, 0]])
            return (count + 1,), done, (rows, count + 1)
        return run

    (count,), exits2 = run_exits([counting(0, {1, 4}), counting(1, {0, 7, 5}), counting(2, set())],
                                 (x, torch.zeros(8)))
    assert torch.equal(count, (exits2 + 1).float())
    # Batch 1 takes the plain path and stops at the first exit.
    seen.clear()
    (out1, _), e1 = run_exits([stage(0, {3}), stage(1, set())], torch.tensor([[3.0]]))
    assert seen == [1] and e1.tolist() == [0] and out1.item() == 30.0


# ------------------------------------------------------------------------------------------ cascade
def test_cascade_inference_agrees_with_every_stage_on_every_sample():
    cascade = build_cascade(_stages(), MaxProbIDK()).eval()
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        every = cascade.forward_all(x)
        conf = [c.double().numpy() for c in every.confidence]
        ts = [float(np.quantile(conf[0], 0.4)), float(np.quantile(conf[1], 0.5))]
        out = cascade(x, ts)
    want_exit = exit_stages(conf, ts)
    assert out.exit_stage.tolist() == want_exit.tolist()
    for i, k in enumerate(want_exit):
        assert torch.allclose(out.logits[i], every.logits[k][i], atol=1e-5)
    assert 0 < (want_exit == 0).sum() < 64 and (want_exit == 2).any()
    # Thresholds +inf defer everything: the cascade is its last stage.
    with torch.no_grad():
        last = cascade(x, [math.inf, math.inf])
    assert (last.exit_stage == 2).all() and torch.allclose(last.logits, every.logits[2], atol=1e-5)
    # Batch 1 gives the same answer as the batch.
    with torch.no_grad():
        one = cascade(x[5:6], ts)
    assert one.exit_stage.item() == want_exit[5]


def test_stage_costs_are_exact_and_include_the_decider():
    stages = _stages()
    cascade = build_cascade(stages, LearnedIDK).eval()
    x = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        cascade(x)  # materialises the lazy heads
    costs = cascade.stage_costs(x)
    assert costs.stage[0] == count_flops(stages["linear"], x) + (11 * 32 + 32 * 1) * 2
    assert costs.stage[2] == count_flops(stages["resnet20"], x)  # no decider after the last stage
    exits = torch.tensor([0, 1, 2, 2])
    assert costs.per_sample(exits).tolist() == [costs.stage[0], sum(costs.stage[:2]), sum(costs.stage), sum(costs.stage)]
    assert costs.expected([1.0, 0.75, 0.5]) == pytest.approx(costs.per_sample(exits).mean().item())


def test_ensemble_stage_with_agreement():
    torch.manual_seed(0)
    members = [create_model("linear", num_classes=10, in_chans=1, image_size=12) for _ in range(3)]
    ens = Ensemble(members)
    cascade = IDKCascade([ens, create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)], [AgreementIDK()],
                         thresholds=[1.0]).eval()
    x = torch.randn(32, 1, 12, 12)
    with torch.no_grad():
        votes = ens.member_logits(x).argmax(-1)
        unanimous = (votes == votes[0]).all(0)
        out = cascade(x)
    assert (out.exit_stage == 0).tolist() == unanimous.tolist()
    with pytest.raises(UserError, match="two members"):
        Ensemble(members[:1])


def test_cascade_rejects_bad_shapes():
    s = _stages()
    with pytest.raises(UserError, match="at least two stages"):
        IDKCascade([s["linear"]], [])
    with pytest.raises(UserError, match="needs 2 deciders"):
        IDKCascade(list(s.values()), [MaxProbIDK()])


# ------------------------------------------------------------------------------------------ training
def test_idk_objective_unrolls_the_soft_cascade():
    stages = _stages()
    cascade = build_cascade({k: stages[k] for k in ("linear", "resnet20")}, LearnedIDK)
    module = IDKCascadeModule(cascade, partial(torch.optim.Adam, lr=1e-2), lam=0.5, num_classes=10)
    module.train()
    assert not cascade.stages[1].training  # frozen stages keep their BatchNorm statistics
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    j, hard = module.objective(x, y)
    with torch.no_grad():
        lg0, p0, _ = cascade.run_stage(0, x)
        lg1, _, _ = cascade.run_stage(1, x)
        a = torch.sigmoid(cascade.deciders[0].logit(p0))
    share = module.cost_share
    loss0, loss1 = (lg0.argmax(-1) != y).float(), (lg1.argmax(-1) != y).float()
    want = (a * loss0 + (1 - a) * loss1).mean() + 0.5 * (share[0] + (1 - a) * share[1]).mean()
    assert j.item() == pytest.approx(want.item(), rel=1e-5)
    j.backward()
    assert cascade.deciders[0].net[0].weight.grad is not None
    assert all(p.grad is None for p in cascade.stages[1].parameters())
    assert hard["exit_stage"].tolist() == (a < 0.5).long().tolist()
    with pytest.raises(UserError, match="learned IDK heads"):
        IDKCascadeModule(build_cascade({k: stages[k] for k in ("linear", "resnet20")}, MaxProbIDK()),
                         partial(torch.optim.Adam), num_classes=10)


def test_cascade_state_round_trip(tmp_path):
    stages = _stages()
    a = build_cascade(stages, LearnedIDK, thresholds=[0.3, 0.7], temperatures=[1.5, 1.0, 0.8])
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        a.eval()(x)
    path = tmp_path / "cascade.pt"
    torch.save({"state_dict": {f"cascade.{k}": v for k, v in a.state_dict().items()}}, path)
    b = build_cascade(_stages(seed=1), LearnedIDK, checkpoint=path).eval()
    assert b.thresholds.tolist() == [0.3, 0.7] and b.temperatures.tolist() == pytest.approx([1.5, 1.0, 0.8])
    with torch.no_grad():
        p = a.run_stage(0, x)[1]
        assert torch.allclose(a.deciders[0].confidence(p), b.deciders[0].confidence(p))
    with pytest.raises(UserError, match="does not fit"):
        load_cascade_state(build_cascade({k: stages[k] for k in ("linear", "resnet20")}, LearnedIDK), path)


# ------------------------------------------------------------------------------------------ calibration
def test_temperature_scaling_fixes_overconfidence():
    torch.manual_seed(0)
    n, c = 5000, 10
    y = torch.randint(0, c, (n,))
    true_logits = torch.randn(n, c)
    true_logits[torch.arange(n), y] += 2.0
    sampled = torch.distributions.Categorical(logits=true_logits).sample()
    over = true_logits * 3.0  # an overconfident model with the same ranking
    t = fit_temperature(over, sampled)
    assert t == pytest.approx(3.0, rel=0.15)
    assert expected_calibration_error((over / t).softmax(-1), sampled) < expected_calibration_error(over.softmax(-1), sampled)


def test_fit_calibrate_verify_end_to_end():
    stages = _stages()
    cascade = build_cascade(stages, MaxProbIDK()).eval()
    torch.manual_seed(0)
    batches = [(torch.randn(50, 1, 12, 12), torch.randint(0, 10, (50,))) for _ in range(2)]
    reports = fit_temperatures(cascade, batches)
    assert len(reports) == 3 and all(r.temperature > 0 for r in reports)
    assert cascade.temperatures.tolist() == pytest.approx([r.temperature for r in reports])
    rec = collect(cascade, batches)
    assert rec.correct.shape == (3, 100)
    costs = cascade.stage_costs(batches[0][0])
    op = ThresholdSearch(costs.stage).fit(rec.confidences(), rec.correct, 0.0)
    res = verify(rec, op.thresholds, costs, reference_stage=2)
    assert res["expected_cost"] == pytest.approx(op.expected_cost)
    assert res["accuracy"] == pytest.approx(op.accuracy)
    lo, hi = res["accuracy_ci"]
    assert lo <= res["accuracy"] <= hi
    # The reference is its own stage's cost, not the cost of reaching it through the cascade.
    assert res["reference_cost"] == costs.stage[2] < sum(costs.stage)
    assert res["cost_cut_pct"] == pytest.approx(100.0 * (1.0 - op.expected_cost / costs.stage[2]))


@pytest.mark.parametrize("num_stages", [2, 3])
def test_verify_reference_cost_is_the_reference_stage_alone(num_stages):
    costs = StageCosts(tuple(f"s{k}" for k in range(num_stages)), tuple(10.0 ** k for k in range(num_stages)))
    g = torch.Generator().manual_seed(0)
    n = 40
    rec = CascadeRecords(labels=torch.randint(0, 10, (n,), generator=g),
                         logits=[torch.randn(n, 10, generator=g) for _ in range(num_stages)],
                         confidence=[torch.rand(n, generator=g) for _ in range(num_stages - 1)])
    every_row_at_last = [1.1] * (num_stages - 1)  # no confidence exceeds 1.1: every row reaches the last stage
    for ref in range(num_stages):
        res = verify(rec, every_row_at_last, costs, reference_stage=ref)
        assert res["reference_cost"] == costs.stage[ref]
    # Every row pays all stages: the cascade costs more than the last model alone, and the cut says so.
    res = verify(rec, every_row_at_last, costs, reference_stage=num_stages - 1)
    assert res["expected_cost"] == pytest.approx(sum(costs.stage))
    assert res["cost_cut_pct"] == pytest.approx(100.0 * (1.0 - sum(costs.stage) / costs.stage[-1]))
    assert res["cost_cut_pct"] < 0


def test_confidence_intervals():
    lo, hi = wilson_interval(990, 1000)
    assert lo < 0.99 < hi and hi - lo < 0.02
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo, hi = mean_interval(torch.ones(100) * 3.0)
    assert lo == hi == 3.0
    lo, hi = mean_interval(torch.tensor([0.0, 1.0] * 50))
    assert lo < 0.5 < hi
