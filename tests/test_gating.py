"""Gates, decision modes, the row-compaction engine and the REINFORCE pieces."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from gating.execution import blend, identity, run_rows
from gating.gates import FFGateI, FFGateII, RNNGate, select_state
from gating.policy import decide, threshold_logit
from gating.reinforce import policy_gradient_loss, returns_to_go, skip_rewards, update_baseline

CHANNELS = [16, 16, 32]


@pytest.mark.parametrize("gate_cls", [FFGateI, FFGateII, RNNGate])
def test_gate_shapes_state_and_gradients(gate_cls):
    torch.manual_seed(0)
    gate = gate_cls(CHANNELS)
    state = gate.initial_state(5, torch.device("cpu"))
    logits = []
    for i, c in enumerate(CHANNELS):
        logit, state = gate(torch.randn(5, c, 8, 8), i, state)
        assert logit.shape == (5,)
        logits.append(logit)
    if gate_cls is RNNGate:
        assert state[0].shape == (5, 10) and state[1].shape == (5, 10)
    else:
        assert state is None
    torch.stack(logits).sum().backward()
    missing = [n for n, p in gate.named_parameters() if p.grad is None]
    assert not missing, missing


def test_rnn_gate_keeps_no_state():
    """The same input and state give the same output: nothing is remembered between calls."""
    gate = RNNGate(CHANNELS).eval()
    x = torch.randn(3, 16, 4, 4)
    s0 = gate.initial_state(3, x.device)
    a, s1 = gate(x, 0, s0)
    b, _ = gate(x, 0, s0)
    assert torch.equal(a, b)
    c, _ = gate(x, 0, s1)  # a different state gives a different answer: the state is really used
    assert not torch.equal(a, c)
    assert torch.equal(select_state(s1, torch.tensor([2, 0]))[0], s1[0][[2, 0]])


def test_decision_modes():
    logit = torch.tensor([-2.0, -0.1, 0.1, 3.0], requires_grad=True)
    greedy = decide(logit, "greedy")
    assert greedy.action.tolist() == [0, 0, 1, 1] and greedy.log_prob is None
    assert decide(logit, "greedy", threshold=0.9).action.tolist() == [0, 0, 0, 1]
    assert threshold_logit(0.5) == 0.0

    hard = decide(logit, "hard_st")
    assert hard.gate.tolist() == [0, 0, 1, 1]  # forward: hard
    hard.gate.sum().backward()  # backward: through p (straight-through)
    p = torch.sigmoid(logit.detach())
    assert torch.allclose(logit.grad, p * (1 - p))

    soft = decide(logit.detach(), "soft")
    assert torch.allclose(soft.gate, p)

    torch.manual_seed(0)
    sampled = decide(logit.detach(), "sample")
    expected = torch.distributions.Bernoulli(logits=logit.detach()).log_prob(sampled.action)
    assert torch.allclose(sampled.log_prob, expected)
    with pytest.raises(ValueError, match="unknown gate mode"):
        decide(logit, "nope")


def test_sampling_follows_the_probability():
    torch.manual_seed(0)
    logit = torch.full((20000,), torch.logit(torch.tensor(0.3)).item())
    assert decide(logit, "sample").action.mean().item() == pytest.approx(0.3, abs=0.01)


def _conv_pair():
    torch.manual_seed(0)
    on = nn.Conv2d(4, 6, 3, stride=2, padding=1).eval()
    off = nn.Conv2d(4, 6, 1, stride=2).eval()
    return on, off


@pytest.mark.parametrize("seed", range(5))
def test_run_rows_equals_masked_blend(seed):
    on_fn, off_fn = _conv_pair()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, 8, 8, generator=g)
    mask = torch.rand(9, generator=g) < 0.5
    with torch.no_grad():
        real = run_rows(on_fn, off_fn, x, mask)
        masked = blend(on_fn(x), off_fn(x), mask.float())
    assert torch.allclose(real, masked, atol=1e-6)


def test_run_rows_only_computes_the_rows_it_needs():
    calls = []

    def on(t):
        calls.append(("on", t.shape[0]))
        return t * 2

    def off(t):
        calls.append(("off", t.shape[0]))
        return t

    x = torch.arange(6.0).view(6, 1)
    out = run_rows(on, off, x, torch.tensor([1, 0, 0, 1, 1, 0]))
    assert out.squeeze(1).tolist() == [0, 1, 2, 6, 8, 5] and sorted(calls) == [("off", 3), ("on", 3)]
    calls.clear()
    run_rows(on, off, x, torch.zeros(6))
    assert calls == [("off", 6)]  # every gate closed: the block is not run at all
    calls.clear()
    run_rows(on, off, x, torch.ones(6))
    assert calls == [("on", 6)]


def test_run_rows_batch_one_takes_the_plain_path():
    x = torch.randn(1, 3)
    seen = []
    run_rows(lambda t: seen.append(t) or t, identity, x, torch.tensor([True]))
    assert seen[0] is x  # no gather, no copy


def test_rewards_and_returns_by_hand():
    actions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    costs = torch.tensor([0.5, 0.25, 0.25])
    r = skip_rewards(actions, alpha=0.4, costs=costs)
    assert torch.allclose(r, torch.tensor([[0.0, 0.1, 0.1], [0.2, 0.0, 0.0]]))
    ret = returns_to_go(r, terminal=torch.tensor([-1.0, -0.5]))
    assert torch.allclose(ret, torch.tensor([[-0.8, -0.8, -0.9], [-0.3, -0.5, -0.5]]))


def test_policy_gradient_pushes_towards_rewarded_actions():
    logit = torch.zeros(1, 2, requires_grad=True)
    action = torch.tensor([[0.0, 0.0]])  # skipped both
    log_prob = -torch.nn.functional.binary_cross_entropy_with_logits(logit, action, reduction="none")
    loss = policy_gradient_loss(log_prob, returns=torch.tensor([[1.0, 1.0]]))
    loss.backward()
    assert (logit.grad > 0).all()  # descending the loss lowers the execute logit: more skipping
    b = update_baseline(torch.zeros(2), torch.tensor([[1.0, 3.0], [3.0, 5.0]]), momentum=0.5)
    assert b.tolist() == [1.0, 2.0]


def test_policy_gradient_scale_under_mean_and_sum():
    """On a hand-made batch: the per-sample term is -sum_i log pi(a_i) * (R_i - b); ``sum`` is B times ``mean``."""
    log_prob = torch.tensor([[-0.1, -0.2], [-0.3, -0.4], [-0.5, -0.6]], requires_grad=True)
    returns = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]])
    per_sample = torch.tensor([0.1 * 1 + 0.2 * 2, 0.3 * 0.5 - 0.4, 0.5 * 0 + 0.6 * 3])  # [0.5, -0.25, 1.8]
    mean = policy_gradient_loss(log_prob, returns, baseline=0.0, reduction="mean")
    total = policy_gradient_loss(log_prob, returns, baseline=0.0, reduction="sum")
    assert mean.item() == pytest.approx(per_sample.mean().item())
    assert total.item() == pytest.approx(per_sample.sum().item()) and total.item() == pytest.approx(3 * mean.item())
    (g_mean,) = torch.autograd.grad(mean, log_prob)
    (g_sum,) = torch.autograd.grad(total, log_prob)
    assert torch.allclose(g_mean, -returns / 3) and torch.allclose(g_sum, -returns)
    # The baseline and the entropy bonus scale the same way.
    ent = torch.full((3, 2), 0.5)
    m = policy_gradient_loss(log_prob, returns, 1.0, ent, 0.1, reduction="mean")
    s = policy_gradient_loss(log_prob, returns, 1.0, ent, 0.1, reduction="sum")
    assert s.item() == pytest.approx(3 * m.item())
    with pytest.raises(ValueError, match="reduction"):
        policy_gradient_loss(log_prob, returns, reduction="none")


@pytest.mark.parametrize("gate", ["rnn", "ffgate1"])
def test_sharpen_divides_the_output_layer_once(gate):
    from models import create_model

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1, gate=gate).eval()
    x = torch.randn(4, 16, 8, 8)
    state = net.gate.initial_state(4, x.device)
    with torch.no_grad():
        before, _ = net.gate(x, 0, state)
        net.gate.sharpen(0.05)
        after, _ = net.gate(x, 0, state)
        again, _ = net.gate(x, 0, state)
    assert torch.allclose(after, before / 0.05, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, again)  # applied once, not on every pass
    with pytest.raises(ValueError, match="temperature"):
        net.gate.sharpen(0.0)


def test_rnn_gate_temperature_argument_only_loads_old_configs():
    RNNGate([16, 32], temperature=1.0)  # what every run written before issue 15 has in its config
    with pytest.raises(ValueError, match="model.gate_temperature"):
        RNNGate([16, 32], temperature=0.05)


def test_run_rows_inplace_updates_only_the_selected_rows():
    x = torch.arange(12.0).view(6, 2)
    keep = x.clone()
    on = torch.tensor([0, 1, 0, 1, 1, 0])
    out = run_rows(lambda t: t * 10, identity, x, on, inplace=True)
    assert out.data_ptr() == x.data_ptr()  # written into the input: no new batch tensor
    expected = torch.where(on.bool().unsqueeze(1), keep * 10, keep)
    assert torch.equal(out, expected)
    # Without inplace the input is left alone.
    x2 = keep.clone()
    assert torch.equal(run_rows(lambda t: t * 10, identity, x2, on), expected) and torch.equal(x2, keep)


def test_triage_levels_drop_dominated_points_and_order_by_cost_and_accuracy():
    from gating.adapters import Point, triage_levels

    pts = [Point("default", val_acc=0.99, val_gflops_per_img=10.0),
           Point("a", val_acc=0.683, val_gflops_per_img=4.0),     # dominated by b: costlier and less accurate
           Point("b", val_acc=0.826, val_gflops_per_img=3.0),
           Point("c", val_acc=0.90, val_gflops_per_img=6.0),
           Point("d", val_acc=0.50, val_gflops_per_img=1.0),
           Point("e", val_acc=0.95, val_gflops_per_img=12.0)]     # costlier than level 0: never a triage level
    levels = triage_levels(pts)
    assert [p.label for p in levels] == ["default", "c", "b", "d"]
    assert all(a.val_gflops_per_img > b.val_gflops_per_img and a.val_acc >= b.val_acc
               for a, b in zip(levels[1:], levels[2:]))
    unpriced = [Point("x"), Point("y")]
    assert triage_levels(unpriced) == unpriced


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's Inductor needs a C++ compiler on the CPU (install g++)")
def test_compiled_stage_follows_the_batch_without_recompiling():
    from torch._dynamo.utils import counters

    from gating.execution import DynamicBatchCompiled
    from models import create_model

    torch._dynamo.reset()
    counters.clear()
    net = create_model("tiny_cnn", num_classes=10, in_chans=1).eval()
    compiled = DynamicBatchCompiled(net)  # inductor: C++ kernels on the CPU
    assert list(compiled.state_dict()) == [f"module.{k}" for k in net.state_dict()]
    with torch.no_grad():
        for b in (3, 5, 8, 1, 13, 2, 7, 1):  # sub-batch sizes as row compaction makes them
            x = torch.randn(b, 1, 28, 28)
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)
    # One graph for every batch size above one, one for size one: not one per size.
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_rnn_gate_logit_one_is_its_forward_step_for_one_input():
    """The batch-1 step (NumPy on the CPU) threads its state and gives the forward's logits."""
    torch.manual_seed(0)
    gate = RNNGate(channels=[16, 16, 32]).eval()
    xs = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]
    state, one_state = gate.initial_state(1, torch.device("cpu")), None
    with torch.no_grad():
        for k, x in enumerate(xs):
            before = one_state
            logit, state = gate(x, k, state)
            one, one_state = gate.logit_one(x, k, one_state)
            assert isinstance(one, float) and one == pytest.approx(float(logit), abs=1e-5)
            assert np.allclose(one_state[0], state[0][0].numpy(), atol=1e-6)
    one, grad_state = gate.logit_one(xs[2], 2, before)  # with autograd on: the torch step, same logit
    assert isinstance(grad_state[0], torch.Tensor) and one == pytest.approx(float(logit), abs=1e-5)
    with torch.no_grad():  # weights changed in place (an optimizer step, a loaded state dict) show from the next pass
        gate.load_state_dict({k: v * 1.5 for k, v in gate.state_dict().items()})
        gate.sharpen(0.5)
        state, one_state = gate.initial_state(1, torch.device("cpu")), None
        for k, x in enumerate(xs):
            logit, state = gate(x, k, state)
            one, one_state = gate.logit_one(x, k, one_state)
            assert one == pytest.approx(float(logit), abs=1e-5)
        # a pass that starts from a torch state (its first positions ran batched) reads them too
        torch_state = gate(xs[0], 0, gate.initial_state(1, torch.device("cpu")))[1]
        gate.proj.bias.add_(1.0)
        assert gate.logit_one(xs[1], 1, torch_state)[0] == pytest.approx(float(gate(xs[1], 1, torch_state)[0]),
                                                                         abs=1e-5)
        gate.to(torch.float64).to(torch.float32)  # new storage, same values: the same logits
        assert gate.logit_one(xs[1], 1, torch_state)[0] == pytest.approx(float(gate(xs[1], 1, torch_state)[0]),
                                                                         abs=1e-5)
