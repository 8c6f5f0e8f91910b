"""The evaluator: methods, difficulty buckets, reports, and the digits pipeline end to end (shrunk)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from experiments.evaluation.difficulty import confidence_buckets, ladder_buckets, score_buckets
from experiments.evaluation.evaluator import evaluate_models
from experiments.evaluation.report import bucket_table, cost_trend
from experiments.evaluation.run import compare
from experiments.runs import load_run
from gating import UserError
from gating.adapters import StaticAdapter
from models import create_model
from skipnet import RandomSkipAdapter, SkipNetAdapter
from tests.conftest import compose_config


def test_ladder_and_quantile_buckets(tmp_path):
    correct = [np.array([1, 0, 0, 0, 1]), np.array([1, 1, 0, 0, 0]), np.array([1, 1, 1, 0, 0])]
    b = ladder_buckets(correct, ["a", "b", "c"])
    assert b.bucket.tolist() == [0, 1, 2, 3, 0]
    assert b.labels == ["0:a", "1:b", "2:c", "3:unsolved"]
    q = confidence_buckets(np.array([0.9, 0.1, 0.5, 0.99]), 2, "ref")
    assert q.bucket.tolist() == [0, 1, 1, 0]  # most confident first
    f = tmp_path / "scores.csv"
    f.write_text("index,score\n0,3\n1,1\n2,2\n3,0\n")
    s = score_buckets(f, "score", 4, 2)
    assert s.bucket.tolist() == [1, 0, 1, 0]
    with pytest.raises(UserError, match="no 'score' for 1"):
        score_buckets(f, "score", 5, 2)
    with pytest.raises(UserError, match="not found"):
        score_buckets(tmp_path / "nope.csv", "score", 4, 2)


def test_methods_report_exact_flops_and_what_ran():
    torch.manual_seed(0)
    x = torch.randn(12, 1, 8, 8)
    static = StaticAdapter(create_model("resnet20_cifar", num_classes=10, in_chans=1), name="r20")
    out = static.run(x)
    assert torch.all(out.flops == out.flops[0]) and out.exit_stage is None
    sk = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    m = SkipNetAdapter(sk, thresholds=[0.9], name="sk")
    with torch.no_grad():
        o = m.run(x)
    table = sk.cost_table(x[:1])
    assert torch.allclose(o.flops, table.per_sample(o.executed))
    rnd = RandomSkipAdapter(sk, seed=0, name="rnd")
    with pytest.raises(UserError, match="no rates"):
        rnd.run(x)
    rnd.match(torch.tensor([[1.0] * 9, [1.0] + [0.0] * 8]))  # block 0 always; others half the time
    with torch.no_grad():
        r = rnd.run(torch.randn(400, 1, 8, 8))
    assert r.executed[:, 0].all() and 0.4 < r.executed[:, 1:].mean() < 0.6
    assert torch.allclose(r.flops, table.per_sample(r.executed) - table.gate_flops)


def test_bucket_table_and_cost_trend():
    recs = []
    for i, (bucket_flops, correct) in enumerate([(1e9, 1), (1e9, 1), (2e9, 1), (4e9, 0)]):
        recs.append({"method": "dyn", "index": i, "correct": correct, "flops": bucket_flops, "blocks": float("nan"),
                     "exit_stage": 0 if bucket_flops < 2e9 else 1, "batch1_ms": 1.0, "batch_share_ms": 0.5})
    buckets = ladder_buckets([np.array([1, 1, 0, 0]), np.array([1, 1, 1, 0])], ["a", "b"])
    table = bucket_table(recs, buckets)
    assert [r["count"] for r in table] == [2, 1, 1]
    assert [r["gflops_mean"] for r in table] == [1.0, 2.0, 4.0]
    assert table[0]["exit_shares"] == [1.0, 0.0]
    trend = cost_trend(table, {"dyn": "cascade"})
    assert trend["dyn"]["monotone_rising"] and trend["dyn"]["hardest_over_easiest"] == 4.0
    # An "unsolved" bucket cheaper than the hardest solvable one is reported, not part of the trend.
    recs += [{**recs[0], "index": i, "flops": 0.0, "correct": 0} for i in (4, 5)]
    buckets = ladder_buckets([np.array([1, 1, 0, 0, 0, 0]), np.array([1, 1, 1, 0, 0, 0])], ["a", "b"])
    table = bucket_table(recs, buckets)
    assert not cost_trend(table, {"dyn": "cascade"})["dyn"]["monotone_rising"]
    aside = cost_trend(table, {"dyn": "cascade"}, ["2:unsolved"])["dyn"]
    assert aside["monotone_rising"] and aside["set_aside"]["2:unsolved"]["count"] == 3


def test_a_flat_or_stalled_cost_is_never_said_to_rise():
    from experiments.evaluation.report import trend_shape, trend_statements

    assert trend_shape([1.0, 2.0, 4.0]) == "rises"
    assert trend_shape([0.002135, 0.002135, 0.002135]) == "flat"
    assert trend_shape([1.0, 1.0, 2.0]) == "mixed"  # stays put between the first two buckets
    assert trend_shape([3.0, 2.0, 1.0]) == "falls" and trend_shape([1.0, 3.0, 2.0]) == "mixed"
    flat = {"dyn": {"gflops_by_bucket": [2.0, 2.0, 2.0], "shape": "flat", "hardest_over_easiest": 1.0,
                    "set_aside": {}}}
    (line,) = trend_statements(flat)
    assert "FLAT" in line and "rises" not in line


def test_digits_evaluation_end_to_end(digits_runs, tmp_path):
    cfg = compose_config("eval.yaml", ["experiment=digits_eval_dynamic"], tmp_path)
    with open_dict(cfg):
        cfg.device = "cpu"
        cfg.evaluation.latency.batch1_inputs = 20
        cfg.evaluation.latency.batch_repeats = 1
        for node in cfg.evaluation.methods.values():
            if node is not None:
                node.run = node.run.replace(str(tmp_path / "logs"), str(digits_runs))
    record = compare(cfg)
    names = {p["method"] for p in record["points"]}
    assert names == {"linear", "tiny_cnn", "resnet20", "skipnet20", "random_skip", "cascade_3stage"}
    assert record["difficulty"]["labels"][-1] == "3:unsolved" and sum(record["difficulty"]["counts"]) == 360
    for f in ("records.csv", "points.csv", "buckets.csv", "pareto.csv", "report.md", "accuracy_vs_gflops.png",
              "accuracy_vs_latency.png", "bucket_cost.png", "metrics.json"):
        assert (tmp_path / f).is_file(), f
    with (tmp_path / "records.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 360
    sk = [r for r in rows if r["method"] == "skipnet20"]
    rnd = [r for r in rows if r["method"] == "random_skip"]
    # Random skipping copies SkipNet's per-block rates: the same mean FLOPs within sampling noise.
    mean = lambda rs: sum(float(r["flops"]) for r in rs) / len(rs)  # noqa: E731
    assert mean(rnd) == pytest.approx(mean(sk), rel=0.1)
    timed = [r for r in rows if r["method"] == "resnet20" and r["batch1_ms"] != "nan"]
    assert len(timed) == 20 and all(float(r["batch1_ms"]) > 0 for r in timed)
    assert "cascade_3stage" in record["cost_by_difficulty"] and "skipnet20" in record["cost_by_difficulty"]
    points = {(p["method"], p["point"]) for p in record["points"]}
    assert ("skipnet20", "thr=0.3") in points and ("cascade_3stage", "eps=0") in points
    adapt = record["adaptivity"]
    assert set(adapt) == {"skipnet20", "random_skip", "cascade_3stage"}
    assert adapt["skipnet20"]["random_skip"] == "random_skip" and len(adapt["skipnet20"]["acc_vs_random_pts"]) == 3
    assert all(len(r) == 9 for r in adapt["skipnet20"]["exec_rate"] if r)  # per bucket, one rate per block
    assert (tmp_path / "skip_pattern_skipnet20.png").is_file() and "Spearman" in (tmp_path / "report.md").read_text()


def test_severity_evaluation_on_digits_c(digits_runs, tmp_path):
    cfg = compose_config("eval.yaml", ["experiment=digits_eval_dynamic", "data=digits_c",
                                       "evaluation.difficulty.kind=severity"], tmp_path)
    with open_dict(cfg):
        cfg.device = "cpu"
        cfg.evaluation.latency.enabled = False
        for node in cfg.evaluation.methods.values():
            if node is not None:
                node.run = node.run.replace(str(tmp_path / "logs"), str(digits_runs))
    record = compare(cfg)
    assert record["difficulty"]["labels"] == [f"{k}:severity{k}" for k in range(6)]
    assert record["difficulty"]["counts"] == [50, 78, 58, 46, 62, 66]  # digits_c's test mix, seed 0
    assert len(record["adaptivity"]["skipnet20"]["buckets"]) == 6  # no bucket set aside by severity


def test_evaluation_takes_int8_models_and_names_the_latency_frontier(digits_runs, tmp_path):
    """int8 references (a classifier, a SkipNet per block, a cascade per stage) are evaluated beside the
    float ones; their int8 operations are counted apart from float FLOPs; the report names the
    accuracy/latency frontier at batch 1 and at the evaluation batch size."""
    cfg = compose_config("eval.yaml", ["experiment=digits_eval_dynamic"], tmp_path)
    with open_dict(cfg):
        cfg.device = "cpu"
        cfg.evaluation.latency.batch1_inputs = 10
        cfg.evaluation.latency.batch_repeats = 1
        cfg.evaluation.difficulty = {"kind": "confidence", "reference": "resnet20", "buckets": 2}
        methods = cfg.evaluation.methods
        methods.linear = methods.tiny_cnn = methods.random_skip = None
        for node in methods.values():
            if node is not None:
                node.run = node.run.replace(str(tmp_path / "logs"), str(digits_runs))
        methods.skipnet20.thresholds = []
        methods.cascade_3stage.frontier = False
        for name in ("resnet20", "skipnet20", "cascade_3stage"):
            methods[f"{name}_int8"] = {**methods[name], "int8": True, "calibration_batches": 2}
    record = compare(cfg)
    points = {p["method"]: p for p in record["points"] if p["point"] == "default"}
    for name in ("resnet20", "skipnet20", "cascade_3stage"):
        assert points[f"{name}_int8"].get("int8_gops_per_img", 0) > 0, name
        assert "int8_gops_per_img" not in points[name]
        assert abs(points[f"{name}_int8"]["acc"] - points[name]["acc"]) <= 0.1
    # ResNet-20 in int8 runs the float model's convolutions and linear as int8 multiply-adds, nothing in float.
    f, q = points["resnet20"], points["resnet20_int8"]
    assert q["int8_gops_per_img"] == pytest.approx(f["gflops_per_img"], rel=0.02)
    assert q["gflops_per_img"] < 0.02 * f["gflops_per_img"]
    front = record["latency_frontier"]
    assert set(front) == {"batch1", "batch"} and front["batch1"] and front["batch"]
    assert set(front["batch1"]) <= set(points)  # main points are the ones timed at batch 1
    fastest = min(points.values(), key=lambda p: p["batch1_ms_p50"])
    assert front["batch1"][0] == fastest["method"]  # fastest first; the fastest is never dominated
    best = max(points.values(), key=lambda p: (p["acc"], -p["batch1_ms_p50"]))
    assert front["batch1"][-1] == best["method"]
    # Per input too: each record's int8 operations (its own blocks and stages), so the bucket table and the
    # adaptivity metrics count an int8 model's skipped work, which is int8 work.
    with (tmp_path / "records.csv").open() as fh:
        records = list(csv.DictReader(fh))
    for name in ("resnet20", "skipnet20", "cascade_3stage"):
        int8 = [float(r["int8_ops"]) for r in records if r["method"] == f"{name}_int8"]
        assert sum(int8) / len(int8) / 1e9 == pytest.approx(points[f"{name}_int8"]["int8_gops_per_img"], rel=1e-9)
        assert all(float(r["int8_ops"]) == 0 for r in records if r["method"] == name)
        # each input's share of its batch's time follows all its operations, not its float FLOPs alone
        rate = [float(r["batch_share_ms"]) / (float(r["flops"]) + float(r["int8_ops"]))
                for r in records if r["method"] == f"{name}_int8" and int(r["index"]) < cfg.evaluation.batch_size]
        assert max(rate) == pytest.approx(min(rate), rel=1e-9), name
    with (tmp_path / "buckets.csv").open() as fh:
        buckets = list(csv.DictReader(fh))
    assert all((r["int8_gops_mean"] != "") == r["method"].endswith("_int8") for r in buckets)
    adaptivity = record["adaptivity"]
    assert "gops_mean" in adaptivity["skipnet20_int8"] and "gflops_mean" in adaptivity["skipnet20"]
    report = (tmp_path / "report.md").read_text()
    assert "Latency frontier (median latency at batch 1" in report and "int8_gops_per_img" in report
    assert "skipnet20_int8: mean G operations (float + int8) per image" in report
    with (tmp_path / "pareto.csv").open() as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh) if r["point"] == "default"}
    assert {m for m, r in rows.items() if r["frontier_batch1"] == "True"} == set(front["batch1"])
    with pytest.raises(UserError, match="run on the CPU only"):
        evaluate_models([load_run(methods.resnet20_int8.run, int8=True, calibration_batches=1)],
                        torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.device("cuda"), 2,
                        cfg.evaluation.latency)


@pytest.mark.parametrize("run", ["train/runs/digits_resnet20", "train/runs/digits_skipnet20_rl",
                                 "cascade/runs/digits_linear-tiny_cnn-resnet20_max_prob"])
def test_compiled_models_answer_and_cost_as_the_eager_ones(digits_runs, run):
    """``compile: true`` (a classifier whole, a SkipNet's blocks, a cascade's stages) gives the eager outputs,
    decisions and exact FLOPs at every sub-batch size, from one graph for all sizes above one. The
    ``aot_eager`` backend traces as Inductor does without generating code (the Inductor path itself:
    test_gating's compiled-stage test)."""
    from torch._dynamo.utils import counters

    from gating.execution import DynamicBatchCompiled

    torch._dynamo.reset()
    counters.clear()
    eager = load_run(digits_runs / run)
    compiled = load_run(digits_runs / run, compile=True, compile_backend="aot_eager")
    assert any(isinstance(m, DynamicBatchCompiled) for net in compiled.modules() for m in net.modules())
    torch.manual_seed(0)
    for b in (7, 3, 1, 12, 5):
        x = torch.randn(b, 1, 8, 8)
        want, got = eager.run(x), compiled.run(x)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.flops, want.flops)
        for name in ("exit_stage", "executed"):
            assert (getattr(got, name) is None) == (getattr(want, name) is None)
            if getattr(want, name) is not None:
                assert torch.equal(getattr(got, name), getattr(want, name))
    # Each compiled part builds at most two graphs (size one, and one for all larger sizes), not one per size.
    parts = sum(isinstance(m, DynamicBatchCompiled) for net in compiled.modules() for m in net.modules())
    assert counters["stats"]["unique_graphs"] <= 2 * parts
    torch._dynamo.reset()
    with pytest.raises(UserError, match="int8 and compile together"):
        load_run(digits_runs / run, compile=True, int8=True)


