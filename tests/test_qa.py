"""VQA: the official accuracy and normalisation, the submission file, and the BLIP VQA objective
(training, candidate and generate inference) on the tiny random-init backbone."""

import json
import sys

import pytest
import torch

from aurora_ds import AuroraConfig, build_backbone, inject_aurora
from aurora_ds.backbones.tokenizer import train_tokenizer
from aurora_ds.engine.config import build_config
from aurora_ds.engine.loop import make_objective as objective_for
from aurora_ds.tasks.blip2 import Blip2QAObjective
from aurora_ds.tasks.qa import QAObjective, answer_candidates, tokenize_answers
from aurora_ds.tasks.vqa_eval import (evaluate_qa, exact_match, human_answers, normalize_answer,
                                      question_accuracy, summarize, write_submission)

QUESTIONS = ["what color is the cat", "how many dogs are there", "is it raining", "what is on the table"]
ANSWER_LIST = ["red", "blue", "two", "three", "yes", "no", "a red apple", "nothing"]
TRAINED = ["blue", "three", "no", "a red apple"]


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("ten", "10"), ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"),
    ("isnt", "isn't"), ("dont", "don't"), ("isn't", "isn't"),
    ("yes.", "yes"), ("2.5", "2.5"), ("  yes\n", "yes"),
    ("10,000", "10000"),  # a digit,digit comma deletes every punctuation mark
    ("hello, world", "hello world"),  # punctuation next to a space is deleted
    ("black/white", "black white"),  # other punctuation becomes a space
    ("what?!", "what"),
])
def test_normalize_answer_as_official(raw, expected):
    assert normalize_answer(raw) == expected


