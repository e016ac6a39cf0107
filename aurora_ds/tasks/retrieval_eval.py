"""Retrieval evaluation: contrastive top-k candidates re-ranked by the matching head.

Everything is ordered by media id (and caption order within a media) after gathering, and
the work is split over ranks by that order, so the metrics do not depend on the number of
ranks or the order of the shards. Under ZeRO-3 every forward is collective, so every rank
makes the same number of forward calls (padding with repeats whose results are dropped).
A pair's matching score depends on that pair alone: ICE takes the running context it kept in
training, not a statistic of the evaluation set, so adding or removing other captions or media
changes no other pair's score.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from ..dist import gather, gather_objects, lockstep, sum_over_ranks, world
from .retrieval import similarity


def _position(scores: np.ndarray, targets) -> int:
    """0-based position of the best target in the ranking; ties count against the query (pessimistic)."""
    return min(int((scores > scores[t]).sum() + (scores == scores[t]).sum() - 1) for t in targets)


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, media2txt: list[list[int]], txt2media: list[int]) -> dict:
    """TR@K (media -> text), IR@K (text -> media), their mean, and median ranks (1-based)."""
    positions_i2t = np.array([_position(score_i2t[i], media2txt[i]) for i in range(len(media2txt))])
    positions_t2i = np.array([_position(score_t2i[t], [txt2media[t]]) for t in range(len(txt2media))])
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((positions_i2t < k).mean())
        out[f"img_r{k}"] = 100.0 * float((positions_t2i < k).mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["txt_median_rank"] = float(np.median(positions_i2t + 1))
    out["img_median_rank"] = float(np.median(positions_t2i + 1))
    return out


def random_hit_rate(num_candidates: int, matches: list[int]) -> np.ndarray:
    """Element k-1: the probability that a random ranking puts a match within the top k, averaged
    over queries with ``matches`` matching candidates each. A query with m matches among n misses
    the top k with probability C(n-m, k) / C(n, k) = prod_{j<k} (n-m-j) / (n-j) (one match: 1 - k/n)."""
    j = np.arange(num_candidates)
    rate = np.zeros(num_candidates)
    for m, count in Counter(matches).items():
        rate += count * (1 - np.cumprod(np.clip((num_candidates - m - j) / (num_candidates - j), 0, None)))
    return rate / len(matches)


def chance_metrics(media2txt: list[list[int]], num_texts: int) -> dict:
    """What a random ranking scores on this evaluation set, in expectation, for each metric of
    :func:`retrieval_metrics`: a set of 12 media makes IR@10 83 % by chance. A median rank's chance
    is the rank where the random hit rate reaches one half."""
    rates = {"txt": random_hit_rate(num_texts, [len(t) for t in media2txt]),
             "img": random_hit_rate(len(media2txt), [1] * num_texts)}
    out = {}
    for side, rate in rates.items():
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = 100.0 * float(rate[min(k, len(rate)) - 1])
        out[f"{side}_r_mean"] = (out[f"{side}_r1"] + out[f"{side}_r5"] + out[f"{side}_r10"]) / 3
        out[f"{side}_median_rank"] = float(np.argmax(rate >= 0.5) + 1)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


class RetrievalScores(NamedTuple):
    """Scores of an evaluation set, media ordered by id and texts by media then caption order;
    a pair outside the top-k candidates holds -100."""

    i2t: np.ndarray  # (media, texts)
    t2i: np.ndarray  # (texts, media)
    media_ids: list[str]
    texts: list[str]
    media2txt: list[list[int]]
    txt2media: list[int]


def evaluate_retrieval(forward, loader, cfg, tokenizer, image_size: int) -> dict:
    """Metrics of the model behind ``forward`` on the eval ``loader`` (one entry per media)."""
    s = retrieval_scores(forward, loader, cfg, tokenizer, image_size)
    metrics = retrieval_metrics(s.i2t, s.t2i, s.media2txt, s.txt2media)
    metrics.update({"num_media": len(s.media_ids), "num_texts": len(s.texts), "select": metrics["r_mean"],
                    "chance": chance_metrics(s.media2txt, len(s.texts))})
    return metrics


@torch.no_grad()
def retrieval_scores(forward, loader, cfg, tokenizer, image_size: int) -> RetrievalScores:
    """Contrastive top-k candidates of every query, scored by the matching head (the same on every rank)."""
    me, size = world()

    # 1. Media embeddings of this rank's shards; every rank steps until all are done (a rank
    #    with no shards left runs a dummy batch whose result is dropped). Features and tokens
    #    stay on the compute device and are gathered as tensors (one copy, no pickles); only
    #    ids and captions travel as objects.
    feats, tokens, ids, captions = [], [], [], []
    frames = (cfg.data.num_frames,) if cfg.data.media == "video" else ()
    dummy = {"pixel_values": torch.zeros(1, *frames, 3, image_size, image_size)}
    for batch, real in lockstep(loader, dummy):
        f, tok = forward(batch, 0, "embed_media")
        if real:
            feats.append(f.float())
            tokens.append(tok)
            ids += list(batch["media_id"])
            captions += list(batch["captions"])
    if not feats:  # this rank had no media at all: an empty part of the right shape for the gather
        if "f" not in locals():
            raise ValueError("the evaluation shards hold no media on any rank")
        feats, tokens = [f.float()[:0]], [tok[:0]]
    meta = gather_objects({"ids": ids, "captions": captions})
    all_ids = [m for part in meta for m in part["ids"]]
    all_captions = [c for part in meta for c in part["captions"]]
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("evaluation shards contain a media id twice; the eval set must be read once")
    order = sorted(range(len(all_ids)), key=all_ids.__getitem__)
    # Media tokens stay in gather order (one copy); ``perm[j]`` is the row of the j-th media id.
    perm = torch.tensor(order, device=feats[0].device)
    media_feat = gather(torch.cat(feats))[perm]
    media_tokens = gather(torch.cat(tokens))
    del feats, tokens
    device = media_feat.device
    texts, txt2media, media2txt = [], [], []
    for j, i in enumerate(order):
        caps = all_captions[i]
        media2txt.append(list(range(len(texts), len(texts) + len(caps))))
        txt2media += [j] * len(caps)
        texts += caps

    # 2. Text embeddings, split evenly over ranks, then summed back into place.
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    n_text, bs = len(texts), cfg.eval.batch_size
    text_feat = None
    chunks = [range(s, min(s + bs, n_text)) for s in range(0, n_text, bs)]
    for c in range(math.ceil(len(chunks) / size)):
        index = c * size + me
        rows = chunks[index] if index < len(chunks) else chunks[0]
        sel = torch.tensor(list(rows))
        f, _ = forward({"input_ids": enc["input_ids"][sel], "attention_mask": enc["attention_mask"][sel]}, 0, "embed_text")
        if text_feat is None:
            text_feat = torch.zeros(n_text, f.shape[-1], device=device)
        if index < len(chunks):
            text_feat[sel.to(device)] = f.float()
    text_feat = sum_over_ranks(text_feat)

    # 3. Top-k by similarity, re-ranked by ITM; rows split over ranks, padded to equal counts.
    sim = similarity(media_feat, text_feat)
    n_media = len(order)
    dtype = media_tokens.dtype
    score_i2t = torch.full((n_media, n_text), -100.0, device=device)
    score_t2i = torch.full((n_text, n_media), -100.0, device=device)
    ids_all, mask_all = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    k_i2t, k_t2i = min(cfg.eval.k_test, n_text), min(cfg.eval.k_test, n_media)
    for direction, n_rows, k in (("i2t", n_media, k_i2t), ("t2i", n_text, k_t2i)):
        for c in range(math.ceil(n_rows / size)):
            row = c * size + me
            real = row < n_rows
            row = row if real else 0
            if direction == "i2t":
                top = sim[row].topk(k).indices
                pair_tokens, pair_text = media_tokens[perm[row]].expand(k, *media_tokens.shape[1:]), top
            else:
                top = sim[:, row].topk(k).indices
                pair_tokens, pair_text = media_tokens[perm[top]], torch.full((k,), row, device=device)
            itm = forward({"input_ids": ids_all[pair_text], "attention_mask": mask_all[pair_text],
                           "media_tokens": pair_tokens.to(dtype)}, 0, "match").float()
            if cfg.data.media == "video":  # the paper's video evaluation adds the contrastive similarity
                itm = itm + (sim[row, top] if direction == "i2t" else sim[top, row])
            if real:
                if direction == "i2t":
                    score_i2t[row, top] = itm
                else:
                    score_t2i[row, top] = itm
    # Each row was filled by exactly one rank; elsewhere it holds the -100 filler.
    score_i2t = sum_over_ranks(score_i2t + 100.0) - 100.0
    score_t2i = sum_over_ranks(score_t2i + 100.0) - 100.0
    return RetrievalScores(score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), [all_ids[i] for i in order], texts,
                           media2txt, txt2media)
