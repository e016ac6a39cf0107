"""Retrieval and VQA on BLIP-2 backbones: the same task interfaces as the BLIP objectives.

Retrieval is BLIP-2's fine-tuning objective: ITC between the Q-Former's query outputs (a media
scores a text by its best query) and its text [CLS], over the global batch, plus ITM with hard
negatives (shared with BLIP, ``retrieval.matching_inputs``). BLIP-2 has no momentum encoder or
queue. VQA is generation by the frozen language model, prefixed by the projected query
outputs: teacher forcing on each question's answers weighted by how many humans gave them
(as BLIP), greedy generation, or ranking an answer list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import blip2
from ..dist import gather, gather_with_grad, world
from .base import Objective
from .qa import MAX_ANSWER_TOKENS, Candidates, inference
from .retrieval import matching_inputs, matching_loss, media_index, similarity, track_context, with_media_index

PROMPT = "Question: {} Answer:"
MAX_PROMPT_TOKENS = 48


class Blip2RetrievalObjective(Objective):
    """ITC + ITM around a ``Blip2ForImageTextRetrieval``; forward modes as
    :class:`~aurora_ds.tasks.retrieval.RetrievalObjective` (``train``, ``embed_media``,
    ``embed_text``, ``match``), all inside the engine's forward for ZeRO-3."""

    def __init__(self, backbone, cfg, tokenizer=None, special=None):
        super().__init__(backbone, cfg, tokenizer, special)  # no momentum encoder: the engine's EMA goes unused
        if cfg.objective.frame_aware_attention and cfg.data.media == "video":
            raise ValueError("frame_aware_attention weighs BLIP's frame [CLS] tokens; BLIP-2's Q-Former has none: "
                             "set frame_aware_attention=false for BLIP-2 video retrieval")

    def losses(self, forward, batch: dict, step: int) -> dict:
        return forward(with_media_index(batch), step, "train")

    def _media(self, pixels):
        tokens, _ = blip2.encode_media(self.backbone, pixels)
        queries = blip2.image_queries(self.backbone, tokens)
        return tokens, self.backbone.vision_projection(queries.to(self.backbone.vision_projection.weight.dtype))

    def _text(self, ids, mask):
        cls = blip2.text_states(self.backbone, ids, mask)[:, 0]
        return cls, self.backbone.text_projection(cls.to(self.backbone.text_projection.weight.dtype))

    def forward(self, batch: dict, step: int, mode: str, extra=None):
        model, cfg = self.backbone, self.cfg
        if mode == "embed_media":
            tokens, feat = self._media(batch["pixel_values"])
            return F.normalize(feat, dim=-1), tokens
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mode == "embed_text":
            cls, feat = self._text(ids, mask)
            return F.normalize(feat, dim=-1), cls
        if mode == "match":
            logits = blip2.match_logits(model, ids, mask, batch["media_tokens"])  # ICE: the running context
            return logits.float().softmax(-1)[:, 1]
        if mode != "train":
            raise ValueError(f"unknown retrieval forward mode {mode!r}")

        media_tokens, media_feat = self._media(batch["pixel_values"])
        text_cls, text_feat = self._text(ids, mask)
        image_feat = F.normalize(media_feat.float(), dim=-1)  # (B, Q, D)
        text_feat = F.normalize(text_feat.float(), dim=-1)
        # In-batch ITC over every rank's rows: gathered with gradient, as BLIP-2 does.
        idx = media_index(batch).to(ids.device).view(-1, 1)
        many = world()[1] > 1
        idx_all = gather(idx) if many else idx
        image_all = gather_with_grad(image_feat) if many else image_feat
        text_all = gather_with_grad(text_feat) if many else text_feat
        pos = torch.eq(idx, idx_all.t()).float()
        targets = pos / pos.sum(1, keepdim=True)
        sim_i2t = similarity(image_feat, text_all) / cfg.objective.temp
        sim_t2i = similarity(image_all, text_feat).t() / cfg.objective.temp
        loss_i2t = -(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()
        losses = {"itc": (loss_i2t + loss_t2i) / 2}
        if cfg.objective.itm:
            pairs = matching_inputs(cfg, batch, media_tokens, image_feat, text_feat, text_cls, step)
            track_context(model, pairs)
            logits = blip2.match_logits(model, pairs.input_ids, pairs.attention_mask, pairs.media_tokens, pairs.context)
            losses["itm"] = matching_loss(logits)
        losses["loss"] = sum(losses.values())
        return losses


class Blip2QAObjective(Objective):
    """VQA around a ``Blip2ForConditionalGeneration`` with a decoder-only language model (OPT).

    A sequence is ``[query prefix][Question: q Answer:][answer][eos]``; prompts are left-padded
    (masked) so that every answer starts at the same position. ``tokenizer`` is the language
    model's and must be set before training or answering.
    """

    def __init__(self, backbone, cfg, tokenizer=None, special=None):
        super().__init__(backbone, cfg, tokenizer, special)
        if not backbone.config.use_decoder_only_language_model:
            raise ValueError("BLIP-2 VQA here drives a decoder-only language model (OPT); "
                             f"{backbone.config.text_config.model_type} is an encoder-decoder")
        self._candidates = None

    def forward(self, batch: dict, step: int, mode: str, extra=None):
        """``train``: {"answer", "loss"}; ``generate``: answer strings; ``rank``: the best answer
        of ``extra`` (a :class:`~aurora_ds.tasks.qa.Candidates`) per question."""
        if mode == "train":
            return self._train(batch)
        if mode not in ("generate", "candidates"):
            raise ValueError(f"unknown QA forward mode {mode!r}")
        with inference(self):
            prefix, prompt, prompt_mask = self._prompt(batch)
            if mode == "generate":
                return self._generate(prefix, prompt, prompt_mask)
            return self._pick_candidate(prefix, prompt, prompt_mask, extra)

    @property
    def _eos(self) -> int:
        return self.backbone.config.text_config.eos_token_id

    def _prompt(self, batch: dict):
        """The visual prefix (B, Q, d) and the left-padded prompt ids and mask."""
        if self.tokenizer is None:
            raise ValueError("BLIP-2 VQA needs the language model's tokenizer: set backbone.tokenizer=DIR, or train from a "
                             "checkpoint that ships one (backbone.checkpoint)")
        model = self.backbone
        media_tokens, _ = blip2.encode_media(model, batch["pixel_values"])
        prefix = blip2.language_prefix(model, media_tokens)
        rows = self.tokenizer([PROMPT.format(q) for q in batch["question"]], add_special_tokens=False,
                              truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
        ids, mask = _pad(rows, self.backbone.config.text_config.pad_token_id, left=True)
        return prefix, ids.to(prefix.device), mask.to(prefix.device)

    def _answers(self, answers: list[str]):
        """Answer ids followed by eos, right-padded."""
        rows = self.tokenizer(list(answers), add_special_tokens=False, truncation=True,
                              max_length=MAX_ANSWER_TOKENS - 1)["input_ids"]
        return _pad([r + [self._eos] for r in rows], self.backbone.config.text_config.pad_token_id, left=False)

    def _embed(self, prefix, ids, mask):
        lm = self.backbone.language_model
        embeds = lm.get_input_embeddings()(ids)
        ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
        return torch.cat([prefix.to(embeds.dtype), embeds], 1), torch.cat([ones, mask], 1)

    def _answer_nll(self, prefix, prompt, prompt_mask, answer, answer_mask) -> torch.Tensor:
        """Summed token NLL of each answer (eos included) after its prefix and prompt."""
        embeds, mask = self._embed(prefix, torch.cat([prompt, answer], 1), torch.cat([prompt_mask, answer_mask], 1))
        logits = self.backbone.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        start = embeds.shape[1] - answer.shape[1]  # the first answer position
        predicted = logits[:, start - 1:-1].float()
        nll = F.cross_entropy(predicted.transpose(1, 2), answer, reduction="none")
        return (nll * answer_mask).sum(1)

    def _train(self, batch: dict) -> dict[str, torch.Tensor]:
        """As BLIP: each question repeated for each of its answers; Σ weight · NLL / questions."""
        prefix, prompt, prompt_mask = self._prompt(batch)
        counts = torch.tensor([len(a) for a in batch["answers"]], device=prefix.device)
        answers = [a for group in batch["answers"] for a in group]
        weights = torch.tensor([w for group in batch["answer_weights"] for w in group], device=prefix.device)
        answer, answer_mask = (t.to(prefix.device) for t in self._answers(answers))
        nll = self._answer_nll(prefix.repeat_interleave(counts, 0), prompt.repeat_interleave(counts, 0),
                               prompt_mask.repeat_interleave(counts, 0), answer, answer_mask)
        loss = (weights * nll).sum() / len(counts)
        return {"answer": loss, "loss": loss}

    def _generate(self, prefix, prompt, prompt_mask) -> list[str]:
        """Greedy decoding until eos (transformers keeps ZeRO-3 ranks in step: synced_gpus)."""
        embeds, mask = self._embed(prefix, prompt, prompt_mask)
        text = self.backbone.config.text_config
        out = self.backbone.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                                    max_new_tokens=self.cfg.eval.max_new_tokens,
                                                    eos_token_id=self._eos, pad_token_id=text.pad_token_id,
                                                    do_sample=False, num_beams=1)
        return [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _pick_candidate(self, prefix, prompt, prompt_mask, candidates: Candidates) -> list[str]:
        """As BLIP's candidate ranking: the first answer token's probability shortlists ``k_test``
        candidates per question, their full likelihood picks the answer."""
        if not isinstance(candidates, Candidates):
            raise ValueError("candidate inference needs the answer list: pass answer_candidates(tokenizer, answers)")
        answer, answer_mask = (t.to(prefix.device) for t in self._tokenized(tuple(candidates.answers)))
        embeds, mask = self._embed(prefix, prompt, prompt_mask)
        first = self.backbone.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
        b, k = prefix.shape[0], min(self.cfg.eval.k_test, len(candidates.answers))
        top = first.softmax(-1).index_select(1, answer[:, 0]).topk(k, dim=1).indices  # (b, k)
        nll = self._answer_nll(prefix.repeat_interleave(k, 0), prompt.repeat_interleave(k, 0),
                               prompt_mask.repeat_interleave(k, 0), answer[top.flatten()], answer_mask[top.flatten()])
        best = top.gather(1, nll.view(b, k).argmin(1, keepdim=True)).squeeze(1)
        return [candidates.answers[i] for i in best.tolist()]

    def _tokenized(self, answers: tuple[str, ...]):
        """The answer list tokenised once per evaluation, not once per batch."""
        if self._candidates is None or self._candidates[0] != answers:
            self._candidates = (answers, self._answers(list(answers)))
        return self._candidates[1]


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask
