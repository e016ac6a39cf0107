"""One run setup before the backbone is built (engine/setup.py): each mistake a real user met
(a pretrained checkpoint saved without its tokenizer, a same-config checkpoint of other weights,
shards of another kind, a checkpoint of the other task, misleading messages) is found in seconds,
named by key or flag and path, and the backbone is never built."""

import json
import shutil
from pathlib import Path

import pytest

import aurora_ds.engine.loop as loop
from aurora_ds.backbones import WEIGHTS_DIGEST_CACHE, build_backbone, checkpoint_identity
from aurora_ds.engine.adapter_record import check_checkpoint
from aurora_ds.engine.config import build_config
from aurora_ds.engine.inputs import validate_inputs

TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture()
def never_built(monkeypatch):
    """Fails the test if a run gets as far as building its backbone."""
    def build(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(loop, "build_model", build)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shard_factory):
    """COCO-like (kind image), VQA-like (image_qa) and VQA test-dev-like (no answers) shards."""
    base = tmp_path_factory.mktemp("shards")
    coco = shard_factory.write(shard_factory.coco(4), str(base / "coco"), "c", 2)
    vqa = shard_factory.write(shard_factory.vqa(4), str(base / "vqa"), "v", 2, kind="image_qa")
    testdev = shard_factory.write(shard_factory.vqa(4), str(base / "testdev"), "t", 2, kind="image_qa")
    (base / "testdev" / "answers.json").write_text("{}\n")
    return {"coco": coco, "vqa": vqa, "testdev": testdev, "base": base}


def _train(recipe="", **values):
    return loop.train(build_config(recipe, {"engine.deepspeed": False, "output.progress": False, **values}))


def test_pretrained_checkpoint_without_tokenizer_is_refused(tmp_path, make_salesforce_checkpoint, shards, never_built):
    """model.save_pretrained(DIR) alone writes no tokenizer: that is an error saying how to fix it,
    not a tokenizer trained on the captions feeding ids into the pretrained embedding."""
    checkpoint = make_salesforce_checkpoint(tmp_path / "ckpt")
    for name in TOKENIZER_FILES:
        (checkpoint / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"backbone.checkpoint={checkpoint}: no tokenizer there .*"
                                                r"processor.save_pretrained\(DIR\).*backbone.train_tokenizer=true"):
        _train("coco_retrieval", **{"backbone.name": "blip-base-retrieval", "backbone.checkpoint": str(checkpoint),
                                    "data.train_shards": shards["coco"], "output.dir": str(tmp_path / "run")})


def _other_weights(checkpoint: Path, out: Path) -> Path:
    """A copy of ``checkpoint`` with the same config, file names and sizes, other weight values."""
    other = shutil.copytree(checkpoint, out)
    (other / WEIGHTS_DIGEST_CACHE).unlink(missing_ok=True)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    weights.write_bytes(bytes(data))
    return other


def test_same_config_other_weights_warn_naming_both(tiny_checkpoint, tmp_path):
    recorded = checkpoint_identity(tiny_checkpoint)
    assert json.loads((Path(tiny_checkpoint) / WEIGHTS_DIGEST_CACHE).read_text())  # computed once, cached beside
    assert checkpoint_identity(tiny_checkpoint) == recorded
    other = _other_weights(tiny_checkpoint, tmp_path / "other")
    actual = checkpoint_identity(other)
    assert actual["sha256"] == recorded["sha256"] and actual["weights_sha256"] != recorded["weights_sha256"]
    cfg = build_config("", {"data.source": "synthetic", "backbone.checkpoint": str(other)})
    said = []
    check_checkpoint({"checkpoint": recorded}, cfg, "ADAPTER", said.append)
    assert len(said) == 1 and "warning" in said[0]
    for part in (str(other), recorded["path"], actual["weights_sha256"], recorded["weights_sha256"]):
        assert part in said[0]
    moved, said = shutil.copytree(tiny_checkpoint, tmp_path / "moved"), []
    check_checkpoint({"checkpoint": recorded}, build_config("", {"data.source": "synthetic", "backbone.checkpoint": str(moved)}),
                     "ADAPTER", said.append)
    assert len(said) == 1 and str(moved) in said[0] and recorded["path"] in said[0] and "same weights" in said[0]
    old = {k: v for k, v in recorded.items() if k not in ("weights_sha256", "architectures")}  # an older adapter
    said = []
    check_checkpoint({"checkpoint": old}, cfg, "ADAPTER", said.append)
    assert "same weights" not in said[0] and "SHA-256" not in said[0]
    with pytest.raises(ValueError, match=rf"holds \['BlipForImageTextRetrieval'\], but adapter ADAPTER was trained "
                                         r"on \['BlipForQuestionAnswering'\]"):
        check_checkpoint({"checkpoint": {**recorded, "architectures": ["BlipForQuestionAnswering"]}}, cfg, "ADAPTER")


