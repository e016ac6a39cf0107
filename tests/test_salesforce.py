"""Real Salesforce BLIP checkpoints as they are laid out on the hub (built offline by
``conftest.salesforce_checkpoint``): BLIP's token conventions ([DEC]/[ENC] added and checked
against the checkpoint's config, [ENC] at position 0 of every matching pass and of the VQA
question encoder, one answer bos in training, ranking and generation), and training on 2 ranks
from such a checkpoint (BLIP retrieval, BLIP VQA, BLIP-2 retrieval) with its adapter evaluated
alone."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from aurora_ds import AuroraConfig, inject_aurora
from aurora_ds.backbones import backbone_config, build_backbone, checkpoint_identity, get_spec
from aurora_ds.backbones import blip
from aurora_ds.backbones.tokenizer import load_tokenizer
from aurora_ds.engine.config import build_config, load_recipe
from aurora_ds.engine.data import text_conventions
from aurora_ds.engine.loop import make_objective
from aurora_ds.tasks.qa import answer_candidates

ROOT = Path(__file__).resolve().parents[1]
DEC, ENC, CLS = 30522, 30523, 101
NAMES = {"retrieval": "blip-base-retrieval", "vqa": "blip-base-vqa"}


def _setup(checkpoint, kind, **overrides):
    """What the engine does before and after building: config, tokenizer with BLIP's tokens, objective."""
    name = NAMES[kind]
    cfg = build_config("", {"backbone.name": name, "backbone.checkpoint": str(checkpoint), "data.source": "synthetic",
                            "objective.task": "qa" if kind == "vqa" else "retrieval", "objective.queue_size": 16,
                            "eval.k_test": 2, **overrides})
    tokenizer = load_tokenizer(checkpoint)
    special = text_conventions(cfg, get_spec(name), backbone_config(name, checkpoint), tokenizer, trained_here=False)
    torch.manual_seed(0)
    model = build_backbone(name, checkpoint)
    inject_aurora(model, AuroraConfig(rank=4, backbone=name))
    objective = make_objective(cfg, model)
    objective.tokenizer, objective.special = tokenizer, special
    return objective, tokenizer


class Probe:
    """Records the input ids of every text-encoder pass (fused or not) and decoder pass."""

    def __init__(self, model):
        self.fused, self.text, self.decoder = [], [], []
        self.handles = [model.text_encoder.register_forward_pre_hook(self._encoder, with_kwargs=True)]
        if hasattr(model, "text_decoder"):
            self.handles.append(model.text_decoder.register_forward_pre_hook(self._decoder, with_kwargs=True))

    def _encoder(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        (self.fused if kwargs.get("encoder_hidden_states") is not None else self.text).append(ids[:, 0].clone())

    def _decoder(self, module, args, kwargs):
        self.decoder.append(kwargs["input_ids"][:, 0].clone())

    def close(self):
        for h in self.handles:
            h.remove()


def test_tokenizer_gets_blips_tokens_checked_against_the_config(salesforce_checkpoints, tmp_path):
    ckpt = salesforce_checkpoints["retrieval"]
    tokenizer = load_tokenizer(ckpt)
    assert tokenizer.bos_token is None and "[ENC]" not in tokenizer.get_vocab()  # as on the hub
    special = blip.special_tokens(backbone_config("blip-base-retrieval", ckpt), tokenizer)
    assert special == (ENC, DEC)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == DEC
    assert tokenizer.convert_tokens_to_ids("[ENC]") == ENC and len(tokenizer) == 30524
    # a checkpoint whose config puts [DEC] elsewhere: an error naming both ids
    other = backbone_config("blip-base-retrieval", ckpt)
    other.text_config.bos_token_id = 30000
    with pytest.raises(ValueError, match=r"\[DEC\] is id 30522 but .* expects 30000"):
        blip.special_tokens(other, load_tokenizer(ckpt))
    # switched off: nothing added, [CLS] stays, the answer bos is still the config's
    plain = load_tokenizer(ckpt)
    assert blip.special_tokens(backbone_config("blip-base-retrieval", ckpt), plain, enabled=False) == (None, DEC)
    assert len(plain) == 30522
    # a vocab.txt alone (no tokenizer config) is read as BERT's tokenizer
    (tmp_path / "vocab.txt").write_text((ckpt / "vocab.txt").read_text())
    assert load_tokenizer(tmp_path)("a cat")["input_ids"] == load_tokenizer(ckpt)("a cat")["input_ids"]


def test_retrieval_puts_enc_first_in_every_matching_pass(salesforce_checkpoints):
    objective, tokenizer = _setup(salesforce_checkpoints["retrieval"], "retrieval")
    objective.ema = type("NoEMA", (), {"update": lambda self: None,
                                       "swapped": lambda self: __import__("contextlib").nullcontext()})()
    enc = tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=12, return_tensors="pt")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": enc["input_ids"],
             "attention_mask": enc["attention_mask"], "media_id": ["m0", "m1"]}
    probe = Probe(objective.backbone)
    try:
        losses = objective.losses(objective, batch, 0)
        assert set(losses) == {"itc", "itm", "loss"} and torch.isfinite(losses["loss"])
        assert probe.fused and all((ids == ENC).all() for ids in probe.fused)  # training ITM
        assert probe.text and all((ids == CLS).all() for ids in probe.text)  # contrastive text: [CLS]
        probe.fused.clear()
        with torch.no_grad():
            tokens = objective(batch, 0, "embed_media")[1]
            objective({**batch, "media_tokens": tokens, "text_cls": torch.zeros(1, 32)}, 0, "match")
        assert len(probe.fused) == 1 and (probe.fused[0] == ENC).all()  # evaluation ITM
    finally:
        probe.close()
    off, _ = _setup(salesforce_checkpoints["retrieval"], "retrieval", **{"backbone.blip_special_tokens": False})
    probe = Probe(off.backbone)
    with torch.no_grad():
        off({**batch, "media_tokens": tokens, "text_cls": torch.zeros(1, 32)}, 0, "match")
    probe.close()
    assert (probe.fused[0] == CLS).all()


