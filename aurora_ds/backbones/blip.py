"""BLIP's model interface (transformers' ``BlipForImageTextRetrieval`` and
``BlipForQuestionAnswering``): how to encode media and text, run matching with Informative
Context Enhancement, encode questions and score answers.

The tasks call these instead of reaching into the model or into ``aurora``; the BLIP-2 twin is
``blip2.py``. The registry entries themselves live in ``hf.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..aurora import context_module

DEC, ENC = "[DEC]", "[ENC]"


class SpecialTokens(NamedTuple):
    """BLIP's token conventions for one run: ``enc`` goes to position 0 of every matching pass
    and of the VQA question encoder (None: the tokenizer's [CLS] stays, as in transformers'
    BLIP classes); ``dec`` is the answer decoder's bos, in training, ranking and generation."""

    enc: int | None
    dec: int


def answer_bos_id(config) -> int:
    """The answer decoder's bos, from the model config as ``BlipForQuestionAnswering`` reads it
    for generation (``decoder_start_token_id = text_config.bos_token_id``)."""
    return int(config.text_config.bos_token_id)


def special_tokens(config, tokenizer=None, enabled: bool = True, where: str = "the checkpoint's config",
                   strict: bool = True) -> SpecialTokens:
    """BLIP's [DEC] and [ENC] as the Salesforce checkpoints were trained (BLIP's ``init_tokenizer``
    adds [DEC] as bos, then [ENC]): added to ``tokenizer`` where missing, and their ids checked
    against ``config`` (``text_config.bos_token_id`` is [DEC], [ENC] the id after it) before
    anything is built. A mismatch is an error naming both ids. ``enabled=False``
    (``backbone.blip_special_tokens``) adds nothing and keeps [CLS] at position 0.
    ``strict=False`` is for a tokenizer trained here for a random-init backbone (no trained
    embedding to agree with): its own [ENC] is used, the answer bos is still the config's."""
    dec = answer_bos_id(config)
    if not enabled:
        return SpecialTokens(None, dec)
    enc = dec + 1
    vocab = config.text_config.vocab_size
    if enc >= vocab:
        raise ValueError(f"{where}: text_config.bos_token_id={dec} leaves no room for BLIP's [ENC] (id {enc}) in a "
                         f"vocabulary of {vocab}; set backbone.blip_special_tokens=false for a checkpoint trained without it")
    if tokenizer is not None:
        vocab_ids = tokenizer.get_vocab()
        if DEC not in vocab_ids:
            tokenizer.add_special_tokens({"bos_token": DEC})
        elif tokenizer.bos_token is None:
            tokenizer.bos_token = DEC
        if ENC not in vocab_ids:
            tokenizer.add_special_tokens({"additional_special_tokens": [ENC]})
        if not strict:
            return SpecialTokens(tokenizer.convert_tokens_to_ids(ENC), dec)
        for token, want in ((DEC, dec), (ENC, enc)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != want:
                raise ValueError(
                    f"the tokenizer's {token} is id {got} but {where} expects {want} (text_config.bos_token_id="
                    f"{dec} is [DEC], [ENC] follows it): use the checkpoint's own tokenizer (backbone.tokenizer), or "
                    f"set backbone.blip_special_tokens=false for a checkpoint trained without BLIP's tokens")
    return SpecialTokens(enc, dec)


def with_enc(input_ids: torch.Tensor, enc: int | None) -> torch.Tensor:
    """``input_ids`` with [ENC] in place of [CLS] at position 0 (unchanged when ``enc`` is None)."""
    if enc is None:
        return input_ids
    ids = input_ids.clone()
    ids[:, 0] = enc
    return ids


def encode_media(model, pixels: torch.Tensor):
    """Vision tokens for the fusion encoder and the [CLS] feature for the contrastive path.

    Video (B, T, 3, H, W): every frame goes through the vision tower; the contrastive [CLS]
    is the temporal mean of the frame [CLS] tokens and the fusion encoder sees all frames'
    tokens concatenated (B, T*N, d).
    """
    dtype = next(model.vision_model.parameters()).dtype
    # Video recipes run at 224 px on checkpoints trained at 384: interpolate position embeddings.
    resize = pixels.shape[-1] != model.config.vision_config.image_size
    if pixels.dim() == 4:
        tokens = model.vision_model(pixel_values=pixels.to(dtype), interpolate_pos_encoding=resize).last_hidden_state
        return tokens, tokens[:, 0]
    b, t = pixels.shape[:2]
    tokens = model.vision_model(pixel_values=pixels.flatten(0, 1).to(dtype), interpolate_pos_encoding=resize).last_hidden_state
    tokens = tokens.unflatten(0, (b, t))
    return tokens.flatten(1, 2), tokens[:, :, 0].mean(1)


def encode_text(model, input_ids, attention_mask):
    """The text encoder alone (its [CLS] is the contrastive text feature)."""
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def fuse(model, input_ids, attention_mask, media_tokens):
    """The text encoder attending over the media tokens (matching, and VQA's question encoding)."""
    media_mask = torch.ones(media_tokens.shape[:-1], dtype=torch.long, device=media_tokens.device)
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=media_tokens,
                              encoder_attention_mask=media_mask).last_hidden_state


