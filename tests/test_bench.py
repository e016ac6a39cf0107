"""``aurora-bench step | zero | quality`` at their smallest settings: each writes its JSON (with the
machine), markdown table and plots. Timings and which method wins are never asserted."""

import json
import sys

import pytest

import torch
import torch.nn.functional as F

from aurora_ds.bench import step, zero
from aurora_ds.bench.kernels import count_kernels
from aurora_ds.bench.cli import main
from aurora_ds.plan import count_parameters


def _outputs(tmp_path, name):
    results = json.loads((tmp_path / f"{name}.json").read_text())
    assert {"cpu_count", "torch", "device"} <= set(results["machine"])
    assert (tmp_path / f"{name}.md").read_text().startswith(("|", "Backbone", "Split"))
    assert results["plots"] and all((tmp_path / p.rsplit("/", 1)[-1]).stat().st_size > 0 for p in results["plots"])
    return results


def test_lora_rank_is_the_closest_count():
    assert step.matched_lora_rank(725, 1792) == 1  # never 0, even when rank 1 overshoots
    assert step.matched_lora_rank(125_721, 2 * 10_000) == 6
    assert step.matched_lora_rank(1000, 300) == 3


def test_lora_without_peft_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"pip install 'aurora_ds\[bench\]'"):
        step.inject_lora(None, ["qkv"], 1)


def test_step_in_process(tmp_path):
    assert main(["step", "--out", str(tmp_path), "--sizes", "tiny", "--steps", "2", "--warmup", "0", "--no-isolate"]) == 0
    results = _outputs(tmp_path, "step")
    runs = {r["method"]: r for r in results["runs"]}
    assert list(runs) == list(step.METHODS)
    ran = {m: r for m, r in runs.items() if "skipped" not in r}
    assert set(ran) >= set(step.METHODS) - {"vera"}  # VeRA is reported as skipped where peft cannot apply it
    assert ran["floor"]["trainable"] == 0 and ran["full"]["trainable"] == ran["full"]["total"]
    names, width, aurora = step.aurora_targets("blip-tiny-retrieval", 4)
    assert ran["aurora"]["trainable"] == aurora > ran["aurora-plain"]["trainable"]
    assert ran["lora"]["trainable"] == ran["lora-nodrop"]["trainable"] == ran["lora"]["lora_rank"] * width
    assert all(len(r["step_times_s"]) == 2 and r["cpu_s"] > 0 and r["peak_memory_mb"] is None for r in ran.values())
    ratios = results["ratios"]["tiny"]
    assert {"aurora/floor", "aurora/lora", "aurora/full", "floor-nopix/floor"} <= set(ratios)
    assert ratios["aurora/floor"]["time"]["min"] <= ratios["aurora/floor"]["time"]["median"]


def test_kernel_counter_counts_what_launches():
    linear, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    # forward addmm; the loss's sum and its seed gradient; backward mm for the weight, sum for the bias
    assert count_kernels(lambda: linear(x).sum().backward()) == {"addmm": 1, "sum": 2, "ones_like": 1, "mm": 1}
    linear.zero_grad(set_to_none=True)
    x.requires_grad_(True)
    assert count_kernels(lambda: linear(x).sum().backward())["mm"] == 2  # and the input's gradient
    assert count_kernels(lambda: (x.view(8), x.t(), x[0], x.unsqueeze(0))) == {}
    assert count_kernels(lambda: F.dropout(x, 0.5, training=True)) == {"native_dropout": 1}  # CPU runs several
    assert count_kernels(lambda: F.dropout(x, 0.5, training=False)) == {}
    # a foreach op is one kernel, or one per tensor where its lists differ in strides (CUDA's slow path)
    a, b = [torch.zeros(3, 4), torch.zeros(3, 4)], [torch.ones(3, 4), torch.ones(4, 3).t()]
    assert count_kernels(lambda: torch._foreach_add_(a, [t.clone() for t in a])) == {"_foreach_add_": 1, "clone": 2}
    assert count_kernels(lambda: torch._foreach_add_(a, b))["_foreach_add_"] == 2


def _job(size, batch=2, image_size=0):
    backbone, rank = step.SIZES[size]
    return {"size": size, "backbone": backbone, "rank": rank, "device": "cpu", "precision": "fp32", "batch": batch,
            "steps": 1, "warmup": 0, "threads": 1, "image_size": image_size, "seq_len": 8}


