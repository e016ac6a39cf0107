"""The training step as the GPU wants it: no host reads inside it, and (engine.compile) captured
whole, one graph per mode, the same losses as eager."""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aurora_ds.engine.backend import PlainBackend, compile_step
from aurora_ds.engine.config import build_config
from aurora_ds.engine.loop import train
from aurora_ds.engine.setup import check_backbone

# Ops whose result the host must wait for (a value read back, or a shape that depends on values).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique_consecutive",
              "_unique2", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Records every host read while ``on`` (the loop's forward and backward of a micro-batch):
    the ops above, and copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``), which on
    a CPU dispatch nothing and are caught at the method."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.on, self.seen = False, []
        for name in ("cpu", "tolist", "numpy"):
            method = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._watch(name, method))

    def _watch(self, name, method):
        def watched(tensor, *args, **kwargs):
            self._record(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return watched

    def _record(self, what: str):
        if self.on:
            where = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-9:-3]
                     if "torch/" not in f.filename]
            self.seen.append(what + (f" at {where[-1]}" if where else ""))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in HOST_READS:
            self._record(str(func))
        return func(*args, **(kwargs or {}))


def _config(tmp_path, compile_mode: str, steps: int = 3):
    return build_config("", {"data.source": "synthetic", "backbone.name": "blip-tiny-retrieval", "engine.deepspeed": False,
                             "engine.compile": compile_mode, "optim.max_steps": steps, "optim.batch_size": 4,
                             "objective.queue_size": 16, "aurora.rank": 4, "output.dir": str(tmp_path / compile_mode),
                             "output.progress": False})


@pytest.mark.timeout(300)
def test_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """From the start of a micro-batch to the end of its backward nothing of ours waits for a
    value (negatives are drawn on the device, ICE's first-batch switch too); the loss terms are
    read after the step. The one read left in eager is transformers' own check whether an
    attention mask pads anything (``padding_mask.all()``, skipped while tracing); under
    engine.compile the step is one graph (full-graph mode refuses any host read)."""
    mode = HostReads(monkeypatch)
    begin, step = PlainBackend.begin_step, PlainBackend.step

    def begin_step(self):
        begin(self)
        mode.on = True

    def step_(self):
        mode.on = False
        step(self)

    monkeypatch.setattr(PlainBackend, "begin_step", begin_step)
    monkeypatch.setattr(PlainBackend, "step", step_)
    with mode:
        train(_config(tmp_path, "off", steps=2))
    ours = [s for s in mode.seen if "_ignore_bidirectional_mask_sdpa" not in s]
    assert mode.seen and not ours, ours


def test_host_reads_are_caught(monkeypatch):
    """The check above sees what it looks for."""
    mode = HostReads(monkeypatch)
    with mode:
        mode.on = True
        x = torch.ones(3)
        float(x.sum())
        torch.multinomial(x, 1).item()
        x.cpu()
    assert [s.split(" at ")[0] for s in mode.seen] == ["aten._local_scalar_dense.default"] * 2 + ["Tensor.cpu"]


def test_compile_is_refused_where_the_step_is_not_captured():
    with pytest.raises(ValueError, match="engine.compile=on captures the single-process step"):
        build_config("", {"data.source": "synthetic", "engine.compile": "on"})
    with pytest.raises(ValueError, match="engine.compile must be one of"):
        build_config("", {"data.source": "synthetic", "engine.compile": "yes"})
    for name, task in (("blip-tiny-vqa", "qa"), ("blip2-tiny-retrieval", "retrieval")):
        cfg = build_config("", {"data.source": "synthetic", "engine.deepspeed": False, "engine.compile": "on",
                                "backbone.name": name, "objective.task": task})
        with pytest.raises(ValueError, match=f"engine.compile=on captures the step of .*{name}"):
            check_backbone(cfg)
        cfg.engine.compile = "auto"
        assert not compile_step(cfg, torch.device("cuda"))  # auto leaves them eager, on a GPU too
        check_backbone(cfg)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_step_is_one_graph_per_mode_and_matches_eager(tmp_path):
    """engine.compile=on: the momentum and training forwards (with their backward) are two graphs
    for the whole run, no graph break, no recompile after the first step (the step number goes
    in as a tensor), and the losses are eager's."""
    from torch._dynamo.utils import counters

    eager = train(_config(tmp_path, "off", steps=4))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(_config(tmp_path, "on", steps=4))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], (
        dict(counters["stats"]), dict(counters["graph_break"]))
    first = [h["loss"] for h in eager["history"]], [h["loss"] for h in compiled["history"]]
    assert first[0][0] == pytest.approx(first[1][0], rel=1e-5)
    # later steps: AdamW turns float reordering in ~1e-20 gradients of the zero-initialised V into small steps
    assert first[1] == pytest.approx(first[0], rel=1e-3)
