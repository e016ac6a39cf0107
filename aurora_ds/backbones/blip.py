"""BLIP's model interface (transformers' ``BlipForImageTextRetrieval`` and
``BlipForQuestionAnswering``): how to encode media and text, run matching with Informative
Context Enhancement, encode questions and score answers.

The tasks call these instead of reaching into the model or into ``aurora``; the BLIP-2 twin is
``blip2.py``. The registry entries themselves live in ``hf.py``.
"""

from __future__ import annotations

import torch

from ..aurora import context_module


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


def match_logits(model, input_ids, attention_mask, media_tokens, text_cls_context):
    """ITM logits for (text, media) pairs, with ICE on the fused [CLS] when it is injected."""
    cls = fuse(model, input_ids, attention_mask, media_tokens)[:, 0]
    context = context_module(model)
    if context is not None:
        cls = context(cls, text_cls_context)
    return model.itm_head(cls)


def encode_questions(model, pixels, input_ids, attention_mask):
    """Question tokens attended over the media tokens, and their mask: the answer decoder's
    cross-attention memory. Inputs are moved to the text encoder's device."""
    device = model.text_encoder.embeddings.word_embeddings.weight.device
    media_tokens, _ = encode_media(model, pixels.to(device))
    mask = attention_mask.to(device)
    return fuse(model, input_ids.to(device), mask, media_tokens), mask


def answer_nll(model, ids, mask, question_states, question_mask) -> torch.Tensor:
    """Summed token negative log-likelihood of each answer given its question encoding.

    The decoder shifts the labels itself; padding is masked out, bos is never predicted.
    """
    out = model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=question_states,
                             encoder_attention_mask=question_mask, labels=ids.masked_fill(mask == 0, -100),
                             reduction="none")
    return out.loss


def first_answer_logits(model, bos_ids, question_states, question_mask):
    """The decoder's logits for the first answer token after bos (rank inference's shortlist)."""
    return model.text_decoder(input_ids=bos_ids, encoder_hidden_states=question_states,
                              encoder_attention_mask=question_mask).logits[:, 0]


def generate_answers(model, question_states, question_mask, max_new_tokens: int):
    """Greedy decoding from [DEC] until [SEP], as ``BlipForQuestionAnswering.generate`` (but
    with the question's padding masked, as in training); returns token ids."""
    text = model.config.text_config
    bos = torch.full((question_states.shape[0], 1), model.decoder_start_token_id, dtype=torch.long,
                     device=question_states.device)
    return model.text_decoder.generate(input_ids=bos, encoder_hidden_states=question_states,
                                       encoder_attention_mask=question_mask, eos_token_id=text.sep_token_id,
                                       pad_token_id=text.pad_token_id, max_new_tokens=max_new_tokens,
                                       do_sample=False, num_beams=1)