def _kernel_ops(job, method):
    spec, batch = step._setup(job)
    return step.Config(job, method, batch, spec).kernel_counts()


def test_step_kernel_count_does_not_depend_on_sizes():
    """From batch 2 on: at batch 1 permuted activations are already contiguous and skip copies."""
    small, large = _kernel_ops(_job("narrow", 2, 16), "aurora"), _kernel_ops(_job("narrow", 3), "aurora")
    assert small == large and small["kernel_ops"] > 0 and small["adapted_calls"] > 0


def test_narrow_backbone_has_blip_base_structure():
    """Built from config in ~10 s on one thread; counted at 32 px, where its step is quick."""
    assert _kernel_ops(_job("narrow"), "floor") == _kernel_ops(_job("base", image_size=32), "floor")


def test_step_reports_kernel_ops(tmp_path):
    assert main(["step", "--out", str(tmp_path), "--sizes", "narrow", "--methods",
                 "floor,aurora,aurora-nodrop,aurora-merged,aurora-unmerged", "--steps", "1", "--warmup", "0",
                 "--no-isolate"]) == 0
    runs = {r["method"]: r for r in _outputs(tmp_path, "step")["runs"]}
    assert list(runs) == ["floor", "aurora", "aurora-nodrop", "aurora-merged", "aurora-unmerged"]
    assert runs["aurora-merged"]["kernel_ops"] < runs["aurora-unmerged"]["kernel_ops"] < runs["aurora"]["kernel_ops"]
    assert all(r["kernel_ops"] > 0 and r["kernel_ops_by_name"] for r in runs.values())
    assert runs["floor"]["adapted_calls"] == 0 and runs["floor"]["ops_per_adapted_call"] is None
    names, _, _ = step.aurora_targets("blip-base-narrow-retrieval", 32)
    assert runs["aurora"]["adapted_calls"] == runs["aurora-nodrop"]["adapted_calls"] >= len(names)
    assert runs["aurora"]["optimizer_kernel_ops"] > 0 and runs["aurora"]["ops_per_adapted_call"] > 0
    assert "kernel ops/step" in (tmp_path / "step.md").read_text()


def test_step_fresh_process_reports_memory():
    job = {"size": "tiny", "backbone": "blip-tiny-retrieval", "rank": 4, "method": "aurora", "device": "cpu",
           "precision": "fp32", "batch": 2, "steps": 1, "warmup": 0, "threads": 1, "image_size": 0, "seq_len": 8}
    row = step.run_isolated(job)
    assert row["method"] == "aurora" and row["peak_memory_mb"] >= 0 and row["rss_after_build_mb"] > 0


def test_zero_report_from_run_summaries(tmp_path, monkeypatch):
    """The reporting half of ``zero`` on stand-in run summaries (the real runs are the slow test)."""
    def fake_launch(processes, ds_config, out, args, nodes=1):
        assert json.loads(ds_config.read_text())["zero_optimization"]["stage3_param_persistence_threshold"] == 0
        return {"history": [{"time_s": 1.0, "loss": 2.0}, {"time_s": 0.1 * processes, "loss": 1.9}],
                "local_parameter_bytes": 1000 // processes,
                "peak_memory_mb": 10.0, "steps": 2, "wall_s": 1.0}

    monkeypatch.setattr(zero, "launch", fake_launch)
    assert main(["zero", "--out", str(tmp_path), "--steps", "2"]) == 0
    results = _outputs(tmp_path, "zero")
    assert [r["processes"] for r in results["runs"]] == [1, 2, 2]
    assert results["ratios"]["2 ranks"] == {"parameter_bytes": 0.5, "step_s": 2.0, "samples_per_s": 1.0, "peak_memory": 1.0}
    assert "zero3_hpz_quant" in results["not_measured"] and "gather_model" not in results

    total = count_parameters("blip-tiny-retrieval", 4, 0)["total"]
    assert all(r["unpartitioned_mb"] == pytest.approx(total * 4 / 2**20) for r in results["runs"])
    one, two, offload = results["runs"]
    # aurora-plan: all of the backbone on 1 rank, half on each of 2, with or without offload
    assert two["plan_parameter_mb"] == pytest.approx(one["plan_parameter_mb"] / 2, rel=0.01)
    assert offload["plan_parameter_mb"] == pytest.approx(two["plan_parameter_mb"], rel=0.01)
    assert "aurora-plan model states" in (tmp_path / "zero.md").read_text()
    assert {(p["backbone"], p["gpus"]) for p in results["plan"]} == {
        (b, g) for b in ("blip-large-retrieval", "vit-giant") for g in (8, 16, 64)}