def test_question_accuracy_by_hand():
    """10 humans; each of the 10 leave-one-out subsets scores min(matches in it / 3, 1).
    m matching humans: m subsets drop a match (m-1 left), 10-m drop another (m left):
      m=4: (4·min(3/3,1) + 6·1) / 10 = 1.0
      m=3: (3·2/3 + 7·1) / 10 = 0.9
      m=2: (2·1/3 + 8·2/3) / 10 = 0.6
      m=1: (1·0 + 9·1/3) / 10 = 0.3
    """
    for m, expected in [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)]:
        humans = ["cat"] * m + ["dog"] * (10 - m)
        assert question_accuracy("cat", humans) == pytest.approx(expected)
    assert question_accuracy("Two", ["2"] * 10) == 1.0  # the prediction is always normalised
    # humans disagree: their punctuation is processed too
    assert question_accuracy("black white", ["black/white"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # fewer humans, same leave-one-out: drop a cat -> 1 cat (1/3) twice, drop the dog -> 2 cats (2/3)
    assert question_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_human_answers_and_summary():
    assert sorted(human_answers(["yes", "no"], [0.7, 0.3])) == ["no"] * 3 + ["yes"] * 7
    assert human_answers(["yes"], [1.0]) == ["yes"] * 10  # unanimous: 10 agreeing humans
    assert sorted(human_answers(["a", "b", "c"], [1 / 3] * 3)) == ["a", "b", "c"]
    assert exact_match("The Dog", "dog") == 1.0 and exact_match("cat", "dog") == 0.0
    metrics = summarize([1.0, 0.3, 0.0, 1.0], ["yes/no", "number", "yes/no", "other"])
    assert metrics == {"accuracy": 57.5, "accuracy_number": 30.0, "accuracy_other": 100.0, "accuracy_yes_no": 50.0}


def test_write_submission(tmp_path):
    path = tmp_path / "sub" / "vqa_result.json"
    write_submission(path, [{"question_id": "262148000", "answer": "yes", "gt": ["yes"]},
                            {"question_id": 7, "answer": "2"}])
    assert json.loads(path.read_text()) == [{"question_id": 262148000, "answer": "yes"},
                                            {"question_id": 7, "answer": "2"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(QUESTIONS + ANSWER_LIST, vocab_size=1024)


BACKBONES = ["blip-tiny-vqa", "blip2-opt-tiny-vqa"]


def make_objective(tokenizer, backbone="blip-tiny-vqa", targets="paper", overrides=None):
    torch.manual_seed(0)
    model = build_backbone(backbone)
    inject_aurora(model, AuroraConfig(rank=4, backbone=backbone, targets=targets))
    cfg = build_config("", {"objective.task": "qa", "backbone.name": backbone, "data.source": "synthetic",
                            "eval.k_test": 4, **(overrides or {})})
    objective = objective_for(cfg, model)
    objective.tokenizer = tokenizer
    return objective


def make_batch(tokenizer, frames=0):
    g = torch.Generator().manual_seed(1)
    shape = (4, frames, 3, 32, 32) if frames else (4, 3, 32, 32)
    question = tokenizer(QUESTIONS, padding="longest", return_tensors="pt")
    return {"pixel_values": torch.randn(shape, generator=g), "input_ids": question["input_ids"],
            "attention_mask": question["attention_mask"], "question": QUESTIONS, "question_id": [1, 2, 3, 4],
            "answers": [[a] for a in TRAINED], "answer_weights": [[1.0]] * 4}


def train(objective, batch, steps, lr=3e-2):
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = objective.losses(objective, batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_answer_tokens_start_with_decoder_bos(tokenizer):
    ids, mask = tokenize_answers(tokenizer, ["yes", "a red apple"])
    assert ids[:, 0].tolist() == [5, 5]  # [DEC], not [CLS]
    assert ids[0, mask[0].sum() - 1] == 3 and ids[1, -1] == 3  # each ends with [SEP]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_weighted_answer_loss_and_one_forward(tokenizer, backbone):
    """BLIP: loss = Σ weight · answer NLL / questions; losses() calls forward exactly once."""
    objective = make_objective(tokenizer, backbone, overrides={"aurora.dropout": 0.0})
    assert isinstance(objective, Blip2QAObjective if backbone.startswith("blip2") else QAObjective)
    objective.eval()
    batch = make_batch(tokenizer)
    calls = []

    def forward(*args):
        calls.append(args[2])
        return objective(*args)

    single = objective.losses(forward, batch, 0)
    assert calls == ["train"] and set(single) == {"loss", "answer"}
    # giving each question a second answer with weight 0 must not change the loss
    padded = dict(batch, answers=[[a, "nothing"] for a in TRAINED], answer_weights=[[1.0, 0.0]] * 4)
    assert objective.losses(objective, padded, 0)["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-5)
    halved = dict(padded, answer_weights=[[0.5, 0.0]] * 4)
    assert objective.losses(objective, halved, 0)["loss"].item() == pytest.approx(single["loss"].item() / 2, rel=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_lowers_loss_and_rank_picks_trained_answer(tokenizer, tmp_path, backbone):
    """Every question trained towards "three"; rank must then prefer it over the 7 others.

    One answer for all questions, not one each: the random tiny backbone's frozen LM head maps
    LayerNorm'd 32-d features through 0.02-std weights (logits within about ±0.6), too flat for
    the adapters alone to learn per-question answers in a few steps.
    """
    # BLIP-2's paper preset leaves the language model alone: only its 4-token visual prefix
    # moves, too weak a lever on a random LM; all-linear adapts the LM's attention as well.
    objective = make_objective(tokenizer, backbone, targets="all-linear" if backbone.startswith("blip2") else "paper")
    batch = dict(make_batch(tokenizer), answers=[["three"]] * 4)
    # Adam at 3e-2 overshoots on the random OPT once its loss flattens (it climbs back by step 25)
    losses = train(objective, batch, 30, lr=1e-2 if backbone.startswith("blip2") else 3e-2)
    assert max(losses[-5:]) < losses[0] - 0.3

    candidates = answer_candidates(tokenizer, ANSWER_LIST)
    ranked = objective(batch, 0, "candidates", candidates)
    assert ranked == ["three"] * 4
    assert objective.training  # inference modes restore the caller's mode
    assert objective(batch, 0, "candidates", candidates) == ranked

    # VQA's human answers are stored normalised ("3"); the prediction "three" is normalised to "3"
    eval_batch = dict(batch, answers=[["3", "red"]] * 4, answer_weights=[[0.7, 0.3]] * 4,
                      answer_type=["other", "number", "yes/no", "other"])
    metrics = evaluate_qa(objective, [eval_batch, eval_batch], objective.cfg, tokenizer, ANSWER_LIST,
                          tmp_path / "res.json")
    assert metrics["accuracy"] == 100.0 and metrics["select"] == 100.0 and metrics["num_questions"] == 4
    assert metrics["accuracy_yes_no"] == 100.0
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows == [{"question_id": i, "answer": "three"} for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generate_returns_strings_deterministically(tokenizer, backbone):
    objective = make_objective(tokenizer, backbone, overrides={"eval.inference": "generate"})
    batch = make_batch(tokenizer)
    first = objective(batch, 0, "generate")
    assert len(first) == 4 and all(isinstance(a, str) for a in first)
    assert objective(batch, 0, "generate") == first
    test_split = dict(batch, answers=[[] for _ in TRAINED], answer_weights=[[] for _ in TRAINED])
    metrics = evaluate_qa(objective, [test_split], objective.cfg, tokenizer)
    assert metrics == {"num_questions": 4, "num_scored": 0}  # no accuracy for unlabeled questions


@pytest.mark.parametrize("backbone", BACKBONES)
def test_video_qa_trains(tokenizer, backbone):
    """Frames go through the vision tower; the question attends to all frames' tokens."""
    objective = make_objective(tokenizer, backbone, overrides={"data.media": "video", "data.num_frames": 2, "eval.inference": "generate"})
    batch = make_batch(tokenizer, frames=2)
    losses = train(objective, batch, 8)
    assert losses[-1] < losses[0]
    assert len(objective(batch, 0, "generate")) == 4


def test_blip2_answer_likelihood_ignores_prompt_padding(tokenizer):
    """Prompts are left-padded so answers line up: a question's answer NLL must not depend on
    the other questions in its batch."""
    objective = make_objective(tokenizer, "blip2-opt-tiny-vqa", overrides={"aurora.dropout": 0.0})
    objective.eval()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        together = objective(dict(batch, answer_weights=[[1.0]] * 4), 0, "train")
        alone = [objective({k: v[i:i + 1] for k, v in batch.items()}, 0, "train")["loss"] for i in range(4)]
    assert together["loss"].item() == pytest.approx(sum(a.item() for a in alone) / 4, rel=1e-4)


def _run(cmd, log, cwd):
    import os
    import subprocess

    from aurora_ds.dist import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=400).returncode
    assert code == 0, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_test_dev_shards_give_the_submission_file(tmp_path):
    """VQAv2 test-dev (questions, no annotations) -> aurora-shard -> the evaluation set of a 2-rank
    training run and of aurora-eval: both write the submission file (every question once,
    ``{"question_id": int, "answer": str}``) and report no accuracy. The answer list is the
    training split's answers.json, built once into the run, and aurora-eval ranks the same one."""
    from pathlib import Path

    from aurora_ds.data.shard_format import ANSWERS
    from shard_tools.convert import convert
    from shard_tools.quickstart import shard_spec
    from shard_tools.sample import make_vqa

    root = Path(__file__).resolve().parents[1]
    raw = make_vqa(str(tmp_path / "raw"), 12, seed=4, subtypes=("train2014", "test-dev2015"))
    with open(tmp_path / "convert.log", "w") as log:
        train = convert("vqa", [f"{raw}/v2_OpenEnded_mscoco_train2014_questions.json",
                                f"{raw}/v2_mscoco_train2014_annotations.json"], raw, "train", str(tmp_path / "train"),
                        maxcount=3, log=log)
        test = convert("vqa", [f"{raw}/v2_OpenEnded_mscoco_test-dev2015_questions.json"], raw, "test-dev",
                       str(tmp_path / "test-dev"), maxcount=2, log=log)
    question_ids = sorted(q["question_id"] for q in json.loads(
        Path(raw, "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"])
    checkpoint = tmp_path / "blip-tiny-vqa"
    torch.manual_seed(0)
    build_backbone("blip-tiny-vqa").save_pretrained(checkpoint)
    small = ["aurora.rank=4", "backbone.train_tokenizer=true", "optim.batch_size=4", "eval.batch_size=4", "data.image_size=32", "data.num_workers=1",
             "eval.k_test=4", "output.progress=false", "backbone.name=blip-tiny-vqa", f"backbone.checkpoint={checkpoint}"]
    out = tmp_path / "run"
    _run(["bash", "launchers/local.sh", "2", "--recipe", "vqa", "--train-shards", shard_spec(str(tmp_path / "train"), train),
          "--eval-shards", shard_spec(str(tmp_path / "test-dev"), test), "--out", str(out), "--max-steps", "2",
          *sum((["--set", s] for s in small), [])], tmp_path / "train.log", root)
    trained_answers = list(json.loads((tmp_path / "train" / ANSWERS).read_text()))
    assert json.loads((out / "answer_list.json").read_text()) == trained_answers[:3128]
    _run([sys.executable, "-m", "aurora_ds.evaluate", "--adapter", str(out / "adapter_latest"), "--no-deepspeed",
          "--shards", shard_spec(str(tmp_path / "test-dev"), test), "--out", str(tmp_path / "eval"),
          "--set", f"backbone.checkpoint={checkpoint}"], tmp_path / "eval.log", root)
    assert json.loads((tmp_path / "eval" / "answer_list.json").read_text()) == trained_answers
    for folder, step in ((out, 2), (tmp_path / "eval", 2)):  # aurora-eval names its output by the adapter's step
        metrics = json.loads((folder / "eval" / f"step_{step:06d}.json").read_text())
        assert metrics == {"num_questions": len(question_ids), "num_scored": 0}
        rows = json.loads((folder / "eval" / f"results_step_{step:06d}.json").read_text())
        assert sorted(r["question_id"] for r in rows) == question_ids
        assert all(set(r) == {"question_id", "answer"} and r["answer"] in trained_answers for r in rows)
    assert not (out / "adapter_best").exists()  # nothing to select on without labels
