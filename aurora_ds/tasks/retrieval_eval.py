"""Retrieval evaluation: contrastive top-k candidates re-ranked by the matching head.

Everything is ordered by media id (and caption order within a media) after gathering, and
the work is split over ranks by that order, so the metrics do not depend on the number of
ranks or the order of the shards. Under ZeRO-3 every forward is collective, so every rank
makes the same number of forward calls (padding with repeats whose results are dropped).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from .common import lockstep, world
from .retrieval import similarity


def _gather_objects(obj) -> list:
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


def _rank(scores: np.ndarray, targets) -> int:
    """0-based rank of the best target; ties count against the query (pessimistic)."""
    return min(int((scores > scores[t]).sum() + (scores == scores[t]).sum() - 1) for t in targets)


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, media2txt: list[list[int]], txt2media: list[int]) -> dict:
    """TR@K (media -> text), IR@K (text -> media), their mean, and median ranks (1-based)."""
    ranks_i2t = np.array([_rank(score_i2t[i], media2txt[i]) for i in range(len(media2txt))])
    ranks_t2i = np.array([_rank(score_t2i[t], [txt2media[t]]) for t in range(len(txt2media))])
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((ranks_i2t < k).mean())
        out[f"img_r{k}"] = 100.0 * float((ranks_t2i < k).mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["txt_median_rank"] = float(np.median(ranks_i2t + 1))
    out["img_median_rank"] = float(np.median(ranks_t2i + 1))
    return out


@torch.no_grad()
def evaluate_retrieval(forward, loader, cfg, tokenizer, image_size: int) -> dict:
    """Metrics of the model behind ``forward`` on the eval ``loader`` (one entry per media)."""
    rank, size = world()

    # 1. Media embeddings of this rank's shards; every rank steps until all are done (a rank
    #    with no shards left runs a dummy batch whose result is dropped).
    feats, tokens, ids, captions = [], [], [], []
    frames = (cfg.num_frames,) if cfg.media == "video" else ()
    dummy = {"pixel_values": torch.zeros(1, *frames, 3, image_size, image_size)}
    for batch, real in lockstep(loader, dummy):
        f, tok = forward(batch, 0, "embed_media")
        if real:
            feats.append(f.float().cpu())
            tokens.append(tok.cpu())
            ids += list(batch["media_id"])
            captions += list(batch["captions"])
    local = {"ids": ids, "captions": captions,
             "feats": torch.cat(feats) if feats else None, "tokens": torch.cat(tokens) if tokens else None}
    parts = _gather_objects(local)
    order = sorted((m, p, i) for p, part in enumerate(parts) for i, m in enumerate(part["ids"]))
    if len({m for m, _, _ in order}) != len(order):
        raise ValueError("evaluation shards contain a media id twice; the eval set must be read once")
    media_feat = torch.stack([parts[p]["feats"][i] for _, p, i in order])
    media_tokens = torch.stack([parts[p]["tokens"][i] for _, p, i in order])
    texts, txt2media, media2txt = [], [], []
    for j, (_, p, i) in enumerate(order):
        caps = parts[p]["captions"][i]
        media2txt.append(list(range(len(texts), len(texts) + len(caps))))
        txt2media += [j] * len(caps)
        texts += caps

    # 2. Text embeddings, split evenly over ranks, then summed back into place.
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    n_text, bs = len(texts), cfg.eval_batch_size
    text_feat = text_cls = None
    chunks = [range(s, min(s + bs, n_text)) for s in range(0, n_text, bs)]
    for c in range(math.ceil(len(chunks) / size)):
        index = c * size + rank
        rows = chunks[index] if index < len(chunks) else chunks[0]
        sel = torch.tensor(list(rows))
        f, cls = forward({"input_ids": enc["input_ids"][sel], "attention_mask": enc["attention_mask"][sel]}, 0, "embed_text")
        if text_feat is None:  # the text [CLS] width need not be the media tokens' (BLIP-2)
            text_feat, text_cls = torch.zeros(n_text, f.shape[-1]), torch.zeros(n_text, cls.shape[-1])
        if index < len(chunks):
            text_feat[sel], text_cls[sel] = f.float().cpu(), cls.float().cpu()
    text_feat, text_cls = _sum_over_ranks(text_feat), _sum_over_ranks(text_cls)
    context = text_cls.mean(0, keepdim=True)

    # 3. Top-k by similarity, re-ranked by ITM; rows split over ranks, padded to equal counts.
    sim = similarity(media_feat, text_feat)
    n_media = len(order)
    dtype = media_tokens.dtype
    score_i2t = torch.full((n_media, n_text), -100.0)
    score_t2i = torch.full((n_text, n_media), -100.0)
    k_i2t, k_t2i = min(cfg.k_test, n_text), min(cfg.k_test, n_media)
    for direction, n_rows, k in (("i2t", n_media, k_i2t), ("t2i", n_text, k_t2i)):
        for c in range(math.ceil(n_rows / size)):
            row = c * size + rank
            real = row < n_rows
            row = row if real else 0
            if direction == "i2t":
                top = sim[row].topk(k).indices
                pair_tokens, pair_text = media_tokens[row].expand(k, *media_tokens.shape[1:]), top
            else:
                top = sim[:, row].topk(k).indices
                pair_tokens, pair_text = media_tokens[top], torch.full((k,), row)
            itm = forward({"input_ids": enc["input_ids"][pair_text], "attention_mask": enc["attention_mask"][pair_text],
                           "media_tokens": pair_tokens.to(dtype), "text_cls": context.to(dtype)}, 0, "match").float().cpu()
            if cfg.media == "video":  # the paper's video evaluation adds the contrastive similarity
                itm = itm + (sim[row, top] if direction == "i2t" else sim[top, row])
            if real:
                if direction == "i2t":
                    score_i2t[row, top] = itm
                else:
                    score_t2i[row, top] = itm
    # Each row was filled by exactly one rank; elsewhere it holds the -100 filler.
    score_i2t = _sum_over_ranks(score_i2t + 100.0) - 100.0
    score_t2i = _sum_over_ranks(score_t2i + 100.0) - 100.0
    metrics = retrieval_metrics(score_i2t.numpy(), score_t2i.numpy(), media2txt, txt2media)
    metrics.update({"num_media": n_media, "num_texts": n_text, "select": metrics["r_mean"]})
    return metrics