def test_zero_reports_the_measured_gather_time_with_the_counts(tmp_path, monkeypatch):
    """The gather report on stand-in runs and all-gather timings (the real ones are the slow
    test): measured = ZeRO-3 step - replicated step; the bare collectives take latency per
    gathering call + bytes / bandwidth of it; the rest is spread over the module calls."""
    def fake_launch(processes, ds_config, out, args, nodes=1):
        step = 1.0 if "replicated" in ds_config.name else 3.0
        return {"history": [{"time_s": 9.0, "loss": 2.0}, {"time_s": step, "loss": 1.9}],
                "local_parameter_bytes": 1000, "peak_memory_mb": 10.0, "steps": 2, "wall_s": 1.0}

    allgather = {"world_size": 2, "rows": [], "latency_s": 1e-4, "bandwidth_gbyte_s": 0.5}
    monkeypatch.setattr(zero, "launch", fake_launch)
    monkeypatch.setattr(zero, "measure_gathers", lambda out, args: allgather)

    counts = count_parameters("blip-tiny-retrieval", 4, 0)
    assert main(["zero", "--out", str(tmp_path), "--steps", "2", "--runs", "2-replicated,2"]) == 0
    g = json.loads((tmp_path / "zero.json").read_text())["gather_model"]
    assert g["measured_gather_s"] == pytest.approx(2.0) and g["module_calls_per_step"] == counts["module_calls"]
    # 2 ranks: each receives half of the partitioned elements gathered, forward and backward
    received = 4 * (counts["gathered_fwd"] + counts["gathered_bwd"]) / 2
    assert g["gathered_bytes_per_step"] == pytest.approx(received, rel=1e-3)
    assert g["collectives_alone_s"] == pytest.approx(1e-4 * counts["gathering_calls"] + received / 0.5e9, rel=0.01)
    assert g["overhead_per_module_call_s"] == pytest.approx((2.0 - g["collectives_alone_s"]) / counts["module_calls"])
    assert "measured 2.000 s per step" in (tmp_path / "zero.md").read_text()


def test_gather_fit_recovers_constants_and_checks_each_run_against_the_others(tmp_path):
    """Stand-in zero reports whose gather times follow known constants exactly: the fit finds
    them, and each run predicted from a fit to the other runs is exact too. The real reports are
    in docs/bench (their errors are measurements, not asserted)."""
    from aurora_ds.bench import gather_fit

    # s per module call, s per collective, s per GB received, s per GB of parameters called
    truth = [1e-3, 2e-4, 4.0, 0.5]
    configs = [("blip-tiny-retrieval", 4, 0), ("blip-tiny-retrieval", 4, 10**9), ("blip-base-retrieval", 32, 0),
               ("blip-base-retrieval", 32, 100_000), ("blip-base-retrieval", 32, 3_000_000)]
    paths = []
    for i, (backbone, rank, threshold) in enumerate(configs):
        config = {"backbone": backbone, "rank": 0, "persistence_threshold": threshold, "precision": "fp32",
                  "batch": 2, "image_size": 0}
        gather_s = gather_fit.predict(truth, gather_fit.columns({**config, "rank": rank}))
        runs = [{"processes": 2, "ds_config": "replicated", "step_s": 1.0},
                {"processes": 2, "ds_config": "zero3", "step_s": 1.0 + gather_s}]
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"config": config, "runs": runs}))
    assert main(["gather-fit", "--out", str(tmp_path / "fit"), *map(str, paths)]) == 0
    results = json.loads((tmp_path / "fit" / "gather_fit.json").read_text())
    assert list(results["constants"].values()) == pytest.approx(truth, rel=1e-6)
    assert all(abs(r["fitted_error"]) < 1e-6 and abs(r["left_out_error"]) < 1e-6 for r in results["runs"])
    # nothing partitioned: the hooks still run, and each step re-gathers every (persistent) tensor once
    whole, base = results["runs"][1], results["runs"][3]
    tiny = count_parameters("blip-tiny-retrieval", 4, 10**9)
    assert whole["collectives"] == tiny["persistent_tensors"] and 0 < whole["gbytes_received"] < 1e-3
    assert whole["gbytes_called"] == pytest.approx(4 * tiny["called_numel"] / 1e9)
    assert base["module_calls"] == count_parameters("blip-base-retrieval", 32, 100_000)["module_calls"]
    assert "--module-overhead 1000 --gather-latency 200 --intra 0.25 --module-bytes-cost 0.5" in (
        tmp_path / "fit" / "gather_fit.md").read_text()
    paths[0].write_text(json.dumps({"config": {}, "runs": [{"processes": 1, "ds_config": "zero3", "step_s": 1.0}]}))
    with pytest.raises(SystemExit, match=paths[0].name):
        main(["gather-fit", "--out", str(tmp_path / "fit"), *map(str, paths)])


