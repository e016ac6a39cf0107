"""The run-directory layout (one owner of every output path) and finding the run an adapter sits
in (whose record it must agree with: tests/test_adapter_record.py)."""

import pytest

from aurora_ds.engine.rundir import RunDir


def test_layout_is_the_documented_one(tmp_path):
    run = RunDir(tmp_path)
    assert run.adapter_latest == tmp_path / "adapter_latest"
    assert run.adapter_best == tmp_path / "adapter_best"
    assert run.checkpoints == tmp_path / "checkpoints"
    assert run.checkpoint(100) == tmp_path / "checkpoints" / "step_000100"
    assert run.tensorboard == tmp_path / "tb"
    assert run.eval_metrics(2) == tmp_path / "eval" / "step_000002.json"
    assert run.eval_results(2) == tmp_path / "eval" / "results_step_000002.json"
    assert run.eval_metrics(2, "test") == tmp_path / "eval" / "test_step_000002.json"
    assert run.eval_results(2, "test") == tmp_path / "eval" / "test_results_step_000002.json"
    with pytest.raises(ValueError, match="evaluation split must be one of"):
        run.eval_metrics(2, "dev")
    assert run.tokenizer == tmp_path / "tokenizer"
    assert run.answer_list == tmp_path / "answer_list.json"
    assert run.summary == tmp_path / "summary.json"
    assert run.log == tmp_path / "train.log"
    assert run.latest_eval_metrics() is None
    run.eval.mkdir()
    for step in (2, 10):
        run.eval_metrics(step).write_text("{}")
    run.eval_metrics(12, "test").write_text("{}")
    assert run.latest_eval_metrics() == run.eval_metrics(10)  # validation's, never the test file


def test_of_adapter_finds_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert RunDir.of_adapter(run.adapter_latest).root == run.root.resolve()
    assert RunDir.of_adapter(run.adapter_best).root == run.root.resolve()
    assert RunDir.of_adapter(run.checkpoint(4) / "adapter").root == run.root.resolve()
    assert RunDir.of_adapter(tmp_path / "shared" / "my_adapter") is None
