"""Device discipline, checked on CPU so that a mistake fails here and not on a user's GPUs.

NCCL serves CUDA tensors only, and a module's plain tensor attributes do not move with
``.to()``. So: (1) nothing but aurora_ds/dist.py touches torch.distributed collectives;
(2) dist.py's helpers put what they send on the communication device and give results back on
the caller's device, and in strict mode refuse a tensor from another device; (3) every tensor an
objective owns moves with the objective; (4) the engine places every buffer and, strict, refuses
one left behind.
"""

import ast
from pathlib import Path

import pytest
import torch

from aurora_ds import AuroraConfig, build_backbone, inject_aurora
from aurora_ds import dist
from aurora_ds.engine.backend import place_buffers
from aurora_ds.engine.config import build_config
from aurora_ds.engine.loop import make_objective

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "all_to_all", "send", "recv", "isend", "irecv", "monitored_barrier",
               "destroy_process_group", "new_group"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_only_dist_calls_collectives():
    offenders = []
    for path in sorted([*(ROOT / "aurora_ds").rglob("*.py"), *(ROOT / "shard_tools").rglob("*.py")]):
        if path == ROOT / "aurora_ds" / "dist.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from torch import distributed")
            elif isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import torch.distributed")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    name.startswith("deepspeed.comm") for name in [getattr(node, "module", None) or "", *(a.name for a in node.names)]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} deepspeed.comm (DeepSpeed's collectives)")
            elif isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _dotted(node).startswith("torch.distributed."):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {_dotted(node)}")
    assert not offenders, "collectives outside aurora_ds/dist.py:\n" + "\n".join(offenders)


def _tensors(obj, seen, path="objective"):
    """Every tensor reachable from a module's attributes (not only its registered state)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        for key, value in vars(obj).items():
            if key in ("_parameters", "_buffers", "_modules"):
                for name, item in value.items():
                    yield from _tensors(item, seen, f"{path}.{name}")
            elif not key.startswith("_") or key == "_candidates":
                yield from _tensors(value, seen, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, seen, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _tensors(item, seen, f"{path}[{key!r}]")


OBJECTIVES = [("blip-tiny-retrieval", "retrieval"), ("blip-tiny-vqa", "qa"),
              ("blip2-tiny-retrieval", "retrieval"), ("blip2-opt-tiny-vqa", "qa")]


@pytest.mark.parametrize("backbone,task", OBJECTIVES)
def test_every_objective_tensor_moves_with_the_objective(backbone, task):
    torch.manual_seed(0)
    model = build_backbone(backbone)
    inject_aurora(model, AuroraConfig(rank=4, backbone=backbone))
    cfg = build_config("", {"objective.task": task, "backbone.name": backbone, "data.source": "synthetic",
                            "objective.queue_size": 16})
    objective = make_objective(cfg, model)
    before = dict(_tensors(objective, set()))
    assert before, "no tensors found: the walk is broken"
    objective.to("meta")
    left = [name for name, t in _tensors(objective, set()) if t.device.type != "meta"]
    assert not left, f"tensors that do not move with .to(): {left}"


def test_feature_queue_is_fp32_whatever_the_module_dtype():
    from aurora_ds.tasks.retrieval import FeatureQueue

    queue = FeatureQueue(8, 4, seed=0).to(torch.bfloat16)
    assert queue.image.dtype == queue.text.dtype == torch.float32 and queue.idx.dtype == torch.long
    queue.push(torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(3, 4), torch.tensor([1, 2, 3]))
    assert int(queue.ptr) == 3 and queue.idx[:3].tolist() == [1, 2, 3]
    assert set(queue.state_dict()) == set()  # the engine checkpoints the queue itself


def test_place_buffers_moves_buffers_and_strict_mode_refuses_stragglers(monkeypatch):
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    monkeypatch.setenv("AURORA_STRICT_DEVICES", "0")
    place_buffers(module, "meta")
    assert all(b.device.type == "meta" for b in module.buffers())
    monkeypatch.setenv("AURORA_STRICT_DEVICES", "1")
    with pytest.raises(RuntimeError, match="0.weight is on cpu"):
        place_buffers(module, "meta")  # its parameters are still on the CPU


def _dist_helpers(rank, size):
    dist.set_compute_device("cpu")
    assert dist.comm_device() == torch.device("cpu") and dist.world() == (rank, size)
    x = torch.full((rank + 1, 2), float(rank))  # unequal rows per rank
    assert dist.batch_sizes(len(x)) == [1, 2] and dist.row_offset(len(x)) == rank
    assert dist.gather(x).tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    y = x.clone().requires_grad_(True)
    (dist.gather_with_grad(y) * torch.arange(3.0).view(3, 1)).sum().backward()
    assert y.grad.tolist() == ([[0.0, 0.0]] if rank == 0 else [[2.0, 2.0], [4.0, 4.0]])  # summed over 2 ranks
    assert dist.sum_over_ranks(torch.ones(2)).tolist() == [2.0, 2.0]
    assert dist.all_gather_flat(torch.full((2,), float(rank))).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert dist.min_over_ranks(5 + rank) == 5 and dist.any_rank(rank == 1) and not dist.any_rank(False)
    assert dist.mean_over_ranks(torch.tensor(float(rank))) == 0.5
    assert dist.gather_objects({"r": rank}) == [{"r": 0}, {"r": 1}]
    assert [real for _, real in dist.lockstep(range(rank + 1), {})] == ([True, False] if rank == 0 else [True, True])
    try:
        dist.sum_over_ranks(torch.ones(2, device="meta"))
        raise AssertionError("strict mode let a tensor from another device through")
    except RuntimeError as e:
        assert "AURORA_STRICT_DEVICES" in str(e)


@pytest.mark.timeout(120)
def test_dist_helpers_on_two_ranks_in_strict_mode(on_two_ranks):
    on_two_ranks(_dist_helpers)
