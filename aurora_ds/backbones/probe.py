"""A synthetic batch and a forward pass for every backbone interface.

Used where the exact input does not matter but the whole adapted path must run: equivalence
tests, the step benchmark, smoke checks of a new registry entry.
"""

from __future__ import annotations

import torch

from ..aurora import context_module
from . import blip, blip2


def example_batch(spec, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=g)}
    if spec.task != "vision":
        vocab = spec.vocab_size
        ids = torch.randint(6, vocab, (batch_size, seq_len), generator=g)
        batch["input_ids"] = ids
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def forward_features(model, spec, batch: dict) -> dict[str, torch.Tensor]:
    """The outputs that depend on every adapted layer of ``model``, by name."""
    dtype = next(p for p in model.parameters()).dtype
    pixels = batch["pixel_values"].to(dtype)
    if spec.task == "vision":
        return {"tokens": model.forward_features(pixels), "features": model(pixels)}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if spec.task == "clip":
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds}
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    if spec.interface == "blip2":
        return _blip2_features(model, spec, image, ids, mask)
    fused = blip.fuse(model, ids, mask, image)
    if spec.task == "retrieval":
        text = blip.encode_text(model, ids, mask)
        cls = fused[:, 0]
        context = context_module(model)
        if context is not None:
            cls = context(cls, text[:, 0])
        return {"image": image, "text": text, "fused": fused, "itm": model.itm_head(cls)}
    logits = model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=fused,
                                encoder_attention_mask=mask).logits
    return {"image": image, "fused": fused, "logits": logits}


def _blip2_features(model, spec, image, ids, mask) -> dict[str, torch.Tensor]:
    if spec.task == "retrieval":
        text = blip2.text_states(model, ids, mask)
        return {"image": image, "queries": blip2.image_queries(model, image), "text": text,
                "itm": blip2.match_logits(model, ids, mask, image, text[:, 0])}
    prefix = blip2.language_prefix(model, image)
    embeds = model.language_model.get_input_embeddings()(ids)
    logits = model.language_model(inputs_embeds=torch.cat([prefix.to(embeds.dtype), embeds], 1)).logits
    return {"image": image, "prefix": prefix, "logits": logits}
