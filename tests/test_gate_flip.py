"""The single-gate flip test: gains by hand, the per-block table, and the entry point on a run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.gate_flip import Reward, against_static, flip_gains, flip_summary, flip_table, gate_flip, static_table
from gating.reinforce import cost_shares
from models import create_model
from tests.conftest import compose_config
from tests.helpers.fake_runs import write_untrained_run


def test_gains_are_the_reward_difference_of_one_flipped_gate():
    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1).eval()
    with torch.no_grad():  # scatter the decisions so both actions occur
        for p in net.gate.parameters():
            p.mul_(3.0)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 10, (6,))
    reward = Reward(alpha=0.7, beta=1.3, costs=cost_shares("uniform", torch.ones(net.num_gates)))
    executed, gains = flip_gains(net, x, y, reward)
    assert executed.shape == (6, net.num_blocks) and gains.shape == (6, net.num_gates)
    with torch.no_grad():
        greedy = net(x)
        assert torch.equal(executed, greedy.executed.bool())
        for g in (0, 4, net.num_gates - 1):
            a = greedy.executed.clone()
            a[:, g + 1] = 1 - a[:, g + 1]
            ce = F.cross_entropy(net(x, actions=a).logits, y, reduction="none")
            ce0 = F.cross_entropy(greedy.logits, y, reduction="none")
            # Skipping a block that ran gains alpha * c_g; running a skipped one costs it.
            by_hand = 0.7 / net.num_gates * (greedy.executed[:, g + 1] - a[:, g + 1]) - 1.3 * (ce - ce0)
            assert torch.allclose(gains[:, g].float(), by_hand, atol=1e-5), g


def test_flip_table_and_summary_on_hand_made_gains():
    executed = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 1]], dtype=bool)
    gains = np.array([[0.2, -0.1], [-0.3, 0.0], [0.1, 0.4], [-0.2, -0.5]])
    rows = flip_table(executed, gains, ["b0", "b1", "b2"])
    assert [r["name"] for r in rows] == ["b1", "b2"]
    assert rows[0]["exec_rate"] == 0.5 and rows[0]["flip_raises_reward_pct"] == 50.0
    assert rows[0]["skip_pays_when_run_pct"] == 50.0 and rows[0]["run_pays_when_skipped_pct"] == 50.0
    assert rows[1]["flip_raises_reward_pct"] == 25.0  # a gain of exactly 0 does not count
    assert rows[1]["run_pays_when_skipped_pct"] == 50.0 and rows[1]["skip_pays_when_run_pct"] == 0.0
    s = flip_summary(executed, gains)
    assert s["inputs_with_an_improving_flip_pct"] == 50.0
    assert s["improving_flips_per_input"] == 0.75
    assert s["best_flip_gain_mean"] == pytest.approx((0.2 + 0 + 0.4 + 0) / 4)
    assert s["distinct_patterns"] == 4 and s["blocks_per_img"] == 2.0


def test_flip_by_level_counts_what_the_reward_asks_per_level():
    from experiments.gate_flip import flip_by_level

    executed = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 1]], dtype=bool)
    gains = np.array([[0.2, -0.1], [-0.3, 0.0], [0.1, 0.4], [-0.2, -0.5]])
    rows = flip_by_level(executed, gains, np.array([0, 0, 5, 5]))
    assert [r["level"] for r in rows] == [0, 5] and [r["n"] for r in rows] == [2, 2]
    # Level 0: 2.5 blocks run; input 0's run block 1 would pay skipped (-1): 2.0 asked.
    assert rows[0]["blocks_per_img"] == 2.5 and rows[0]["blocks_asked_per_img"] == 2.0
    # Level 5: 1.5 run; input 2's two skipped blocks would both pay run (+2): 2.5 asked.
    assert rows[1]["blocks_per_img"] == 1.5 and rows[1]["blocks_asked_per_img"] == 2.5
    assert rows[1]["run_pays_when_skipped_pct"] == pytest.approx(100 * 2 / 3)
    assert rows[1]["skip_pays_when_run_pct"] == 0.0 and rows[0]["inputs_with_an_improving_flip_pct"] == 50.0


def _flip_untrained(tmp_path, data: str, experiment: str, overrides: list[str]) -> dict:
    """gate_flip's entry point on an untrained run of ``experiment`` over ``data``, with ``overrides``."""
    data_cfg = compose_config("train.yaml", [f"data={data}"], tmp_path / "x").data
    run = write_untrained_run(tmp_path / "logs" / "train" / "runs" / "sn" / "0", experiment, data_cfg)
    return gate_flip(compose_config("gate_flip.yaml", [f"run={run}", "split=val", *overrides], tmp_path / "flip"))


