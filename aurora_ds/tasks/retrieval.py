"""Image-text and video-text retrieval on a BLIP-style backbone: training objective.

The objective is BLIP's: image-text contrastive loss (ITC) against momentum features and a
feature queue, softened by momentum distillation, plus image-text matching (ITM) with hard
negatives mined from the whole global batch. Informative Context Enhancement enters the
matching [CLS]: in training the batch's mean text [CLS], in evaluation the running mean of
those (:func:`track_context`). Randomness that depends on the global batch (negative sampling) is a pure function of
(seed, step, row, column) over the global batch, so 1 rank and N ranks draw the same.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..aurora import context_module
from ..backbones.blip import encode_media, encode_text, match_logits, special_tokens
from ..dist import gather, gather_with_grad, row_offset, world
from .base import Objective


def _same(x):
    return x


def media_index(batch: dict) -> torch.Tensor:
    """A stable integer per media id of the batch (the same on every rank), to mark positive
    pairs: ``batch["media_idx"]`` where the objective made it before the step (a compiled step
    cannot hash strings), else hashed from ``batch["media_id"]``."""
    if "media_idx" in batch:
        return batch["media_idx"]
    return torch.tensor([int.from_bytes(hashlib.blake2b(m.encode(), digest_size=7).digest(), "big")
                         for m in batch["media_id"]])


def similarity(media_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Media x text cosine similarities. BLIP-2 media features are one per query, (M, Q, D):
    a pair scores its best query."""
    if media_feat.dim() == 3:
        return torch.einsum("mqd,td->mtq", media_feat, text_feat).max(-1).values
    return media_feat @ text_feat.t()


_MASK32 = 0xFFFFFFFF