def test_vqa_enc_for_questions_and_one_answer_bos(salesforce_checkpoints):
    objective, tokenizer = _setup(salesforce_checkpoints["vqa"], "vqa")
    q = tokenizer(["what is in the picture", "how many dogs"], padding="longest", return_tensors="pt")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": q["input_ids"], "attention_mask": q["attention_mask"],
             "answers": [["cat", "dog"], ["no"]], "answer_weights": [[0.5, 0.5], [1.0]]}
    probe = Probe(objective.backbone)
    try:
        loss = objective.losses(objective, batch, 0)["loss"]
        assert torch.isfinite(loss)  # step 1 of the vqa recipe on a hub tokenizer
        assert all((ids == ENC).all() for ids in probe.fused) and len(probe.fused) == 1
        assert len(probe.decoder) == 1 and (probe.decoder[0] == DEC).all()  # training's answer bos
        probe.fused.clear(), probe.decoder.clear()
        ranked = objective(batch, 0, "candidates", answer_candidates(tokenizer, ["cat", "dog", "no"]))
        assert len(ranked) == 2
        assert probe.decoder and all((ids == DEC).all() for ids in probe.decoder)  # ranking's
        probe.decoder.clear()
        answers = objective(batch, 0, "generate")
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        assert probe.decoder and (probe.decoder[0] == DEC).all()  # generation starts from the same bos
        assert all((ids == ENC).all() for ids in probe.fused)
    finally:
        probe.close()


# ---- 2 ranks under ZeRO-3, from the checkpoint ------------------------------------------------

def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(_port()))
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=600).returncode
    return code, Path(log).read_text()


SMALL = ["aurora.rank=4", "optim.batch_size=4", "eval.batch_size=8", "data.image_size=32", "objective.queue_size=32",
         "data.num_workers=1", "eval.k_test=8", "output.progress=false"]


@pytest.mark.distributed
@pytest.mark.parametrize("recipe, kind, dataset", [("coco_retrieval", "retrieval", "coco"), ("vqa", "vqa", "vqa"),
                                                   ("coco_retrieval_blip2", "blip2", "coco")])