def _rec(method, i, flops, correct, pattern="", exit_stage=-1):
    return {"method": method, "index": i, "flops": flops, "correct": correct, "pattern": pattern,
            "exit_stage": exit_stage}


def test_adaptivity_metrics_on_hand_made_records():
    from experiments.evaluation import severity_buckets
    from experiments.evaluation.adaptivity import adaptivity_metrics, adaptivity_statements, spearman_rho

    buckets = severity_buckets(np.array([0, 0, 1, 1, 2, 2]))
    recs = [_rec("sk", i, f, c, p) for i, (f, c, p) in enumerate(
        [(1e9, 1, "1000"), (1e9, 1, "1000"), (2e9, 1, "1100"), (2e9, 0, "1100"), (4e9, 1, "1111"), (3e9, 0, "1110")])]
    recs += [_rec("rnd", i, 2e9, c, "1010") for i, c in enumerate([1, 0, 1, 0, 0, 0])]
    recs += [_rec("flat", i, 2e9, 1, "1100") for i in range(6)]
    recs += [_rec("cas", i, f, 1, exit_stage=e) for i, (f, e) in enumerate([(1e9, 0)] * 4 + [(5e9, 1)] * 2)]
    m = adaptivity_metrics(recs, buckets, {"sk": "skipnet", "rnd": "random_skip", "flat": "skipnet",
                                           "cas": "cascade", "static": "static"}, {"sk": "rnd"})
    assert "static" not in m
    sk = m["sk"]
    assert sk["distinct_patterns"] == 4 and sk["gflops_mean"] == [1.0, 2.0, 3.5] and sk["shape"] == "rises"
    assert sk["hardest_over_easiest"] == 3.5 and sk["gflops_p95"][2] == pytest.approx(3.95)
    assert sk["spearman_rho"] == pytest.approx(spearman_rho([1, 1, 2, 2, 4, 3], [0, 0, 1, 1, 2, 2]))
    assert sk["spearman_rho"] > 0.9
    assert sk["acc_vs_random_pts"] == pytest.approx([50.0, 0.0, 50.0])  # sk 1, .5, .5; random .5, .5, 0
    # overall, paired: sk alone right on inputs 1 and 4, random alone on none -> +2/6, se sqrt(2/36 - 4/216)
    assert sk["acc_vs_random_all_pts"] == pytest.approx(100 * 2 / 6)
    assert sk["acc_vs_random_se_pts"] == pytest.approx(100 * (2 / 36 - 4 / 216) ** 0.5)
    lo, hi = sk["acc_vs_random_ci_pts"]
    assert lo < 100 * 2 / 6 < hi and hi - lo == pytest.approx(2 * 1.959964 * sk["acc_vs_random_se_pts"], rel=1e-4)
    assert sk["exec_rate"][0] == [1.0, 0.0, 0.0, 0.0] and sk["exec_rate"][2] == [1.0, 1.0, 1.0, 0.5]
    assert m["flat"]["shape"] == "flat" and m["flat"]["spearman_rho"] is None and m["flat"]["distinct_patterns"] == 1
    assert m["cas"]["distinct_patterns"] == 2 and m["cas"]["exec_rate"] is None
    lines = adaptivity_statements(m)
    assert any("undefined (constant cost)" in ln and ln.startswith("flat:") for ln in lines)
    assert any("random skipping per bucket (pts): +50.0, +0.0, +50.0; overall +33.33 pts (paired standard error 19.25"
               in ln for ln in lines)


