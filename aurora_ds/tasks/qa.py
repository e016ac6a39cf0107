"""Visual question answering on BLIP's VQA backbone: training objective and inference.

As BLIP (``blip_vqa.py``), answering is generation: the image tokens (for video, every frame's
tokens concatenated) feed the question encoder through cross-attention, and the answer decoder
reads the question encoding through its own cross-attention. Training is teacher forcing on
each question's unique human answers, weighted by how many humans gave them. Inference either
generates greedily (open-ended, MSRVTT-QA) or ranks a fixed answer list (VQAv2).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from ..backbones import blip
from .base import Objective

MAX_ANSWER_TOKENS = 16


class Candidates(NamedTuple):
    """A tokenised answer list for candidate inference (tokenised once per evaluation)."""

    answers: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize_answers(tokenizer, answers: list[str], bos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's answer tokens ``[DEC] answer [SEP]``: the tokenizer's leading [CLS] becomes the
    decoder's bos ``bos_id`` (the objective passes the model config's, the id generation starts
    from; default: the tokenizer's bos), so the first predicted token is the answer's first word."""
    bos_id = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise ValueError("answer tokens need the decoder's bos id ([DEC]): pass the model config's "
                         "text_config.bos_token_id (the QA objective does)")
    out = tokenizer(list(answers), padding="longest", truncation=True, max_length=MAX_ANSWER_TOKENS,
                    return_tensors="pt")
    ids = out["input_ids"].long().clone()
    ids[:, 0] = bos_id
    return ids, out["attention_mask"].long()


def answer_candidates(tokenizer, answers: list[str], bos_id: int | None = None) -> Candidates:
    """The answer list tokenised once. Its position 0 is a placeholder where the tokenizer has no
    bos: the objective ranking them writes its own answer bos there."""
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        bos_id = bos_id if bos_id is not None else tokenizer.cls_token_id
    return Candidates(list(answers), *tokenize_answers(tokenizer, answers, bos_id))


@contextlib.contextmanager
def inference(module: nn.Module):
    """No gradients and no dropout, whatever mode the caller left the module in."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(training)


class QAObjective(Objective):
    """BLIP's VQA answer loss around a ``BlipForQuestionAnswering`` backbone.

    As :class:`RetrievalObjective`, all backbone work happens in ``forward`` so that DeepSpeed's
    engine forward wraps every use of the partitioned parameters; the inference modes are
    forward modes for the same reason. ``tokenizer`` must be set before training or
    generating: the objective tokenises answers and decodes generations itself. ``special``
    holds BLIP's token conventions ([ENC] for the question encoder, the answer bos), read from
    the backbone's config; the engine replaces it with the ids checked against its tokenizer.
    """

    def __init__(self, backbone, cfg, tokenizer=None, special=None):
        super().__init__(backbone, cfg, tokenizer, special)
        self.special = special or blip.special_tokens(backbone.config, None, cfg.backbone.blip_special_tokens)

    def forward(self, batch: dict, step: int, mode: str, extra=None):
        """``train``: {"answer", "loss"}; ``generate``: answer strings; ``rank``: the best
        answer of ``extra`` (a :class:`Candidates`) per question."""
        if mode == "train":
            return self._train(batch)
        if mode not in ("generate", "candidates"):
            raise ValueError(f"unknown QA forward mode {mode!r}")
        with inference(self):
            states, mask = self._encode_questions(batch)
            if mode == "generate":
                return self._generate(states, mask)
            return self._pick_candidate(states, mask, extra)

    def _encode_questions(self, batch: dict):
        """Question tokens attended over the media tokens: the decoder's cross-attention memory."""
        return blip.encode_questions(self.backbone, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                     self.special.enc)

    def _train(self, batch: dict) -> dict[str, torch.Tensor]:
        """BLIP: each question repeated for each of its answers; loss = Σ weight · NLL / questions."""
        states, mask = self._encode_questions(batch)
        counts = torch.tensor([len(a) for a in batch["answers"]], device=states.device)
        answers = [a for group in batch["answers"] for a in group]
        weights = torch.tensor([w for group in batch["answer_weights"] for w in group], device=states.device)
        ids, answer_mask = (t.to(states.device) for t in tokenize_answers(self.tokenizer, answers, self.special.dec))
        nll = blip.answer_nll(self.backbone, ids, answer_mask, states.repeat_interleave(counts, 0),
                              mask.repeat_interleave(counts, 0))
        loss = (weights * nll.float()).sum() / len(counts)
        return {"answer": loss, "loss": loss}

    def _generate(self, states, mask) -> list[str]:
        """Greedy answers, decoded to strings."""
        out = blip.generate_answers(self.backbone, states, mask, self.cfg.eval.max_new_tokens)
        return [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _pick_candidate(self, states, mask, candidates: Candidates) -> list[str]:
        """BLIP's candidate ranking: the first answer token's probability shortlists ``k_test``
        candidates per question, their full log-likelihood picks the answer."""
        if not isinstance(candidates, Candidates):
            raise ValueError("candidate inference needs the answer list: pass answer_candidates(tokenizer, answers)")
        model = self.backbone
        ids, answer_mask = candidates.input_ids.to(states.device), candidates.attention_mask.to(states.device)
        ids = ids.clone()
        ids[:, 0] = self.special.dec  # the bos training used and generation starts from
        b, k = states.shape[0], min(self.cfg.eval.k_test, len(candidates.answers))
        start = blip.first_answer_logits(model, ids[:1, :1].expand(b, 1), states, mask)
        first = start.float().softmax(-1).index_select(1, ids[:, 1])
        top = first.topk(k, dim=1).indices  # (b, k)
        nll = blip.answer_nll(model, ids[top.flatten()], answer_mask[top.flatten()],
                              states.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
        best = top.gather(1, nll.view(b, k).argmin(1, keepdim=True)).squeeze(1)
        return [candidates.answers[i] for i in best.tolist()]
