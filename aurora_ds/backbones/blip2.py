"""BLIP-2 backbones: a ViT-g vision tower (width 1408), the Q-Former (768) and, for VQA, a
language model at its own width (OPT-2.7B: 2560).

Three widths in one model, and layers between widths: the vision MLP (1408 -> 6144) and the
Q-Former's cross-attention keys and values (1408 -> 768) are single blocks between two factor
sets (see ``aurora/layer.py``). The language model is frozen and untouched by the ``paper``
preset; ``all-linear`` adapts its attention too.

The functions at the end are the model interface the tasks and the probes share.
"""

from __future__ import annotations

import contextlib

import torch

from ..aurora import context_module
from ..aurora.targets import TargetPreset
from . import BackboneSpec, register_backbone, register_family
from . import blip
from .hf import TINY_TOKEN_IDS, VISION, build_hf


def _build(spec: BackboneSpec, checkpoint, dtype):
    """transformers initialises the learned queries to zeros, which makes every query of a
    random-init model identical all the way through the Q-Former; draw them as LAVIS does."""
    model = build_hf(spec, checkpoint, dtype)
    if checkpoint is None:
        with _gathered(model.query_tokens, modify=True):
            torch.nn.init.normal_(model.query_tokens, std=model.config.qformer_config.initializer_range)
    return model


def _gathered(param, modify: bool = False):
    """The whole parameter under ZeRO-3 (written back from rank 0 when ``modify``). One that is
    already whole (persistent, or gathered by the running forward) is used as it is."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not modify and param.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)


register_family("blip2", _build)

_QFORMER = r"qformer\.encoder\.layer\.\d+"
_QFORMER_PAPER = rf"{_QFORMER}\.(attention|crossattention)\.attention\.(query|key|value)"
_QFORMER_REST = rf"{_QFORMER}\.((attention|crossattention)\.output\.dense|(intermediate|output)(_query)?\.dense)"
_QFORMER_GATED = (rf"{_QFORMER}\.(attention|crossattention)",)
_LM = r"language_model\.model\.decoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"


def _presets(context: str, language_model: bool) -> dict[str, TargetPreset]:
    paper = (VISION, _QFORMER_PAPER)
    every = paper + (_QFORMER_REST,) + ((_LM,) if language_model else ())
    return {"paper": TargetPreset(paper, _QFORMER_GATED, context),
            "all-linear": TargetPreset(every, _QFORMER_GATED, context)}


def _shape(size: str, task: str) -> dict:
    """Random-init shapes. Blip2VisionConfig's default initializer_range (1e-10) gives a constant
    vision tower without a checkpoint; 0.02 is used instead, as for BLIP."""
    text_input = task == "retrieval"  # the Q-Former reads text only for ITC/ITM
    if size == "tiny":
        # Widths 48 / 32 / 64 and a 48 -> 208 MLP: the same width pattern as the full size.
        shape = {
            "vision_config": {"hidden_size": 48, "intermediate_size": 208, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            "qformer_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "vocab_size": 1024, "max_position_embeddings": 64,
                               "encoder_hidden_size": 48, "cross_attention_frequency": 1,
                               "pad_token_id": 0},
            "num_query_tokens": 4,
            "image_text_hidden_size": 16,
        }
        if task == "vqa":
            shape["text_config"] = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128,
                                    "word_embed_proj_dim": 64, **TINY_TOKEN_IDS}
    else:
        shape = {"vision_config": {}, "qformer_config": {}, "num_query_tokens": 32, "image_text_hidden_size": 256}
        if task == "vqa":  # OPT-2.7B
            shape["text_config"] = {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                                    "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
                                    "word_embed_proj_dim": 2560}
    shape["vision_config"]["initializer_range"] = 0.02
    shape["qformer_config"]["use_qformer_text_input"] = text_input
    return shape


for _size, _name in (("tiny", "tiny"), ("full", "g")):
    _image = 32 if _size == "tiny" else 224
    register_backbone(
        BackboneSpec(
            f"blip2-{_name}-retrieval", "blip2", "retrieval", _shape(_size, "retrieval"), _presets("itm_head", False),
            _image, trained_heads=("vision_projection", "text_projection", "itm_head"),
            description=f"BLIP-2 {'tiny' if _size == 'tiny' else 'ViT-g/14 (blip2-itm-vit-g shape, 1.2 B)'} "
                        "image-text retrieval: Q-Former ITC + ITM", interface="blip2",
            extra={"model_class": "Blip2ForImageTextRetrieval", "config_class": "Blip2Config",
                   "text_key": "qformer_config"},
        ),
        "Blip2ForImageTextRetrieval" if _size == "full" else None,
    )
    _lm = "opt-tiny" if _size == "tiny" else "opt-2.7b"
    register_backbone(
        BackboneSpec(
            f"blip2-{_lm}-vqa", "blip2", "vqa", _shape(_size, "vqa"), _presets("", True), _image,
            description=f"BLIP-2 {'tiny' if _size == 'tiny' else 'ViT-g/14 + OPT-2.7B (3.9 B)'} VQA: "
                        "Q-Former queries prefix a frozen language model", interface="blip2",
            extra={"model_class": "Blip2ForConditionalGeneration", "config_class": "Blip2Config",
                   "text_key": "text_config"},
        ),
        "Blip2ForConditionalGeneration" if _size == "full" else None,
    )


def encode_media(model, pixels):
    """Vision tokens (and the [CLS], unused by BLIP-2): the ViT tower is BLIP's, as are its
    video and resolution conventions."""
    return blip.encode_media(model, pixels)


def query_tokens(model, batch_size: int):
    """The learned queries, (B, Q, 768). They are a parameter of the model root, which no
    submodule call gathers under ZeRO-3, so they are gathered here (frozen: a copy is enough)."""
    with _gathered(model.query_tokens):
        q = model.query_tokens.detach().clone()
    return q.expand(batch_size, -1, -1)


def _ones(states):
    return torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)


def image_queries(model, image_tokens):
    """Q-Former query outputs attending over the vision tokens: (B, Q, 768)."""
    q = query_tokens(model, image_tokens.shape[0])
    return model.qformer(query_embeds=q, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=_ones(image_tokens)).last_hidden_state


def text_states(model, input_ids, attention_mask):
    """The Q-Former reading text alone (its [CLS] is the contrastive text feature)."""
    return model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                         attention_mask=attention_mask).last_hidden_state


def match_logits(model, input_ids, attention_mask, image_tokens, text_cls_context=None):
    """ITM logits (B, 2): queries and text together over the image; the head scores every query
    output and the scores are averaged, as BLIP-2 does. ICE adds the text context to each: the
    mean of ``text_cls_context`` (training), else its running context (evaluation)."""
    q = query_tokens(model, input_ids.shape[0])
    states = model.qformer(query_embeds=model.embeddings(input_ids=input_ids, query_embeds=q),
                           query_length=q.shape[1], attention_mask=torch.cat([_ones(q), attention_mask], 1),
                           encoder_hidden_states=image_tokens, encoder_attention_mask=_ones(image_tokens))
    queries = states.last_hidden_state[:, :q.shape[1]].to(model.itm_head.weight.dtype)
    context = context_module(model)
    if context is not None:
        queries = context(queries, text_cls_context)
    return model.itm_head(queries).mean(1)


def language_prefix(model, image_tokens):
    """The query outputs projected to the language model's width: its soft visual prompt."""
    queries = image_queries(model, image_tokens)
    return model.language_projection(queries.to(model.language_projection.weight.dtype))
