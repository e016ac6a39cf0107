"""How good a run is: the frozen model evaluated at step 0 beside the final metrics and each
metric's chance level (summary.json, TensorBoard, the demo's report.md/png); QA adapters carry
their answer list without evaluation shards; aurora-eval names its output by the adapter's step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["aurora.rank=4", "backbone.train_tokenizer=true", "optim.batch_size=4", "eval.batch_size=8", "data.image_size=32", "objective.queue_size=16",
         "data.num_workers=0", "eval.k_test=4", "output.progress=false", "output.log_every=1"]


def _run(args, log, module="aurora_ds.train"):
    from aurora_ds.dist import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", module, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, timeout=600).returncode
    text = Path(log).read_text()
    assert code == 0, text[-4000:]
    return text


def _sets(items):
    return [x for item in items for x in ("--set", item)]


def test_chance_levels_of_a_retrieval_set():
    from aurora_ds.tasks.retrieval_eval import chance_metrics

    # 12 media with 5 captions each: IR@10 is 10/12 by chance; TR@1 5/60; TR@5 1 - C(55,5)/C(60,5)
    chance = chance_metrics([list(range(5 * i, 5 * i + 5)) for i in range(12)], 60)
    assert chance["img_r10"] == pytest.approx(100 * 10 / 12) and chance["img_r1"] == pytest.approx(100 / 12)
    assert chance["txt_r1"] == pytest.approx(100 * 5 / 60)
    assert chance["txt_r5"] == pytest.approx(100 * (1 - 3478761 / 5461512))
    assert chance["img_median_rank"] == 6.0
    assert chance["r_mean"] == pytest.approx((chance["txt_r_mean"] + chance["img_r_mean"]) / 2)


def test_answers_json_as_aurora_shard_writes_it_is_an_answer_list(tmp_path):
    from aurora_ds.data.shard_format import write_answers
    from aurora_ds.engine.data import read_answer_list

    write_answers(str(tmp_path), {"no": 3, "yes": 5, "2": 3, "blue": 1})
    assert read_answer_list(tmp_path / "answers.json", "eval.answer_list") == ["yes", "2", "no", "blue"]
    assert read_answer_list(tmp_path / "answers.json", "eval.answer_list", size=2) == ["yes", "2"]
    (tmp_path / "bad.json").write_text(json.dumps({"yes": "many"}))
    with pytest.raises(ValueError, match="eval.answer_list=.*bad.json: expected .*answers.json"):
        read_answer_list(tmp_path / "bad.json", "eval.answer_list")


@pytest.mark.distributed
def test_report_has_the_frozen_row_chance_and_per_term_curves(tiny_checkpoint, tmp_path):
    """A demo-like run (DeepSpeed, validation and test shards): step 0 is evaluated on both sets,
    TensorBoard has a point per evaluation, the summary and the report put frozen, final and chance
    side by side, and DeepSpeed's collectives print no FutureWarning."""
    from shard_tools.quickstart import sample_shards
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aurora_ds.demo import report

    coco = sample_shards("coco", 16, tmp_path / "raw", str(tmp_path / "shards"), seed=1, maxcount=3)
    out = tmp_path / "coco"
    log = _run(["--recipe", "coco_retrieval", "--train-shards", coco["train"], "--eval-shards", coco["val"],
                "--test-shards", coco["test"], "--out", str(out), "--max-steps", "2", "--ds-config", "zero3",
                "--set", "backbone.name=blip-tiny-retrieval", "--set", f"backbone.checkpoint={tiny_checkpoint}",
                *_sets(SMALL)], tmp_path / "train.log")
    assert "FutureWarning" not in log
    assert "[aurora] test r_mean: frozen" in log and ", chance " in log
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [0, 2]
    frozen, test = summary["frozen"], summary["test"]["metrics"]
    assert frozen["val"]["num_media"] == coco["num_val"] and frozen["test"]["num_media"] == coco["num_test"]
    assert test["chance"]["img_r1"] == pytest.approx(100 / coco["num_test"])
    assert summary["best"]["step"] == 2  # step 0 is the baseline, never adapter_best
    assert {"itc", "itm", "loss", "samples"} <= set(summary["history"][0])
    assert summary["samples_per_s"] > 0 and len(summary["peak_memory_mb_per_rank"]) == 1
    assert summary["run"]["checkpoint"]["path"] and summary["run"]["config"]["eval"]["at_start"] is True
    assert json.loads((out / "eval" / "test_step_000000.json").read_text())["adapter"] == "frozen"
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/r_mean")] == [0, 2]
    assert [e.step for e in events.Scalars("test/r_mean")] == [0, 2]

    report(tmp_path, {"coco image-text": summary}, "a local directory")
    md = (tmp_path / "report.md").read_text()
    assert "| split | metric | frozen (step 0) | final | step | chance |" in md
    row = next(line for line in md.splitlines() if line.startswith("| test | img_r1 |"))
    assert row.split("|")[6].strip() == f"{100 / coco['num_test']:.1f}"
    assert "itc " in md and "itm " in md and "samples/s" in md and str(tiny_checkpoint) in md
    assert (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.distributed
def test_qa_trained_without_evaluation_shards_evaluates_from_its_adapter(tmp_path):
    """Train now, evaluate later: the adapter of a VQA run without evaluation shards carries the
    answer list, and aurora-eval names its output after the adapter's step."""
    from shard_tools.quickstart import sample_shards

    from aurora_ds import build_backbone

    torch.manual_seed(0)
    build_backbone("blip-tiny-vqa").save_pretrained(tmp_path / "ckpt")
    data = sample_shards("vqa", 8, tmp_path / "raw", str(tmp_path / "shards"), seed=1, maxcount=3)
    out = tmp_path / "run"
    small = ["backbone.name=blip-tiny-vqa", f"backbone.checkpoint={tmp_path / 'ckpt'}", *SMALL]
    _run(["--no-deepspeed", "--recipe", "vqa", "--train-shards", data["train"], "--out", str(out), "--max-steps", "1",
          *_sets(small)], tmp_path / "train.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frozen"] is None and summary["evaluations"] == []
    adapter = out / "adapter_latest"
    assert json.loads((adapter / "adapter_config.json").read_text())["run"]["answer_list"] == "answer_list.json"
    _run(["--no-deepspeed", "--adapter", str(adapter), "--shards", data["test"], "--out", str(tmp_path / "eval")],
         tmp_path / "eval.log", module="aurora_ds.evaluate")
    metrics = json.loads((tmp_path / "eval" / "eval" / "step_000001.json").read_text())
    assert metrics["num_questions"] > 0 and "chance" in metrics
    assert (tmp_path / "eval" / "eval" / "results_step_000001.json").is_file()