def test_entry_point_on_a_skipnet_run(tmp_path):
    record = _flip_untrained(tmp_path, "synthetic", "digits_skipnet20_rl", ["limit=40", "batch_size=16",
                                                                           "reward.cost=flops"])
    assert record["summary"]["n"] == 40 and len(record["blocks"]) == 8
    assert record["reward"]["alpha"] == 1.0  # the run's own alpha (digits_skipnet20_rl)
    assert sum(record["reward"]["costs"]) == pytest.approx(1.0) and len(set(record["reward"]["costs"])) > 1
    saved = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert saved["metrics"]["flip/n"] == 40 and (tmp_path / "flip" / "flip.csv").is_file()


def test_a_blockdrop_run_is_scored_with_its_own_reward_and_climbed_per_level(tmp_path):
    record = _flip_untrained(tmp_path, "digits_c", "digits_c_skipnet20_rl", ["limit=60", "batch_size=30",
                                                                            "ascent_rounds=2"])
    assert record["reward"]["kind"] == "correct" and record["reward"]["wrong_penalty"] == 2.0
    levels = [r["level"] for r in record["optimum_by_level"]]
    assert levels == sorted(levels) and len(levels) > 1 and (tmp_path / "flip" / "optimum_by_level.csv").is_file()
    assert all(1 <= r["optimum_blocks_per_img"] <= 9 for r in record["optimum_by_level"])
    run = tmp_path / "logs" / "train" / "runs" / "sn" / "0"
    budget = compose_config("gate_flip.yaml", [f"run={run}", "split=val", "limit=8", "reward.kind=budget"],
                            tmp_path / "flip2")
    with pytest.raises(SystemExit):  # a batch-dependent reward is refused in one line
        gate_flip(budget)


@pytest.mark.parametrize("rates", ["[0.9,0.1]", "[0.5]", "[a,b]"])
def test_bad_decided_rates_are_refused_in_one_line(tmp_path, capsys, rates):
    with pytest.raises(SystemExit):
        _flip_untrained(tmp_path, "synthetic", "digits_skipnet20_rl", ["limit=8", f"decided_rates={rates}"])
    assert "decided_rates must be two execution rates" in capsys.readouterr().err


def test_a_run_without_gates_is_refused(tmp_path):
    data = compose_config("train.yaml", ["data=synthetic"], tmp_path / "x").data
    run = write_untrained_run(tmp_path / "logs" / "train" / "runs" / "r" / "0", "digits_resnet20", data)
    cfg = compose_config("gate_flip.yaml", [f"run={run}"], tmp_path / "flip")
    with pytest.raises(SystemExit):  # user_facing: one line on stderr, exit status 2
        gate_flip(cfg)


def test_local_optimum_admits_no_improving_flip_and_never_lowers_the_reward():
    from experiments.gate_flip import local_optimum

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1).eval()
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    reward = Reward(alpha=1.0, beta=1.0, costs=cost_shares("uniform", torch.ones(net.num_gates)))
    start = torch.ones(8, net.num_blocks)

    def value(a):
        with torch.no_grad():
            return reward(a[:, 1:], net(x, actions=a).logits, y)

    opt = local_optimum(net, x, y, reward, start, rounds=20)
    assert opt[:, 0].eq(1).all() and (value(opt) >= value(start) - 1e-6).all()
    for g in range(1, net.num_blocks):  # no single flip raises any input's reward any more
        trial = opt.clone()
        trial[:, g] = 1 - trial[:, g]
        assert (value(trial) <= value(opt) + 1e-6).all(), g