def match_logits(model, input_ids, attention_mask, media_tokens, text_cls_context=None, enc: int | None = None):
    """ITM logits for (text, media) pairs, with ICE on the fused [CLS] when it is injected (its
    context: the mean of ``text_cls_context`` in training, None for the running one in evaluation);
    ``enc`` ([ENC], BLIP's convention) replaces the text's [CLS] at position 0."""
    cls = fuse(model, with_enc(input_ids, enc), attention_mask, media_tokens)[:, 0]
    context = context_module(model)
    if context is not None:
        cls = context(cls, text_cls_context)
    return model.itm_head(cls)


def encode_questions(model, pixels, input_ids, attention_mask, enc: int | None = None):
    """Question tokens attended over the media tokens, and their mask: the answer decoder's
    cross-attention memory. ``enc`` replaces [CLS] at position 0 (BLIP's ``blip_vqa``).
    Inputs are moved to the text encoder's device."""
    device = model.text_encoder.embeddings.word_embeddings.weight.device
    media_tokens, _ = encode_media(model, pixels.to(device))
    mask = attention_mask.to(device)
    return fuse(model, with_enc(input_ids.to(device), enc), mask, media_tokens), mask


def answer_nll(model, ids, mask, question_states, question_mask) -> torch.Tensor:
    """Summed token negative log-likelihood of each answer given its question encoding.

    The decoder shifts the labels itself; padding is masked out, bos is never predicted.
    """
    out = model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=question_states,
                             encoder_attention_mask=question_mask, labels=ids.masked_fill(mask == 0, -100),
                             reduction="none")
    return out.loss


def first_answer_logits(model, bos_ids, question_states, question_mask):
    """The decoder's logits for the first answer token after bos (candidate inference's shortlist)."""
    return model.text_decoder(input_ids=bos_ids, encoder_hidden_states=question_states,
                              encoder_attention_mask=question_mask).logits[:, 0]


def generate_answers(model, question_states, question_mask, max_new_tokens: int):
    """Greedy decoding from [DEC] until [SEP], as ``BlipForQuestionAnswering.generate`` (but
    with the question's padding masked, as in training); returns token ids."""
    text = model.config.text_config
    bos = torch.full((question_states.shape[0], 1), answer_bos_id(model.config), dtype=torch.long,
                     device=question_states.device)
    return model.text_decoder.generate(input_ids=bos, encoder_hidden_states=question_states,
                                       encoder_attention_mask=question_mask, eos_token_id=text.sep_token_id,
                                       pad_token_id=text.pad_token_id, max_new_tokens=max_new_tokens,
                                       do_sample=False, num_beams=1)