def test_vqa_shards_without_recipe_are_refused_before_the_build(shards, tmp_path, never_built):
    with pytest.raises(ValueError, match=r"data.train_shards \(--train-shards\)=.*says kind 'image_qa', but recipe "
                                         r"\(none: the defaults\) trains retrieval on image.*--recipe vqa"):
        _train(**{"data.train_shards": shards["vqa"], "output.dir": str(tmp_path / "run")})


def test_vqa_training_on_test_dev_shards_is_refused_before_the_build(shards, tmp_path, never_built):
    with pytest.raises(ValueError, match="lists no answers: these shards are a split without annotations") as err:
        _train("vqa", **{"backbone.name": "blip-tiny-vqa", "data.train_shards": shards["testdev"],
                         "output.dir": str(tmp_path / "run")})
    assert "fewer ranks" not in str(err.value)


def test_vqa_evaluation_on_coco_shards_is_refused_before_the_build(salesforce_checkpoints, shards, tmp_path, never_built):
    (tmp_path / "answers.json").write_text('["cat", "dog"]')
    cfg = build_config("vqa", {"backbone.name": "blip-base-vqa", "backbone.checkpoint": str(salesforce_checkpoints["vqa"]),
                               "data.train_shards": shards["coco"], "data.eval_shards": shards["coco"],
                               "eval.answer_list": str(tmp_path / "answers.json"), "engine.deepspeed": False})
    with pytest.raises(ValueError, match=r"--shards=.*says kind 'image', but recipe vqa trains qa on image"):
        loop.evaluate(cfg)


def test_retrieval_run_on_a_vqa_checkpoint_is_refused(salesforce_checkpoints, shards, tmp_path, never_built):
    vqa = salesforce_checkpoints["vqa"]
    with pytest.raises(ValueError, match=rf"backbone.checkpoint={vqa}: its config.json has architectures "
                                         r"\['BlipForQuestionAnswering'\], but this retrieval run .* loads a "
                                         "BlipForImageTextRetrieval"):
        _train("coco_retrieval", **{"backbone.name": "blip-base-retrieval", "backbone.checkpoint": str(vqa),
                                    "data.train_shards": shards["coco"], "output.dir": str(tmp_path / "run")})


def test_load_adapter_of_another_task_is_a_clear_error(tmp_path):
    from aurora_ds import AuroraConfig, inject_aurora, load_adapter

    inject_aurora(build_backbone("blip-tiny-retrieval"), AuroraConfig(rank=2, backbone="blip-tiny-retrieval")).save(tmp_path / "a")
    with pytest.raises(ValueError, match=f"adapter {tmp_path / 'a'} does not fit this BlipForQuestionAnswering"):
        load_adapter(build_backbone("blip-tiny-vqa"), tmp_path / "a")


def test_messages_name_what_is_actually_wrong(tmp_path, salesforce_checkpoints, shards, never_built):
    """A moved checkpoint is missing, not tokenizer-less; a checkpoint directory without config.json
    says so; a shard directory with sizes.json is its shards, one without says what to give."""
    def zero_shot(checkpoint):
        return loop.evaluate(build_config("coco_retrieval", {
            "backbone.name": "blip-base-retrieval", "backbone.checkpoint": str(checkpoint), "engine.deepspeed": False,
            "data.train_shards": shards["coco"], "data.eval_shards": shards["coco"]}))

    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'moved'} .* does not exist"):
        zero_shot(tmp_path / "moved")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"backbone.checkpoint={tmp_path / 'empty'}: no config.json there"):
        zero_shot(tmp_path / "empty")
    from aurora_ds.engine.setup import check_inputs
    from aurora_ds.backbones import get_spec

    cfg = build_config("", {"engine.deepspeed": False, "data.source": "synthetic",
                            "backbone.checkpoint": str(tmp_path / "moved")})
    with pytest.raises(FileNotFoundError, match=f"backbone.checkpoint={tmp_path / 'moved'}: the checkpoint adapter A "
                                                r"was trained from is not there \(moved or deleted\?\)"):
        check_inputs(cfg, get_spec(cfg.backbone.name), 1, {}, adapter="A")

    cfg = build_config("", {"engine.deepspeed": False, "data.train_shards": str(shards["base"] / "coco")})
    validate_inputs(cfg)
    assert cfg.data.train_shards.split("::") == [str(shards["base"] / "coco" / f"c-{i:06d}.tar") for i in range(2)]
    (tmp_path / "loose").mkdir()
    with pytest.raises(FileNotFoundError, match=f"data.train_shards={tmp_path / 'loose'} is a directory without sizes.json"):
        validate_inputs(build_config("", {"engine.deepspeed": False, "data.train_shards": str(tmp_path / "loose")}))


@pytest.mark.timeout(120)
def test_a_missing_bucket_is_named_as_such(s3_server):
    with pytest.raises(FileNotFoundError, match="data.train_shards=s3://no-such-bucket/coco/c-0.tar: bucket "
                                                "'no-such-bucket' does not exist"):
        validate_inputs(build_config("", {"engine.deepspeed": False, "data.train_shards": "s3://no-such-bucket/coco/c-0.tar"}))