def test_optimum_by_level_on_hand_made_patterns():
    from experiments.gate_flip import optimum_by_level

    executed = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)
    optimum = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
    rows = optimum_by_level(executed, optimum, np.array([3e9, 3e9, 3e9]), np.array([1e9, 2e9, 3e9]), np.array([0, 1, 1]))
    assert [r["level"] for r in rows] == [0, 1]
    assert rows[1]["optimum_blocks_per_img"] == 2.5 and rows[1]["optimum_over_easiest"] == 2.5
    assert rows[1]["over_easiest"] == 1.0 and rows[0]["optimum_gflops_per_img"] == 1.0


def test_static_table_on_hand_made_correctness():
    """The policy's accuracy against the better of always-on and always-off, overall and per level."""
    correct = {"policy": torch.tensor([1, 1, 1, 0]).bool(), "on3": torch.tensor([1, 1, 0, 0]).bool(),
               "off3": torch.tensor([1, 0, 0, 1]).bool(), "on1": torch.tensor([1, 1, 1, 1]).bool(),
               "off1": torch.tensor([0, 0, 1, 1]).bool()}
    executed = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]], dtype=bool)
    row, other = static_table(correct, executed, [3, 1], np.array([0, 0, 1, 1]))
    # block 1 never runs: a random share of 0 is "off" itself; always on would be 25 points better
    assert other["gain_over_random_pts"] == 25.0 and other["gain_over_best_static_pts"] == -25.0
    assert row["exec_rate"] == 0.5 and row["acc_policy"] == 75.0 and row["acc_on"] == row["acc_off"] == 50.0
    assert row["gain_over_best_static_pts"] == 25.0
    assert row["gain_over_random_pts"] == 25.0  # off + 0.5 * (on - off) = 50: the on/off accuracies are equal
    assert row["acc_policy_by_level"] == [100.0, 50.0] and row["acc_off_by_level"] == [50.0, 50.0]


def test_entry_point_tests_each_decided_block_against_static_choices(tmp_path):
    """With every block counted as decided, a block the policy always (never) runs gives the policy's own
    accuracy when forced on (off): the forcing changes that block only."""
    record = _flip_untrained(tmp_path, "synthetic", "digits_skipnet20_rl", ["limit=40", "batch_size=16",
                                                                           "decided_rates=[-1,2]"])
    rows = record["against_static"]
    assert [r["block"] for r in rows] == list(range(1, 9))
    for r in rows:
        if r["exec_rate"] == 1.0:
            assert r["acc_on"] == r["acc_policy"]
        if r["exec_rate"] == 0.0:
            assert r["acc_off"] == r["acc_policy"]
    assert any(r["exec_rate"] in (0.0, 1.0) for r in rows)
    both = record["policy_against_all_on"]
    assert both["policy"]["acc"] == rows[0]["acc_policy"] and 0 <= both["all_on"]["acc"] <= 100


def test_against_static_forces_one_block_or_all_and_nothing_else():
    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    net.threshold = 0.01  # untrained gates: every block runs, so "all on" is the policy itself
    got = against_static(net, x, y, [3], batch_size=5)
    assert torch.equal(got["all_on"], got["policy"]) and torch.equal(got["on3"], got["policy"])
    net.threshold = 0.99  # now none past block 0: "off" is the policy, "on" runs block 3 alone on top
    got = against_static(net, x, y, [3], batch_size=5)
    assert torch.equal(got["off3"], got["policy"])
    with torch.no_grad():
        only3 = torch.zeros(12, net.num_blocks)
        only3[:, 0] = only3[:, 3] = 1
        want = net(x, mode="greedy", execution="skip", actions=only3).logits.argmax(-1) == y
        every = net(x, mode="greedy", execution="skip", actions=torch.ones(12, net.num_blocks)).logits.argmax(-1) == y
    assert torch.equal(got["on3"], want) and torch.equal(got["all_on"], every)