def test_spearman_rho_by_hand():
    from experiments.evaluation.adaptivity import spearman_rho

    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their average rank: ranks x (1.5, 1.5, 3, 4), y (1, 2, 3, 4) -> Pearson on ranks.
    rx, ry = np.array([1.5, 1.5, 3, 4]) - 2.5, np.array([1, 2, 3, 4]) - 2.5
    assert spearman_rho([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)))
    assert spearman_rho([1, 1, 1], [1, 2, 3]) is None


def test_severity_buckets_refuse_non_integer_levels():
    from experiments.evaluation import severity_buckets

    with pytest.raises(UserError, match="integer severities"):
        severity_buckets(np.array([0.2, 0.5]))


def test_evaluation_names_a_missing_run(tmp_path):
    cfg = compose_config("eval.yaml", ["experiment=digits_eval_dynamic"], tmp_path)
    with pytest.raises(SystemExit) as e:
        compare(cfg)
    assert e.value.code == 2


def test_serve_builds_the_digits_models_and_prices_triage(digits_runs, tmp_path):
    """experiments.serve loads the models from the run folders and measures every triage level on val."""
    from experiments.serve import build_engines

    cfg = compose_config("serve.yaml", ["experiment=digits_serve"], tmp_path)
    with open_dict(cfg):
        cfg.device = "cpu"
        for node in cfg.models.values():
            if node is not None:
                node.run = node.run.replace(str(tmp_path / "logs"), str(digits_runs))
    engines = build_engines(cfg)
    assert set(engines) == {"cascade", "skipnet20", "resnet20"}
    for e in engines.values():
        levels = e.levels
        assert all(lv.val_acc is not None for lv in levels)
        costs = [lv.val_gflops_per_img for lv in levels]
        assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)  # each level cheaper
    assert engines["cascade"].levels[-1].settings["thresholds"][0] == float("-inf")


