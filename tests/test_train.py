"""The train/eval entry points: run records, checkpoint chaining, sweeps, loggers and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from experiments.cascade import run_cascade
from experiments.eval import evaluate
from experiments.train import train
from gating.cost import count_flops
from gating.errors import UserError
from tests.conftest import ROOT, compose_config, shrink


def test_train_writes_record_and_eval_reproduces_it(train_cfg, tmp_path):
    with open_dict(train_cfg):
        train_cfg.trainer.max_epochs = 2
        train_cfg.trainer.limit_test_batches = 2
    record = train(train_cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["checkpoints"]["best"] and os.path.isfile(saved["checkpoints"]["best"])
    assert saved["data"]["splits"] == {"train": 512, "val": 128, "test": 128}
    for key in ("train/loss_epoch", "val/acc", "val/acc_best", "test/acc", "test/loss", "test/gflops_per_img"):
        assert key in saved["metrics"], key
    assert "fit_s" in saved["timings"]
    # The resolved config is written next to the metrics, with no interpolation left.
    assert "${" not in (tmp_path / "config.yaml").read_text()

    # eval on the run folder finds the best checkpoint and reproduces the test metrics.
    eval_dir = tmp_path / "eval"
    cfg = shrink(compose_config("eval.yaml", ["data=synthetic", "model=tiny_cnn", f"ckpt_path={tmp_path}"],
                                eval_dir))
    with open_dict(cfg):
        cfg.trainer.limit_test_batches = 2
    result = evaluate(cfg)
    assert result["checkpoint"] == saved["checkpoints"]["best"]
    assert result["metrics"]["test/acc"] == pytest.approx(record["metrics"]["test/acc"])
    # Checkpoints load with torch.load(weights_only=True): no pickled code in them.
    torch.load(saved["checkpoints"]["best"], weights_only=True)


def test_resume_from_checkpoint(train_cfg, tmp_path):
    first = train(train_cfg)
    assert first["global_step"] == 2  # one epoch of two batches
    last = json.loads((tmp_path / "metrics.json").read_text())["checkpoints"]["last"]
    cfg = shrink(compose_config("train.yaml", ["data=synthetic", "model=tiny_cnn", f"ckpt_path={last}"],
                                tmp_path / "resumed"))
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
    record = train(cfg)
    assert record["global_step"] == 4  # continued from the end of epoch 0, not from scratch


def test_wandb_logger_offline_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_config("train.yaml", ["data=synthetic", "model=linear", "logger=wandb",
                                        "logger.wandb.offline=true"], tmp_path)
    wandb_node = cfg.logger
    cfg = shrink(cfg)
    with open_dict(cfg):
        cfg.logger = wandb_node
        cfg.trainer.fast_dev_run = True
        cfg.callbacks = None
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.save_dir == str(tmp_path)
    record = train(cfg)
    assert "test/acc" in record["metrics"]


def _run(args: list[str], tmp_path, module: str = "experiments.train") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", module, *flags, f"paths.log_dir={tmp_path}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


FAST = ["data=synthetic", "trainer=cpu", "logger=[]", "++trainer.fast_dev_run=true", "extras.print_config=false"]


def test_multirun_sweep(tmp_path):
    res = _run(["-m", "model=linear,tiny_cnn", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    records = sorted(tmp_path.glob("train/multiruns/**/metrics.json"))
    assert len(records) == 2
    assert {json.loads(r.read_text())["model"]["name"] for r in records} == {"linear", "tiny_cnn"}


def test_optuna_search_config_composes(tmp_path):
    cfg = compose_config("train.yaml", ["hparams_search=mnist_optuna", "experiment=mnist_resnet38"], tmp_path)
    assert cfg.optimized_metric == "val/acc_best"
    assert "optimizer.lr" in cfg.hydra.sweeper.params


@pytest.mark.slow
def test_optuna_search_runs(tmp_path):
    res = _run(["hparams_search=mnist_optuna", "model=linear", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.sampler.n_startup_trials=1", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (next(tmp_path.glob("train/multiruns/**/optimization_results.yaml"))).is_file()


def test_config_typo_is_one_line_with_the_options(tmp_path):
    res = _run(["model=resnet39"], tmp_path)
    assert res.returncode == 2
    line = _last_line(res.stderr)
    assert line.startswith("error: ") and "model/resnet39" in line and "choose one of:" in line and "resnet38" in line
    assert len(res.stderr.strip().splitlines()) == 1


def test_unknown_key_is_one_line(tmp_path):
    res = _run(["trainer.max_epoch=3"], tmp_path)
    assert res.returncode == 2
    line = _last_line(res.stderr)
    assert line.startswith("error: Could not override 'trainer.max_epoch'") and "no such key" in line


def _last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def test_missing_data_folder_is_one_clear_line(tmp_path):
    res = _run(["data=mnist", f"data.data_dir={tmp_path}/nowhere", "trainer=cpu", "logger=[]"], tmp_path)
    assert res.returncode == 2
    line = _last_line(res.stderr)
    assert line.startswith("error: MNIST data folder") and "data.data_dir" in line and "Traceback" not in res.stderr


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    res = _run([f"ckpt_path={tmp_path}/none.ckpt", "trainer=cpu", "logger=[]"], tmp_path, module="experiments.eval")
    assert res.returncode == 2
    line = _last_line(res.stderr)
    assert line.startswith("error: checkpoint") and "ckpt_path=" in line and "Traceback" not in res.stderr


def test_unknown_model_name_is_one_clear_line(tmp_path):
    res = _run(["model=classifier", "model.net.model_name=resnet39_cifar", *FAST], tmp_path)
    assert res.returncode == 2
    assert _last_line(res.stderr).startswith("error: unknown model 'resnet39_cifar'. Did you mean")


def test_cost_command_prints_the_table(tmp_path):
    res = _run(["model=resnet20", "data=cifar10", "latency=true", "warmup=1", "repeats=2"], tmp_path,
               module="experiments.cost")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "layer3.2" in res.stdout and "| True" in res.stdout
    record = json.loads(next(tmp_path.glob("cost/runs/**/cost.json")).read_text())
    assert record["summary"]["agree"] and record["summary"]["gflops_per_img"] == pytest.approx(0.0821, rel=1e-2)


@pytest.mark.parametrize("preset", ["default", "fdr", "limit", "overfit"])
def test_debug_presets_compose(preset, tmp_path):
    cfg = compose_config("train.yaml", [f"debug={preset}", "data=synthetic", "model=linear"], tmp_path)
    assert cfg.trainer.accelerator == "cpu" and cfg.logger is None


def test_debug_fdr_runs(tmp_path):
    cfg = compose_config("train.yaml", ["debug=fdr", "data=synthetic", "model=tiny_cnn"], tmp_path)
    record = train(cfg)
    assert record["global_step"] == 1 and "test/acc" in record["metrics"]


def test_trainer_presets(tmp_path):
    from hydra.utils import instantiate

    ddp = compose_config("train.yaml", ["trainer=ddp"], tmp_path).trainer
    strategy = instantiate(ddp.strategy)
    # Skipped blocks leave parameters without gradients: DDP must allow that.
    assert strategy._ddp_kwargs["find_unused_parameters"] is True and ddp.sync_batchnorm
    gpu = compose_config("train.yaml", ["trainer=gpu"], tmp_path).trainer
    assert gpu.accelerator == "gpu" and gpu.precision == "bf16-mixed"


def test_summarize_tabulates_a_sweep_against_a_reference(tmp_path):
    from experiments.summarize import summarize

    def run(folder, alpha, acc, gflops):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"run_name": "rl", "metrics": {
            "test/acc": acc, "test/gflops_per_img": gflops}}))
        (folder / "config.yaml").write_text(f"model:\n  alpha: {'null' if alpha is None else alpha}\n")

    run(tmp_path / "sweep" / "0", 1.0, 0.99, 0.10)
    run(tmp_path / "sweep" / "1", 2.0, 0.98, 0.05)
    run(tmp_path / "base" / "2026-01-01_00-00-00", None, 0.99, 0.10)
    cfg = compose_config("summarize.yaml", [f"runs={tmp_path / 'sweep'}", f"reference={tmp_path / 'base'}",
                                            "params=[model.alpha]"], tmp_path / "out")
    rows = summarize(cfg)
    assert [r.get("model.alpha") for r in rows] == [None, 1.0, 2.0]
    assert rows[2]["flops_cut_pct"] == pytest.approx(50.0) and rows[2]["acc_delta_pts"] == pytest.approx(-1.0)
    assert (tmp_path / "out" / "summary.md").read_text().count("\n") == 5
    assert "spearman_rho" not in rows[1]  # no adaptivity measured, no such column


def test_summarize_shows_each_runs_adaptivity(tmp_path):
    from experiments.summarize import summarize

    adaptivity = {"hardest_over_easiest": 1.08, "spearman_rho": 0.37, "shape": "rises", "distinct_patterns": 11,
                  "gflops_mean": [0.047, 0.051]}
    for name, a in (("rl", adaptivity), ("resnet", None)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(
            {"run_name": name, "metrics": {"test/acc": 0.95}} | ({"adaptivity": a} if a else {})))
    rows = summarize(compose_config("summarize.yaml", [f"runs={tmp_path / 'runs'}"], tmp_path / "out"))
    by = {r["run"]: r for r in rows}
    assert by["rl"]["spearman_rho"] == 0.37 and by["rl"]["shape"] == "rises" and by["rl"]["distinct_patterns"] == 11
    assert by["resnet"].get("spearman_rho") is None
    assert "hardest_over_easiest" in (tmp_path / "out" / "summary.md").read_text()


def test_summarize_selects_on_val_only(tmp_path):
    """Test figures never choose: the row that is best on test but misses the val bound is not selected."""
    from experiments.summarize import summarize

    def run(folder, alpha, val_acc, val_gflops, test_acc, test_gflops):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"run_name": f"a{alpha}", "metrics": {
            "val/acc": val_acc, "val/gflops_per_img": val_gflops, "test/acc": test_acc,
            "test/gflops_per_img": test_gflops}}))
        (folder / "config.yaml").write_text(f"model:\n  alpha: {alpha}\n")

    run(tmp_path / "sweep" / "0", 1, 0.990, 0.090, 0.980, 0.090)  # cut 10% on val: too little
    run(tmp_path / "sweep" / "1", 2, 0.985, 0.045, 0.975, 0.045)  # meets both bounds on val
    run(tmp_path / "sweep" / "2", 3, 0.970, 0.030, 0.995, 0.030)  # best on test, 2 pts down on val
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.json").write_text(json.dumps({"run_name": "base", "metrics": {
        "val/acc": 0.99, "test/acc": 0.99, "test/gflops_per_img": 0.1}}))  # static: no val cost recorded
    cfg = compose_config("summarize.yaml", [f"runs={tmp_path / 'sweep'}", f"reference={tmp_path / 'base'}",
                                            "select.by=val/acc", "select.min_val_cut_pct=50",
                                            "select.max_val_drop_pts=1.0"], tmp_path / "out")
    rows = summarize(cfg)
    assert [r["run"] for r in rows if r.get("selected")] == ["a2"]
    a2 = next(r for r in rows if r["run"] == "a2")
    assert a2["val_flops_cut_pct"] == pytest.approx(55.0) and a2["val_acc_delta_pts"] == pytest.approx(-0.5)
    cfg.select.max_val_drop_pts = 0.1
    assert not any(r.get("selected") for r in summarize(cfg))


def test_distillation_loss_is_hintons():
    from experiments.systems.distillation import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert distillation_loss(s, t, y, temperature=3.0, alpha=0.0) == pytest.approx(float(ce))
    assert distillation_loss(s, s, y, temperature=3.0, alpha=1.0) == pytest.approx(0.0, abs=1e-6)
    p, q = (t / 3).softmax(1), (s / 3).softmax(1)  # KL(teacher || student) at T = 3, times T^2
    kl = (p * (p.log() - q.log())).sum(1).mean() * 9
    assert distillation_loss(s, t, y, temperature=3.0, alpha=0.25) == pytest.approx(float(0.25 * kl + 0.75 * ce))


def test_distilled_run_trains_only_the_student_and_loads_as_a_classifier(train_cfg, tmp_path, capsys):
    from experiments.runs import load_net

    train(train_cfg)  # the teacher: a tiny CNN in tmp_path
    out = tmp_path / "student"
    cfg = shrink(compose_config("train.yaml", ["data=synthetic", "model=mlp", "distill=resnet38",
                                               f"model.teacher.run={tmp_path}", "model.temperature=2.0"], out))
    assert cfg.run_name == "synthetic_mlp_kd_resnet38"  # beside the label-trained run, never over it
    record = train(cfg)
    assert "train/loss_epoch" in record["metrics"] and "test/acc" in record["metrics"]
    load_net(out)  # only net.* in the checkpoint: it loads as any classifier's
    ckpt = torch.load(record["checkpoints"]["best"], weights_only=True)
    assert not any(k.startswith(("teacher", "_teacher")) for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["temperature"] == 2.0
    bad = compose_config("train.yaml", ["data=synthetic", "model=mlp", "distill=resnet38",
                                        f"model.teacher.run={tmp_path}", "model.alpha=1.5"], tmp_path / "bad")
    with pytest.raises(SystemExit):  # one line for the user (exit status 2), not a traceback
        train(shrink(bad))
    assert "error: distillation alpha must be in [0, 1], got 1.5" in capsys.readouterr().err
    # The teacher stays frozen and in eval mode whatever Lightning does to the module.
    module = instantiate(cfg.model).train()
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.net.parameters()}



def _fine_tuning_of_a_trained_run(tmp_path, group: str):
    """A trained synthetic ResNet-20 run, and the composed config of ``group`` (prune=..., qat=...)
    fine-tuning it: (source folder, output folder, config)."""
    source = tmp_path / "source"
    train(shrink(compose_config("train.yaml", ["data=synthetic", "model=resnet20"], source)))
    out = tmp_path / group.partition("=")[0]
    cfg = compose_config("train.yaml", ["data=synthetic", "model=resnet20", group,
                                        f"model.net.pretrained={source}"], out)
    return source, out, cfg


def test_pruned_run_fine_tunes_the_trained_run_and_loads_with_its_pruned_shapes(tmp_path):
    from experiments.runs import load_net, read_run

    source, out, cfg = _fine_tuning_of_a_trained_run(tmp_path, "prune=l1_50")
    src_net = load_net(source)
    assert cfg.run_name == "synthetic_resnet20_pruned"  # beside the source run, never over it
    assert cfg.trainer.max_epochs == 8 and cfg.optimizer.lr == 0.01  # a fine-tuning schedule over the experiment's
    record = train(shrink(cfg))
    assert record["metrics"]["test/gflops_per_img"] < 0.6 * count_flops(src_net, torch.zeros(1, 1, 16, 16)) / 1e9
    # The run records which weights it pruned (the source's checkpoint file, not a folder that moves on).
    _, run_cfg, _ = read_run(out)
    assert str(run_cfg.model.net.pretrained).endswith(".ckpt")
    net = load_net(out)  # rebuilt pruned from the config, filled from the pruned run's own checkpoint
    assert net.blocks()[0].conv1.out_channels == 8 and net.blocks()[0].conv2.out_channels == 16
    ckpt = torch.load(record["checkpoints"]["best"], weights_only=True)["state_dict"]
    torch.testing.assert_close(net.blocks()[0].conv1.weight, ckpt["net.layer1.0.conv1.weight"].to(torch.float32))


def test_pruned_skipnet_keeps_its_trained_gates_and_fine_tunes_its_slimmer_blocks(tmp_path):
    """experiment=mnist_skipnet38_pruned's recipe on synthetic data: a trained SkipNet-20, half of every
    block's inner channels removed, fine-tuned with frozen gates; its run loads with the pruned shapes."""
    from experiments.runs import load_net, read_run

    source = tmp_path / "source"
    train(shrink(compose_config("train.yaml", ["data=synthetic", "model=skipnet20"], source)))
    src = load_net(source)
    exp = compose_config("train.yaml", ["experiment=mnist_skipnet38_pruned"], tmp_path / "composed")
    assert exp.model.net._target_ == "models.prune.pruned_skipnet" and exp.model.stage == "finetune"
    out = tmp_path / "pruned"
    cfg = compose_config("train.yaml", ["data=synthetic", "model=skipnet20", "model.stage=finetune",
                                        "model.net._target_=models.prune.pruned_skipnet", "+model.net.amount=0.5",
                                        f"model.net.pretrained={source}"], out)
    record = train(shrink(cfg))
    full = count_flops(src.backbone, torch.zeros(1, 1, 16, 16))
    assert record["metrics"]["test/gflops_per_img"] < 0.75 * full / 1e9  # pruned, and skipping on top
    _, run_cfg, _ = read_run(out)
    assert str(run_cfg.model.net.pretrained).endswith(".ckpt")  # the SkipNet it pruned, pinned
    net = load_net(out)  # rebuilt pruned from the config, filled from its own checkpoint
    assert net.blocks()[1].conv1.out_channels == src.blocks()[1].conv1.out_channels // 2
    assert net.blocks()[1].conv2.out_channels == src.blocks()[1].conv2.out_channels  # block outputs keep width
    for (name, p), q in zip(net.gate.named_parameters(), src.gate.parameters()):
        torch.testing.assert_close(p, q, msg=f"gate parameter {name} moved in fine-tuning")


