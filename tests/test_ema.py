"""The momentum encoder's EMA: its values, the exact swap, and what a step of it launches."""

import pytest
import torch

from aurora_ds import AuroraConfig, build_backbone, inject_aurora
from aurora_ds.bench.kernels import count_kernels
from aurora_ds.engine.backend import PlainBackend
from aurora_ds.engine.config import build_config
from aurora_ds.engine.ema import EMA


def _ema(momentum=0.9):
    cfg = build_config("", {"data.source": "synthetic", "aurora.rank": 4})
    torch.manual_seed(0)
    model = build_backbone("blip-tiny-retrieval")
    handle = inject_aurora(model, AuroraConfig(rank=4, backbone="blip-tiny-retrieval"))
    backend = PlainBackend(model, cfg, 3)
    return EMA(backend, handle.named_trainable_parameters(), momentum)


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))


def test_update_is_the_moving_average_and_the_swap_restores_exactly():
    ema = _ema(momentum=0.9)
    start = [v.clone() for v in ema.values]
    _perturb(ema.params)  # the values are the EMA's own copies: changing the parameters leaves them
    assert all(torch.equal(v, s) for v, s in zip(ema.values, start))
    online = [p.detach().clone() for p in ema.params]
    ema.update()
    for v, s, o in zip(ema.values, start, online):
        torch.testing.assert_close(v, 0.9 * s + 0.1 * o, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p, o) for p, o in zip(ema.params, online))  # the update reads them only
    with ema.swapped():
        assert all(torch.equal(p, v) for p, v in zip(ema.params, ema.values))
    assert all(torch.equal(p, o) for p, o in zip(ema.params, online))


def test_a_step_of_the_ema_launches_a_few_kernels_whatever_the_tensor_count():
    """Update and swap in and out, every step of momentum distillation: a handful of foreach
    ops, not several per tensor (a GPU launches each, and an adapter has ~200 tensors)."""
    ema = _ema()
    assert len(ema.params) > 20

    def step():
        ema.update()
        with ema.swapped():
            pass

    ops = count_kernels(step)
    assert sum(ops.values()) <= 5, ops  # one lerp; two copies each way (was 7 per tensor)


def _zero2_masters(rank, size):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from aurora_ds import dist
    from aurora_ds.engine.backend import _whole_masters

    dist.set_compute_device("cpu")
    torch.manual_seed(0)
    # odd sizes: ZeRO-2's flat partition splits some tensors between the ranks, others not
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(3, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config={"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                                              "zero_optimization": {"stage": 2},
                                              "zero_allow_untested_optimizer": True})
    engine.backward(engine(torch.randn(1, 7, dtype=torch.bfloat16)).float().sum())
    engine.step()  # fp32 masters now differ from their bf16 copies in the model
    params = list(engine.module.parameters())
    whole = _whole_masters(params)
    for p, w in zip(params, whole):
        want = safe_get_full_fp32_param(p)
        assert w.dtype == torch.float32 and torch.equal(w, want), (tuple(p.shape), w, want)
    assert any(not torch.equal(w, p.float()) for p, w in zip(params, whole))  # not the bf16 copies


@pytest.mark.timeout(180)
def test_zero2_whole_masters_in_one_sum_equal_deepspeeds_per_tensor_reads(on_two_ranks):
    """What the EMA reads every step under the replicated layout (ZeRO-2): every tensor's fp32
    master made whole by one collective equals DeepSpeed's own read of each tensor."""
    on_two_ranks(_zero2_masters)