def _eval_folder(path, models: dict[str, tuple[list[int], list[int], list[float]]]):
    """A hand-made experiments.eval run folder: per model (labels, correct, flops) per test input."""
    import json

    path.mkdir(parents=True)
    with open(path / "records.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "index", "label", "correct", "flops"])
        w.writeheader()
        for m, (labels, correct, flops) in models.items():
            for i in reversed(range(len(labels))):  # rows out of order: the reader sorts by index
                w.writerow({"method": m, "index": i, "label": labels[i], "correct": correct[i], "flops": flops[i]})
    (path / "metrics.json").write_text(json.dumps({"adaptivity": {"dyn": {"hardest_over_easiest": 1.2,
                                                                          "spearman_rho": 0.4}}}))
    return path


def test_paired_difference_and_two_runs_agreement_by_hand(tmp_path, capsys):
    from experiments.agreement import agreement
    from experiments.stats import paired_difference

    # 10 inputs: a right on 8, b right on 7; they disagree on 3 (a only on 2, b only on 1)
    ca = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    cb = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 1, 0])
    p = paired_difference(ca, cb)
    assert (p.only_a, p.only_b, p.n) == (2, 1, 10) and p.diff == pytest.approx(0.1)
    assert p.std_error == pytest.approx((3 / 100 - 1 / 1000) ** 0.5)
    assert p.interval[0] < 0.1 < p.interval[1]
    assert paired_difference(ca, ca).std_error == 0 and paired_difference(ca, ca).chance_beyond(0.01) == 0
    assert 0 < p.chance_beyond(0.05) < p.chance_beyond(0.01) < 1
    with pytest.raises(ValueError, match="equal"):
        paired_difference(ca, cb[:5])

    labels = list(range(10))
    a = _eval_folder(tmp_path / "a", {"dyn": (labels, ca.tolist(), [1e9] * 10), "static": (labels, [1] * 10, [2e9] * 10)})
    b = _eval_folder(tmp_path / "b", {"dyn": (labels, cb.tolist(), [1.02e9] * 10), "static": (labels, [1] * 10, [2e9] * 10)})
    cfg = compose_config("agreement.yaml", [f"a={a}", f"b={b}", "tolerance_pts=5", "tolerance_flops_pct=3"], tmp_path / "out")
    rows = {r["model"]: r for r in agreement(cfg)["models"]}
    dyn = rows["dyn"]
    assert dyn["acc_diff_pts"] == pytest.approx(10) and not dyn["acc_within_tol"]
    assert dyn["flops_diff_pct"] == pytest.approx(100 * 0.02 / 1.01) and dyn["flops_within_tol"]
    assert dyn["ratio_a"] == 1.2 and dyn["rho_b"] == 0.4
    assert rows["static"]["acc_diff_pts"] == 0 and rows["static"]["acc_within_tol"]
    assert (tmp_path / "out" / "agreement.md").is_file()
    other = _eval_folder(tmp_path / "c", {"dyn": (labels[::-1], cb.tolist(), [1e9] * 10)})
    with pytest.raises(SystemExit):  # one line for the user, exit status 2
        agreement(compose_config("agreement.yaml", [f"a={a}", f"b={other}"], tmp_path / "out2"))
    assert "did not score the same test inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        agreement(compose_config("agreement.yaml", [f"a={a}", f"b={b}", "models=[nope]"], tmp_path / "out3"))
    assert "are not in both runs" in capsys.readouterr().err
