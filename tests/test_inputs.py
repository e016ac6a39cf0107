"""Every input a run names is checked before anything is built, each error naming the key and
the path (engine/inputs.py); the S3 side is in test_data_s3.py, the whole run in test_engine.py."""

import io
import json
import tarfile

import pytest

from aurora_ds.engine.config import build_config
from aurora_ds.engine.inputs import validate_eval_shards, validate_inputs


def _tar(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("s0.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return path


def _cfg(**values):
    return build_config("", {"engine.deepspeed": False, **values})


def test_every_shard_of_each_spec_must_be_a_non_empty_tar(tmp_path):
    for i in range(2):
        _tar(tmp_path / "train" / f"t-{i}.tar")
    _tar(tmp_path / "val" / "v-0.tar")
    train, val = str(tmp_path / "train" / "t-{0..1}.tar"), str(tmp_path / "val" / "v-0.tar")
    validate_inputs(_cfg(**{"data.train_shards": train, "data.eval_shards": val, "data.test_shards": val}))
    missing = tmp_path / "test" / "x-1.tar"
    _tar(tmp_path / "test" / "x-0.tar")
    with pytest.raises(FileNotFoundError, match=f"data.test_shards: shard {missing} does not exist"):
        validate_inputs(_cfg(**{"data.train_shards": train, "data.test_shards": str(tmp_path / "test" / "x-{0..1}.tar")}))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=f"data.eval_shards: shard {tmp_path / 'empty.tar'} is empty"):
        validate_inputs(_cfg(**{"data.train_shards": train, "data.eval_shards": str(tmp_path / "empty.tar")}))
    (tmp_path / "text.tar").write_text("not a tar " * 100)
    with pytest.raises(ValueError, match=f"data.train_shards: shard {tmp_path / 'text.tar'} is not a tar file"):
        validate_inputs(_cfg(**{"data.train_shards": f"{train}::{tmp_path / 'text.tar'}"}))


def test_checkpoint_tokenizer_answer_list_and_ds_config_name_their_key(tmp_path):
    shards = str(_tar(tmp_path / "s-0.tar"))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match=f"backbone.checkpoint={tmp_path / 'ckpt'}: no config.json there"):
        validate_inputs(_cfg(**{"data.train_shards": shards, "backbone.checkpoint": str(tmp_path / "ckpt")}))
    with pytest.raises(FileNotFoundError, match=f"backbone.tokenizer={tmp_path / 'tok'}: tokenizer directory does not exist"):
        validate_inputs(_cfg(**{"data.train_shards": shards, "backbone.tokenizer": str(tmp_path / "tok")}))
    (tmp_path / "answers.json").write_text('{"yes": "many"}')  # neither a list nor answers.json's counts
    with pytest.raises(ValueError, match=f"eval.answer_list={tmp_path / 'answers.json'}: expected a non-empty JSON list"):
        validate_inputs(_cfg(**{"data.train_shards": shards, "eval.answer_list": str(tmp_path / "answers.json")}))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimisation": {"stage": 3}}))
    with pytest.raises(ValueError, match=f"engine.ds_config: {tmp_path / 'ds.json'}: unknown DeepSpeed config key 'zero_optimisation'"):
        validate_inputs(build_config("", {"data.train_shards": shards, "engine.ds_config": str(tmp_path / "ds.json")}))
    with pytest.raises(FileNotFoundError, match="engine.ds_config: unknown DeepSpeed config 'zero9'"):
        validate_inputs(build_config("", {"data.train_shards": shards, "engine.ds_config": "zero9"}))


def test_aurora_eval_checks_its_shards_naming_the_flag(tmp_path):
    validate_eval_shards(str(_tar(tmp_path / "e-0.tar")))
    with pytest.raises(FileNotFoundError, match=f"--shards: shard {tmp_path / 'e-1.tar'} does not exist"):
        validate_eval_shards(str(tmp_path / "e-{0..1}.tar"))