def _times(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32, in 16-bit halves: no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def with_media_index(batch: dict) -> dict:
    """The batch with its media indices made before the step (``media_idx``)."""
    return batch if "media_idx" in batch else {**batch, "media_idx": media_index(batch)}


def uniform_noise(seed: int, step, stream: int, rows: int, cols: int, device) -> torch.Tensor:
    """(rows, cols) uniform noise in (0, 1) that is a hash of (seed, step, stream, row, column):
    the same on every rank, drawn on the device in a few elementwise ops with no generator
    state and no host read, so a step that samples can be captured as one graph. ``step`` may
    be an int or a 0-d integer tensor (a compiled step then needs no recompile per step)."""
    i = torch.arange(rows, device=device).view(-1, 1)
    j = torch.arange(cols, device=device).view(1, -1)
    key = ((seed * 0x27D4EB2F + stream * 0x165667B1) & _MASK32) + (step % 0x7FFFFFFF) * 0x61C88647
    x = (_times(i, 0x9E3779B1) ^ _times(j, 0x85EBCA77)) + key
    x = x & _MASK32
    for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # a 32-bit integer mixer
        x = _times(x ^ (x >> shift), c)
    x = x ^ (x >> 16)
    return ((x >> 8).float() + 0.5) / 2**24  # 24 random bits: exact in float32, never 0 or 1


def draw(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One column per row with probability proportional to ``weights`` (the Gumbel-max trick:
    exactly a multinomial draw of one sample)."""
    return torch.argmax(weights.float().log() - (-noise.log()).log(), dim=1)


class MatchingPairs(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media_tokens: torch.Tensor
    text_feat: torch.Tensor  # each pair's contrastive text feature (frame-aware attention)
    context: torch.Tensor  # the text [CLS] features ICE averages: the whole pool's
    pooled: bool  # context already holds every rank's rows (gathered for the negatives)


def matching_inputs(cfg, batch, media_tokens, image_feat, text_feat, text_cls, step) -> MatchingPairs:
    """The ITM pairs of a micro-batch: every positive, each media with a hard negative text and
    each text with a hard negative media, negatives drawn over the global batch.

    Negatives are drawn by similarity (positives excluded) with noise hashed from (seed, step)
    over the global batch (:func:`uniform_noise`), so any number of ranks draws the same pairs.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    idx = media_index(batch).to(ids.device)
    size = world()[1] if cfg.objective.negatives_all_ranks else 1
    pool = gather if size > 1 else _same
    pool_grad = gather_with_grad if size > 1 else _same
    b = ids.shape[0]
    start = row_offset(b) if size > 1 else 0
    with torch.no_grad():
        idx_all = pool(idx.view(-1, 1))
        same = torch.eq(idx_all, idx_all.t())
        sim = similarity(pool(image_feat), pool(text_feat)) / cfg.objective.temp
        weights_i2t = F.softmax(sim, 1).masked_fill(same, 0) + 1e-12 * ~same
        weights_t2i = F.softmax(sim.t(), 1).masked_fill(same, 0) + 1e-12 * ~same
        n = sim.shape[0]
        neg_media = draw(weights_t2i, uniform_noise(cfg.engine.seed, step, 0, n, n, sim.device))[start:start + b]
        neg_text = draw(weights_i2t, uniform_noise(cfg.engine.seed, step, 1, n, n, sim.device))[start:start + b]
    own = torch.arange(start, start + b, device=ids.device)
    rows = torch.cat([own, own, neg_text])
    media = torch.cat([media_tokens, pool_grad(media_tokens)[neg_media], media_tokens])
    return MatchingPairs(pool(ids)[rows], pool(mask)[rows], media, pool(text_feat)[rows], pool_grad(text_cls),
                         size > 1)


def track_context(model, pairs: MatchingPairs):
    """Fold this training batch's mean text [CLS] (over every rank: all ranks keep the same
    value) into ICE's running context, the one evaluation uses; gathered only if the matching
    pairs did not gather it already."""
    context = context_module(model)
    if context is not None:
        rows = pairs.context.detach().float()
        context.track((rows if pairs.pooled else gather(rows)).mean(0))


def matching_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ITM logits laid out as :func:`matching_inputs` builds the pairs."""
    b = logits.shape[0] // 3
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device), torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
    return F.cross_entropy(logits.float(), labels)


class FeatureQueue(nn.Module):
    """BLIP's queue of past momentum features and their media indices.

    Buffers, so that moving the objective moves them (a plain tensor attribute stays on the
    CPU while the model goes to the GPU). Non-persistent: the engine checkpoints them itself.
    The features stay fp32 whatever dtype the module is cast to (bf16/fp16 engines cast every
    floating buffer), since similarities against the queue are computed in fp32.
    """

    def __init__(self, size: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image", F.normalize(torch.randn(size, dim, generator=g), dim=1), persistent=False)
        self.register_buffer("text", F.normalize(torch.randn(size, dim, generator=g), dim=1), persistent=False)
        self.register_buffer("idx", torch.full((size,), -100, dtype=torch.long), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.image, self.text = self.image.float(), self.text.float()
        return self

    @torch.no_grad()
    def push(self, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor):
        n, size = images.shape[0], self.idx.shape[0]
        slots = (torch.arange(n, device=self.idx.device) + self.ptr) % size
        self.image[slots] = images.to(self.image)
        self.text[slots] = texts.to(self.text)
        self.idx[slots] = ids.view(-1).to(self.idx)
        self.ptr.copy_((self.ptr + n) % size)

    def state(self) -> dict:
        return {"image_queue": self.image, "text_queue": self.text, "idx_queue": self.idx, "queue_ptr": self.ptr}

    def load_state(self, state: dict):
        for key, buf in (("image_queue", self.image), ("text_queue", self.text), ("idx_queue", self.idx)):
            buf.copy_(state[key])
        self.ptr.fill_(int(state["queue_ptr"]))


class RetrievalObjective(Objective):
    """ITC (momentum distillation + queue) + ITM (hard negatives) around a BLIP backbone; its
    state is the feature queue, and each micro-batch first runs the momentum (EMA) forward."""

    def __init__(self, backbone, cfg, tokenizer=None, special=None):
        super().__init__(backbone, cfg, tokenizer, special)
        # BLIP's [ENC] for every matching pass (train and eval): the run's, checked against its
        # tokenizer (engine/setup.py), else read from the backbone's config.
        self.special = special or special_tokens(backbone.config, None, cfg.backbone.blip_special_tokens)
        self.queue = FeatureQueue(cfg.objective.queue_size, backbone.config.image_text_hidden_size, cfg.engine.seed)
        self.frame_weights = None  # (pairs, frames) while a frame-aware matching forward runs
        if cfg.objective.frame_aware_attention and cfg.data.media == "video":
            for layer in backbone.text_encoder.encoder.layer:
                layer.crossattention.self.key.register_forward_hook(self._weigh_frame_keys)

    def objective_state(self) -> dict:
        return self.queue.state()

    def load_objective_state(self, state: dict):
        self.queue.load_state(state)

    def losses(self, forward, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """One micro-batch: momentum features with the EMA swapped in, then the online losses.

        The swap writes into the parameters in place, so it must come before the online
        forward whose backward reads them.
        """
        batch = with_media_index(batch)
        self.ema.update()
        with torch.no_grad(), self.ema.swapped():
            image_feat_m, text_feat_m = forward(batch, step, "momentum")
        losses = forward(batch, step, "train", (image_feat_m, text_feat_m))
        self._enqueue(image_feat_m, text_feat_m, media_index(batch))
        return losses

    def forward(self, batch: dict, step: int, mode: str, momentum=None):
        """Modes: ``train`` (losses), ``momentum`` (features under the swapped-in EMA), and for
        evaluation ``embed_media``, ``embed_text`` and ``match`` (ITM scores)."""
        model, cfg = self.backbone, self.cfg
        if mode == "embed_media":
            tokens, cls = encode_media(model, batch["pixel_values"])
            return F.normalize(model.vision_proj(cls), dim=-1), tokens
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mode == "embed_text":
            cls = encode_text(model, ids, mask)[:, 0]
            return F.normalize(model.text_proj(cls), dim=-1), cls
        if mode == "match":  # ICE takes its running context: a pair's score is its own
            logits = match_logits(model, ids, mask, batch["media_tokens"], None, self.special.enc)
            return logits.float().softmax(-1)[:, 1]
        if mode == "momentum":
            _, media_cls = encode_media(model, batch["pixel_values"])
            image_feat = F.normalize(model.vision_proj(media_cls).float(), dim=-1)
            text_feat = F.normalize(model.text_proj(encode_text(model, ids, mask)[:, 0]).float(), dim=-1)
            return image_feat, text_feat

        image_feat_m, text_feat_m = momentum
        idx = media_index(batch).to(ids.device).view(-1, 1)
        media_tokens, media_cls = encode_media(model, batch["pixel_values"])
        text_cls = encode_text(model, ids, mask)[:, 0]
        # Similarities and losses in fp32 whatever the backbone's precision (the queue is fp32).
        image_feat = F.normalize(model.vision_proj(media_cls).float(), dim=-1)
        text_feat = F.normalize(model.text_proj(text_cls).float(), dim=-1)

        idx_all = torch.cat([gather(idx).t(), self.queue.idx.view(1, -1)], dim=1)
        pos = torch.eq(idx, idx_all).float()
        sim_targets = pos / pos.sum(1, keepdim=True)
        image_feat_m_all = torch.cat([gather(image_feat_m), self.queue.image])
        text_feat_m_all = torch.cat([gather(text_feat_m), self.queue.text])
        if cfg.objective.distill:
            i2t_targets = cfg.objective.alpha * F.softmax(image_feat_m @ text_feat_m_all.t() / cfg.objective.temp, 1) + (1 - cfg.objective.alpha) * sim_targets
            t2i_targets = cfg.objective.alpha * F.softmax(text_feat_m @ image_feat_m_all.t() / cfg.objective.temp, 1) + (1 - cfg.objective.alpha) * sim_targets
        else:
            i2t_targets = t2i_targets = sim_targets
        sim_i2t = image_feat @ text_feat_m_all.t() / cfg.objective.temp
        sim_t2i = text_feat @ image_feat_m_all.t() / cfg.objective.temp
        loss_i2t = -(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
        losses = {"itc": (loss_i2t + loss_t2i) / 2}
        if cfg.objective.itm:
            losses["itm"] = self._matching(model, batch, media_tokens, image_feat, text_feat, text_cls, step)
        losses["loss"] = sum(losses.values())
        return losses

    def _matching(self, model, batch, media_tokens, image_feat, text_feat, text_cls, step):
        """ITM on positives, one hard negative text per media and one hard negative media per text."""
        pairs = matching_inputs(self.cfg, batch, media_tokens, image_feat, text_feat, text_cls, step)
        track_context(model, pairs)
        if self.cfg.objective.frame_aware_attention and self.cfg.data.media == "video":
            self.frame_weights = self._frame_scores(model, pairs.media_tokens, pairs.text_feat)
        try:
            logits = match_logits(model, pairs.input_ids, pairs.attention_mask, pairs.media_tokens, pairs.context,
                                  self.special.enc)
        finally:
            self.frame_weights = None
        return matching_loss(logits)

    @torch.no_grad()
    def _frame_scores(self, model, media_tokens, text_feat):
        """Frame-aware attention (UniAdapter, used by the paper for video): frames weighted by
        softmax_t(text·frame / 4) · T, without gradient; training only."""
        t = self.cfg.data.num_frames
        frame_cls = media_tokens.unflatten(1, (t, -1))[:, :, 0]
        frame_feat = F.normalize(model.vision_proj(frame_cls), dim=-1)
        sim = torch.einsum("btd,bd->bt", frame_feat.float(), text_feat.float())
        return F.softmax(sim / 4.0, dim=1) * t

    def _weigh_frame_keys(self, module, args, keys):
        """Forward hook on cross-attention key projections: scale each frame's non-[CLS] keys."""
        if self.frame_weights is None:
            return keys
        w = self.frame_weights.to(keys.dtype)[:, :, None, None]
        frames = keys.unflatten(1, (self.cfg.data.num_frames, -1))
        scaled = torch.cat([frames[:, :, :1], frames[:, :, 1:] * w], dim=2)
        return scaled.flatten(1, 2)

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m, idx):
        self.queue.push(gather(image_feat_m), gather(text_feat_m), gather(idx.to(image_feat_m.device)))