def test_gather_fit_keeps_every_constant_non_negative():
    from aurora_ds.bench.gather_fit import fit

    # unconstrained, the two runs are matched exactly by (1.5, -0.5); a negative cost is not a cost
    assert fit([[1, 1], [1, 2]], [1, 0.5]) == pytest.approx([0.6, 0.0])


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_real_runs(tmp_path):
    assert main(["zero", "--out", str(tmp_path), "--steps", "2"]) == 0
    results = _outputs(tmp_path, "zero")
    one, two, offload = results["runs"]
    assert 0.4 < two["local_parameter_bytes"] / one["local_parameter_bytes"] < 0.6
    assert offload["ds_config"] == "zero3_offload" and offload["steps"] == 2


def test_quality_smallest(tmp_path):
    from aurora_ds.bench import quality

    args = ["quality", "--out", str(tmp_path), "--quick"]
    assert main(args) == 0
    results = _outputs(tmp_path, "quality")
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == list(quality.METHODS)
    for name, r in rows.items():
        assert len(r["runs"]) == (1 if name == "zero-shot" else 2)
        assert {"mean", "std"} == set(r["itm_tr1"]) == set(r["itc_ir5"]) and r["r1"]["std"] >= 0
        if name != "zero-shot":
            # The chosen rate is the sweep's best on validation (mean over its seeds), and every seed ran at it.
            assert len(r["sweep"]) == 2 and r["lr"] == max(r["sweep"], key=lambda s: s["score"])["lr"]
            for s in r["sweep"]:
                assert len(s["val"]) == 2 and s["score"] == pytest.approx(sum(map(quality.val_score, s["val"])) / 2)
            assert {run["lr"] for run in r["runs"]} == {r["lr"]} and [run["seed"] for run in r["runs"]] == [0, 1]
            assert len(r["runs"][1]["losses"]) == 2
    count = {name: r["trainable"] for name, r in rows.items()}
    assert count["zero-shot"] == 0 < count["aurora R=2"] < count["aurora R=4"] < count["aurora R=8"]
    assert count["aurora R=4 no GQT"] < count["aurora R=4"] < count["aurora R=4 private"]
    assert count["aurora R=4 dropout 0"] == count["aurora R=4"]
    for name in ("vera", "vb-lora"):  # matched to Aurora R=4's adapter count
        assert abs(rows[name]["adapter"] - rows["aurora R=4"]["adapter"]) < 0.4 * rows["aurora R=4"]["adapter"]
    assert count["full"] > 30 * max(c for name, c in count.items() if name != "full")
    splits = results["splits"]
    assert not set(splits["test"]) & set(splits["val"]) and not (set(splits["test"]) | set(splits["val"])) & set(splits["train"])
    assert len(splits["test"]) == 12 and len(splits["val"]) == 6
    assert not set(map(tuple, splits["a_pairs"])) & set(map(tuple, splits["b_pairs"]))
    assert rows["full"]["recovered"] == 1.0 or rows["full"]["recovered"] is None
    # A second run reuses the cached pre-training.
    assert main(args + ["--methods", "zero-shot"]) == 0
    assert _outputs(tmp_path, "quality")["pretrain"]["seconds"] == results["pretrain"]["seconds"]