def test_recipe_trains_from_a_salesforce_checkpoint_and_its_adapter_evaluates_alone(salesforce_checkpoints, tmp_path,
                                                                                      recipe, kind, dataset):
    """The recipe as shipped (its backbone name, the checkpoint's tokenizer and preprocessing) on
    2 ZeRO-3 ranks; then aurora-eval of adapter_best inside its run, and of a copy with the run
    directory deleted and the checkpoint moved: the same metrics, from the adapter alone."""
    from shard_tools.quickstart import sample_shards

    checkpoint = salesforce_checkpoints[kind]
    data = sample_shards(dataset, 12, tmp_path / "raw", str(tmp_path / "shards"), seed=1, maxcount=3)
    out = tmp_path / "run"
    cmd = ["bash", "launchers/local.sh", "2", "--recipe", recipe, "--train-shards", data["train"],
           "--eval-shards", data["test"], "--out", str(out), "--max-steps", "2", "--set", f"backbone.checkpoint={checkpoint}"]
    for item in SMALL:
        cmd += ["--set", item]
    code, log = _run(cmd, tmp_path / "train.log")
    assert code == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    metrics = json.loads((out / "eval" / "step_000002.json").read_text())
    assert 0.0 <= metrics["select"] <= 100.0
    record = json.loads((out / "adapter_best" / "adapter_config.json").read_text())["run"]
    assert record["checkpoint"] == checkpoint_identity(checkpoint)
    assert record["tokenizer"]["source"] == f"backbone.checkpoint={checkpoint}" and not record["tokenizer"]["trained"]
    prep = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert record["preprocessing"] == {"mean": prep["image_mean"], "std": prep["image_std"], "size": 32, "resample": "bicubic"}
    assert record["backbone"]["name"] == load_recipe(recipe)["backbone"]["name"]

    def evaluate(adapter, name, *extra):
        code, log = _run([str(Path(os.sys.executable)), "-m", "aurora_ds.evaluate", "--no-deepspeed", "--adapter",
                          str(adapter), "--shards", data["test"], "--out", str(tmp_path / name), *extra], tmp_path / f"{name}.log")
        assert code == 0, log[-4000:]
        return json.loads((tmp_path / name / "eval" / "step_000002.json").read_text())  # adapter_best's step

    in_run = evaluate(out / "adapter_best", "eval_in_run")
    assert in_run.keys() == metrics.keys()
    lone = shutil.copytree(out / "adapter_best", tmp_path / "elsewhere" / "adapter")
    shutil.rmtree(out)
    moved = shutil.copytree(checkpoint, tmp_path / "moved")
    assert evaluate(lone, "eval_alone", "--set", f"backbone.checkpoint={moved}") == in_run


def test_preprocessing_comes_from_the_checkpoint(tmp_path, make_salesforce_checkpoint):
    """A checkpoint declaring its own mean/std/size/resample is fed exactly those; a recipe's size
    that differs is said in the log."""
    from aurora_ds.data import media
    from aurora_ds.engine.data import loader_config, media_size, preprocessing

    ckpt = make_salesforce_checkpoint(tmp_path / "ckpt", "retrieval", image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 0.25))
    cfg = build_config("", {"backbone.name": "blip-base-retrieval", "backbone.checkpoint": str(ckpt),
                            "data.source": "synthetic"})
    assert preprocessing(cfg) == {"mean": (0.5, 0.25, 0.0), "std": (0.5, 0.5, 0.25), "size": 16, "resample": "bicubic"}
    spec, config = get_spec("blip-base-retrieval"), backbone_config("blip-base-retrieval", ckpt)
    said = []
    assert media_size(cfg, spec, config, said.append) == 16 and not said  # not the registry's 384
    lc = loader_config(cfg, 16, train=False)
    assert (lc.mean, lc.std, lc.resample) == ((0.5, 0.25, 0.0), (0.5, 0.5, 0.25), "bicubic")
    gray = torch.full((3, 20, 20), 128, dtype=torch.uint8)
    out = media.build_transform(16, False, lc.mean, lc.std, lc.resample)(gray)
    expected = (128 / 255 - torch.tensor(lc.mean)) / torch.tensor(lc.std)
    assert out.shape == (3, 16, 16) and torch.allclose(out[:, 0, 0], expected, atol=1e-5)
    recipe = build_config("", {"backbone.name": "blip-base-retrieval", "backbone.checkpoint": str(ckpt),
                               "data.source": "synthetic", "data.image_size": 32})
    assert media_size(recipe, spec, config, said.append) == 32
    assert len(said) == 1 and "data.image_size=32" in said[0] and "16 px" in said[0]
    # no preprocessor_config.json: BLIP's constants
    (ckpt / "preprocessor_config.json").unlink()
    assert preprocessing(cfg)["mean"] == media.BLIP_MEAN
