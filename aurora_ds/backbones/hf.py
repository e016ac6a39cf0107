"""transformers backbones: BLIP retrieval, BLIP VQA, CLIP (BLIP-2 is in blip2.py)."""

from __future__ import annotations

from pathlib import Path

from ..aurora.targets import TargetPreset
from . import BackboneSpec, backbone_config, register_backbone, register_family
from .loading import load_weights, uninitialised


def build_hf(spec: BackboneSpec, checkpoint, dtype):
    """Under ZeRO-3 (an ``HfDeepSpeedConfig`` alive) a checkpoint is loaded into the partitions
    as they are built, each rank reading its own share (``loading.py``), rather than through
    ``from_pretrained``, which has rank 0 read the whole model."""
    import transformers
    from transformers.integrations import is_deepspeed_zero3_enabled

    cls = getattr(transformers, spec.extra["model_class"])
    if checkpoint is None:
        config = getattr(transformers, spec.extra["config_class"])(**spec.shape)
        return cls._from_config(config, dtype=dtype)
    if not is_deepspeed_zero3_enabled():
        return cls.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
    model = empty_partitioned(cls, backbone_config(spec.name, checkpoint), dtype)
    model.load_report = load_weights(model, checkpoint)
    if (Path(checkpoint) / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(checkpoint, local_files_only=True)
    return model.eval()  # as from_pretrained returns it


def empty_partitioned(cls, config, dtype):
    """The model built straight into ZeRO-3 partitions with no initial values (the checkpoint
    overwrites them all). ``_from_config`` would then gather every module whole to initialise it
    (``initialize_weights_zero3``): at BLIP-2 OPT-2.7B two minutes of all-gathers on 2 CPU ranks,
    and a whole module at a time on every rank."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config
    from transformers.modeling_utils import local_torch_dtype, set_zero3_state

    config.dtype = dtype
    for key in config.sub_configs:
        if getattr(config, key, None) is not None:
            getattr(config, key).dtype = dtype
    # set_zero3_state: the sub-models' own _from_config must not open a second zero.Init
    with uninitialised(), local_torch_dtype(dtype, cls.__name__), \
            deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
        model = cls(config)
    model.tie_weights()  # uninitialised() skips init_weights, which ties them
    return model


register_family("hf", build_hf)

# Special-token ids of the tokenizers trained locally for the tiny shapes (see tokenizer.py).
TINY_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 3, "sep_token_id": 3}

VISION = r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc[12])"


def _text(tower: str) -> tuple[str, str, str]:
    """(paper, all-linear, gated-query) patterns for one BERT-style text tower of BLIP."""
    layer = rf"{tower}\.encoder\.layer\.\d+"
    cross = r"crossattention\.self\.(query|key|value)"
    paper = rf"{layer}\.(attention\.self\.(query|key|value)|{cross})"
    rest = r"(attention|crossattention)\.output\.dense|intermediate\.dense|output\.dense"
    return paper, rf"{layer}\.({rest})", rf"{layer}\.(attention|crossattention)"


def _blip_presets(towers: list[str], context: str) -> dict[str, TargetPreset]:
    text = [_text(t) for t in towers]
    paper = (VISION, *(t[0] for t in text))
    gated = tuple(t[2] for t in text)
    return {
        "paper": TargetPreset(paper, gated, context),
        "all-linear": TargetPreset(paper + tuple(t[1] for t in text), gated, context),
    }


def _blip_shape(size: str) -> dict:
    """BlipVisionConfig's default initializer_range is 1e-10 (a near-zero, constant vision tower
    when built without a checkpoint); random-init shapes use BERT's 0.02 instead."""
    shape = _blip_sizes(size)
    shape["vision_config"]["initializer_range"] = 0.02
    return shape


def _blip_sizes(size: str) -> dict:
    if size == "tiny":
        return {
            "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            "text_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "vocab_size": 1024, "max_position_embeddings": 64,
                            **TINY_TOKEN_IDS},
            "image_text_hidden_size": 16,
        }
    if size == "base":
        return {"vision_config": {"image_size": 384}, "text_config": {}}
    if size == "base-narrow":
        # BLIP-base's 12 + 12 layers and adapted linears at width 32: a step's host cost where its
        # arithmetic is negligible (aurora-bench step --sizes narrow).
        narrow = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2}
        return {"vision_config": {**narrow, "image_size": 32, "patch_size": 8}, "text_config": narrow}
    return {
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 384},
        "text_config": {},
    }


for _size in ("tiny", "base", "base-narrow", "large"):
    # BLIP-large's cross-attention key/value map 1024-d image tokens to 768-d text: layers
    # between two widths (aurora/layer.py).
    _image = _blip_shape(_size)["vision_config"].get("image_size", 384)
    register_backbone(
        BackboneSpec(
            f"blip-{_size}-retrieval", "hf", "retrieval", _blip_shape(_size),
            _blip_presets(["text_encoder"], "itm_head"), _image,
            trained_heads=("vision_proj", "text_proj", "itm_head"),
            description=f"BLIP-{_size} image-text retrieval (ITC + ITM heads)", interface="blip",
            extra={"model_class": "BlipForImageTextRetrieval", "config_class": "BlipConfig"},
        ),
        "BlipForImageTextRetrieval" if _size == "base" else None,
    )
    if _size == "base-narrow":  # a benchmark shape: retrieval only
        continue
    if _size == "large":
        # transformers' BlipForQuestionAnswering gives encoder and decoder one text config, so a
        # 1024-d vision tower also makes the decoder's cross-attention expect 1024-d question
        # states (they are 768-d): the large VQA shape does not run, so it is not registered.
        continue
    register_backbone(
        BackboneSpec(
            f"blip-{_size}-vqa", "hf", "vqa", _blip_shape(_size),
            _blip_presets(["text_encoder", r"text_decoder\.bert"], ""), _image,
            description=f"BLIP-{_size} VQA (question encoder + answer decoder)", interface="blip",
            extra={"model_class": "BlipForQuestionAnswering", "config_class": "BlipConfig"},
        ),
        "BlipForQuestionAnswering" if _size == "base" else None,
    )

_CLIP = r"(text|vision)_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
_CLIP_PRESETS = {"paper": TargetPreset((_CLIP,)), "all-linear": TargetPreset((_CLIP,))}
register_backbone(
    BackboneSpec(
        "clip-tiny", "hf", "clip",
        {"text_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "vocab_size": 1024, "max_position_embeddings": 64, **TINY_TOKEN_IDS},
         "vision_config": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
         "projection_dim": 16},
        _CLIP_PRESETS, 32, description="tiny CLIP with two widths (text 32, vision 48)",
        extra={"model_class": "CLIPModel", "config_class": "CLIPConfig"},
    ),
)
register_backbone(
    BackboneSpec(
        "clip-base", "hf", "clip",
        {"text_config": {}, "vision_config": {"patch_size": 16}},
        _CLIP_PRESETS, 224, description="CLIP ViT-B/16 shape (text 512, vision 768)",
        extra={"model_class": "CLIPModel", "config_class": "CLIPConfig", "default_vocab_size": 49408},
    ),
    "CLIPModel",
)