def test_qat_run_fine_tunes_with_fake_quantization_and_converts_to_int8(tmp_path):
    from experiments.runs import load_net, read_run, resolve_checkpoint
    from models.quantize import QATNet, qat_model, quantize_int8

    source, out, cfg = _fine_tuning_of_a_trained_run(tmp_path, "qat=x86")
    float_net = load_net(source)
    assert cfg.run_name == "synthetic_resnet20_qat"  # beside the float run, never over it
    assert cfg.trainer.max_epochs == 3 and cfg.optimizer.lr == 0.001
    x = torch.randn(32, 1, 16, 16)
    # Prepared from the float weights, the fake-quantized network computes what the float one does,
    # up to int8 rounding (observers calibrated on a few batches first).
    start = instantiate(cfg.model.net, pretrained=str(resolve_checkpoint(source))).eval()  # BatchNorm frozen
    with torch.no_grad():
        start.prepared.apply(torch.ao.quantization.disable_fake_quant)
        for _ in range(3):
            start.prepared(x)  # the observers record the ranges (QATNet's eval forward would freeze them)
        start.prepared.apply(torch.ao.quantization.enable_fake_quant)
        ref = float_net(x)
        assert (start(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    record = train(shrink(cfg))
    assert "test/acc" in record["metrics"]
    _, run_cfg, _ = read_run(out)
    assert str(run_cfg.model.net.pretrained).endswith(".ckpt")  # the float weights it started from, pinned
    ckpt = torch.load(record["checkpoints"]["best"], weights_only=True)["state_dict"]
    assert any(k.endswith("activation_post_process_0.scale") for k in ckpt)  # trained with fake quantization
    # Rebuilt from its config (no float weights needed) and filled from its checkpoint, the run loads
    # as the fake-quantized network it was tested as, with the ranges training recorded; its int8 module
    # converts from them. (That the two compute the same is test_models' QAT test: a shrunk run's logits
    # are too close to ties for its predictions to say.)
    ckpt_ranges = {k: v for k, v in ckpt.items() if k.endswith(("min_val", "max_val"))}
    assert ckpt_ranges and all(torch.isfinite(v).all() for v in ckpt_ranges.values())  # every observer saw data
    trained = load_net(out)
    assert isinstance(trained, QATNet)
    int8 = quantize_int8(trained, [])  # no calibration: QAT learned its ranges
    assert any("quantized" in type(m).__module__ for m in int8.modules()) and not isinstance(int8, QATNet)
    with torch.no_grad():
        assert torch.isfinite(int8(x)).all() and int8(x).shape == trained(x).shape
    with pytest.raises(UserError, match="backend must be one of"):
        qat_model("resnet20_cifar", [1, 1, 16, 16], backend="tensorrt", num_classes=10, in_chans=1)


def test_compare_bench_puts_float_int8_and_pruned_runs_on_one_axis(tmp_path):
    """bench/compare.py on two tiny runs: every model in every batch size, int8 work counted as int8,
    and a frontier named from the measured rows."""
    source = tmp_path / "logs" / "train" / "runs" / "synthetic_resnet20" / "0"
    train(shrink(compose_config("train.yaml", ["data=synthetic", "model=resnet20"], source)))
    pruned = tmp_path / "logs" / "train" / "runs" / "synthetic_resnet20_pruned" / "0"
    train(shrink(compose_config("train.yaml", ["data=synthetic", "model=resnet20", "prune=l1_50",
                                               f"model.net.pretrained={source}"], pruned)))
    cascade = tmp_path / "logs" / "cascade" / "runs" / "synthetic_cascade" / "0"
    cascade_cfg = compose_config("cascade.yaml", ["data=synthetic", "cascade=tiny_cnn_resnet38",
                                                  f"cascade.stages.tiny_cnn.run={pruned}",
                                                  f"cascade.stages.resnet38.run={source}"], cascade)
    with open_dict(cascade_cfg):
        cascade_cfg.device, cascade_cfg.latency.enabled = "cpu", False
    run_cascade(cascade_cfg)
    out = tmp_path / "compare.json"
    models = (f"models=[{{name: full, run: {source}}}, {{name: full_int8, run: {source}, int8: true}}, "
              f"{{name: pruned, run: {pruned.parent}}}, {{name: cascade, run: {cascade}}}, "
              f"{{name: cascade_int8, run: {cascade}, int8: true}}]")
    proc = subprocess.run([sys.executable, "bench/compare.py", "data=synthetic", models, "batch_sizes=[1,4]",
                           "repeats=3", "warmup=1", "calibration_batches=1", "cost_inputs=2", f"output={out}",
                           f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["model"], r["batch"]) for r in rows) == sorted(
        (m, b) for m in ("full", "full_int8", "pruned", "cascade", "cascade_int8") for b in (1, 4))
    by = {(r["model"], r["batch"]): r for r in rows}
    # The cascade runs with compaction: its mean stages run and its cost follow its deferrals, and
    # its int8 copy's stages are int8 work.
    assert 1.0 <= by["cascade", 1]["units"] <= 2.0 and by["full", 1]["units"] is None
    assert by["cascade", 1]["gflops"] <= by["pruned", 1]["gflops"] + by["full", 1]["gflops"] + 1e-9
    assert by["cascade_int8", 1]["int8_gops"] > 0 and by["cascade_int8", 1]["gflops"] < 0.05 * by["cascade", 1]["gflops"]
    assert by["full_int8", 1]["gflops"] < 0.05 * by["full", 1]["gflops"]  # its convs are int8 now ...
    assert by["full_int8", 1]["int8_gops"] > 0.9 * by["full", 1]["gflops"]  # ... and counted as int8 work
    assert by["pruned", 1]["gflops"] < 0.6 * by["full", 1]["gflops"] and by["pruned", 1]["params"] < by["full", 1]["params"]
    for b in (1, 4):
        front = [r for r in rows if r["batch"] == b and r["frontier"]]
        assert front, "at least one model is on the frontier"
        for r in front:  # nothing on the frontier is beaten on both accuracy and time
            assert not any(o["acc"] > r["acc"] and o["ms_per_batch"] < r["ms_per_batch"]
                           for o in rows if o["batch"] == b)
    assert (tmp_path / "compare.png").is_file()
