"""The retrieval objective in one process: video batches and frame-aware attention."""

import torch

from aurora_ds import AuroraConfig, build_backbone, inject_aurora
from aurora_ds.engine.backend import PlainBackend
from aurora_ds.engine.config import build_config
from aurora_ds.engine.ema import EMA
from aurora_ds.engine.synthetic import SyntheticBatches
from aurora_ds.tasks.retrieval import RetrievalObjective


def _objective(**overrides):
    cfg = build_config("", {"data.source": "synthetic", "data.media": "video", "data.num_frames": 3, "optim.batch_size": 3,
                            "objective.queue_size": 12, "aurora.rank": 4, "aurora.dropout": 0.0,
                            **{f"objective.{key}": value for key, value in overrides.items()}})
    torch.manual_seed(0)
    model = build_backbone("blip-tiny-retrieval")
    handle = inject_aurora(model, AuroraConfig(rank=4, backbone="blip-tiny-retrieval"))
    objective = RetrievalObjective(model, cfg)
    backend = PlainBackend(objective, cfg, 3)
    objective.ema = EMA(backend, handle.named_trainable_parameters(), cfg.objective.momentum)
    return cfg, model, objective, backend


def test_frame_aware_keys_scale_non_cls_tokens_of_each_frame():
    cfg, model, objective, _ = _objective(frame_aware_attention=True)
    key = model.text_encoder.encoder.layer[0].crossattention.self.key
    tokens = torch.randn(2, 3 * 17, 32)  # 2 videos x 3 frames x (1 [CLS] + 16 patches)
    plain = key(tokens)
    objective.frame_weights = torch.tensor([[0.5, 1.0, 1.5], [3.0, 0.0, 0.0]])
    weighted = key(tokens)
    objective.frame_weights = None
    want = plain.unflatten(1, (3, 17)).clone()
    want[:, :, 1:] *= torch.tensor([[0.5, 1.0, 1.5], [3.0, 0.0, 0.0]])[:, :, None, None]
    assert torch.allclose(weighted, want.flatten(1, 2), atol=1e-6)
    assert torch.equal(key(tokens), plain)  # off outside a frame-aware matching forward


def test_video_objective_trains_with_and_without_frame_aware_attention():
    for frame_aware in (False, True):
        cfg, model, objective, backend = _objective(frame_aware_attention=frame_aware)
        data = SyntheticBatches(cfg, 32, 1024, 0, 1)
        scores = []
        for step in range(3):
            losses = objective.losses(backend.forward, next(data), step)
            backend.backward(losses["loss"])
            backend.step()
            scores.append(objective._frame_scores(model, torch.randn(2, 3 * 17, 32),
                                                  torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)))
            assert torch.isfinite(losses["itc"]) and torch.isfinite(losses["itm"])
        assert objective.frame_weights is None
        assert torch.allclose(scores[-1].sum(1), torch.full((2,), 3.0))  # softmax over frames x T
