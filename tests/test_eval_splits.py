"""Select on validation, report on test: ``adapter_best`` is chosen on ``data.eval_shards`` and
the chosen adapter is evaluated once on ``data.test_shards`` after training (one process, real
shards of the sample Karpathy COCO, which has both splits)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["aurora.rank=4", "backbone.train_tokenizer=true", "optim.batch_size=4", "eval.batch_size=8", "data.image_size=32", "objective.queue_size=32",
         "data.num_workers=0", "eval.k_test=8", "output.progress=false", "output.log_every=1"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from shard_tools.quickstart import sample_shards

    tmp = tmp_path_factory.mktemp("coco")
    return sample_shards("coco", 30, tmp / "raw", str(tmp / "shards"), seed=1, maxcount=4)


def _run(module, args, log):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", module, "--no-deepspeed", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, timeout=600).returncode
    assert code == 0, Path(log).read_text()[-4000:]


def _train(checkpoint, out, log, *args):
    sets = [x for item in SMALL for x in ("--set", item)]
    _run("aurora_ds.train", ["--recipe", "coco_retrieval", "--set", "backbone.name=blip-tiny-retrieval",
                             "--set", f"backbone.checkpoint={checkpoint}", "--out", str(out), *sets, *args], log)
    return json.loads((out / "summary.json").read_text())


def test_the_adapter_chosen_on_validation_is_the_one_reported_on_test(coco, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    summary = _train(tiny_checkpoint, out, tmp_path / "train.log", "--train-shards", coco["train"],
                     "--eval-shards", coco["val"], "--test-shards", coco["test"], "--max-steps", "4",
                     # a step too small to change any score: every validation ties, so the first
                     # step's adapter stays the chosen one and must be loaded back for the test
                     "--set", "eval.every=1", "--set", "optim.lr=1e-12")
    best, test = summary["best"], summary["test"]
    assert test["adapter"] == "adapter_best" and test["step"] == best["step"]
    assert best["step"] == 1 < summary["steps"]  # the chosen adapter is loaded back for the test
    assert test["metrics"]["num_media"] == coco["num_test"] and best["num_media"] == coco["num_val"]
    written = json.loads((out / "eval" / f"test_step_{best['step']:06d}.json").read_text())
    assert written == {"adapter": "adapter_best", "step": best["step"], **test["metrics"]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("test/r_mean")] == [0, best["step"]]  # the frozen model, then adapter_best
    # The metrics are adapter_best's: aurora-eval of that adapter on the test shards agrees.
    _run("aurora_ds.evaluate", ["--adapter", str(out / "adapter_best"), "--shards", coco["test"],
                                "--out", str(tmp_path / "eval")], tmp_path / "eval.log")
    again = json.loads((tmp_path / "eval" / "eval" / f"step_{best['step']:06d}.json").read_text())
    assert again.pop("chance") == pytest.approx(test["metrics"].pop("chance"))
    assert again == pytest.approx(test["metrics"], abs=1e-6)


def test_without_validation_the_last_adapter_is_tested(coco, tiny_checkpoint, tmp_path):
    """MSRVTT's case (a test split only): nothing to choose on, the last adapter is reported."""
    out = tmp_path / "run"
    summary = _train(tiny_checkpoint, out, tmp_path / "train.log", "--train-shards", coco["train"],
                     "--test-shards", coco["test"], "--max-steps", "2")
    assert summary["best"] is None and not (out / "adapter_best").exists()
    assert summary["test"]["adapter"] == "adapter_latest" and summary["test"]["step"] == 2
    assert json.loads((out / "eval" / "test_step_000002.json").read_text())["adapter"] == "adapter_latest"
    assert not list((out / "eval").glob("step_*.json"))  # no validation metrics
