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
    return cfg, model, objective, backend, handle


def test_frame_aware_keys_scale_non_cls_tokens_of_each_frame():
    cfg, model, objective, _, _ = _objective(frame_aware_attention=True)
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
        cfg, model, objective, backend, _ = _objective(frame_aware_attention=frame_aware)
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


class _WordIds:
    """Word ids padded to ``max_length``, with the keywords the evaluation passes."""

    def __call__(self, texts, max_length=35, **_):
        ids = [[101] + [sum(map(ord, w)) % 900 + 110 for w in t.split()][: max_length - 1] for t in texts]
        return {"input_ids": torch.tensor([x + [0] * (max_length - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (max_length - len(x)) for x in ids])}


def _media(ids, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(len(ids), 3, 32, 32, generator=g), "media_id": list(ids),
            "captions": [[f"a photo of thing {m} number {i}" for i in range(2)] for m in ids]}


def _scores(objective, cfg, batches):
    from aurora_ds.tasks.retrieval_eval import retrieval_scores

    s = retrieval_scores(objective, batches, cfg, _WordIds(), 32)
    return {(m, t): (s.i2t[i, j], s.t2i[j, i]) for i, m in enumerate(s.media_ids) for j, t in enumerate(s.texts)}


def test_a_pairs_evaluation_score_ignores_the_other_captions_of_the_set():
    """ICE evaluates with its running context: adding unrelated media and captions to the
    evaluation set leaves the scores of the pairs already there as they were."""
    cfg, model, objective, _, _ = _objective()
    cfg.data.media, cfg.eval.k_test = "image", 64
    objective.eval()
    with torch.no_grad():  # ICE open and a context far from zero: it moves every score
        model.aurora_context.gate.fill_(1.0)
        model.aurora_context.running_context.copy_(torch.randn(32) * 5)
    small = [_media(["m0", "m1"], 0)]
    large = [_media(["m0", "m1"], 0), _media(["x0", "x1", "x2"], 1)]
    alone, among = _scores(objective, cfg, small), _scores(objective, cfg, large)
    assert len(among) == 5 * 10 and all(pair in among for pair in alone)
    for pair, (i2t, t2i) in alone.items():
        assert abs(among[pair][0] - i2t) < 1e-6 and abs(among[pair][1] - t2i) < 1e-6, pair
    with torch.no_grad():
        model.aurora_context.gate.zero_()
    closed = _scores(objective, cfg, small)
    assert max(abs(closed[p][0] - alone[p][0]) for p in alone) > 1e-3  # the test sees ICE's context


def test_training_keeps_ices_running_context_and_the_adapter_carries_it(tmp_path):
    from aurora_ds.aurora import load_adapter
    from aurora_ds.backbones.blip import encode_text

    cfg, model, objective, backend, handle = _objective()
    cfg.data.media = "image"
    objective.eval()  # no dropout: the text [CLS] below is the one the step sees
    data = SyntheticBatches(cfg, 32, 1024, 0, 1)
    ice, want = model.aurora_context, None
    for step in range(2):
        batch = next(data)
        with torch.no_grad():
            mean = encode_text(model, batch["input_ids"], batch["attention_mask"])[:, 0].mean(0)
        want = mean if want is None else 0.9 * want + 0.1 * mean  # the first batch starts the average
        losses = objective.losses(backend.forward, batch, step)
        backend.backward(losses["loss"])
        backend.step()
    assert int(ice.batches_tracked) == 2 and torch.allclose(ice.running_context, want, atol=1e-6)
    handle.save(tmp_path / "adapter")
    loaded = load_adapter(build_backbone("blip-tiny-retrieval"), tmp_path / "adapter")
    assert torch.equal(loaded.context.running_context, ice.running_context)
    assert int(loaded.context.batches_tracked) == 2


def test_ices_running_context_stays_fp32_when_the_model_is_cast():
    """DeepSpeed casts the model to bf16; the running context (an average of small steps) is not
    cast, and a bf16 step is still folded in at fp32 precision."""
    from aurora_ds.aurora.extras import ContextEnhancement

    ice = ContextEnhancement(8).bfloat16()
    assert ice.gate.dtype == torch.bfloat16 and ice.running_context.dtype == torch.float32
    ice.track(torch.full((8,), 1.0, dtype=torch.bfloat16))
    ice.track(torch.full((8,), 1.001, dtype=torch.bfloat16))  # bf16 rounds 1.001 to 1.0: the cast stays exact
    ice.track(torch.full((8,), 1.001))
    assert torch.allclose(ice.running_context, torch.full((8,), 1.0001), rtol=0, atol=1e-7)
    fused = ice(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert fused.dtype == torch.bfloat16
