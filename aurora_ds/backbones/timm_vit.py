"""timm vision transformers (fused qkv) and EVA, built by name with no weights."""

from __future__ import annotations

import contextlib

import torch

from ..aurora.targets import TargetPreset
from . import BackboneSpec, register_backbone, register_family
from .loading import load_weights


def _build(spec: BackboneSpec, checkpoint, dtype, zero3=None):
    import timm  # before zero.Init: importing timm inside it breaks torch's dynamo decorators

    with _default_dtype(dtype), _partitioned(zero3, dtype):  # never a whole fp32 copy first
        model = timm.create_model(spec.extra["arch"], pretrained=False, **spec.shape)
    if checkpoint is not None:
        if not (checkpoint / "model.safetensors").is_file():
            raise FileNotFoundError(f"timm checkpoint {checkpoint / 'model.safetensors'} does not exist")
        unused = load_weights(model, checkpoint).unused_keys
        if unused:
            raise ValueError(f"{checkpoint / 'model.safetensors'} holds tensors the model does not have: {unused[:5]}")
    for module in model.modules():
        # EVA attention with q/v biases calls F.linear on qkv.weight unless the bias is added
        # separately, which would bypass an adapted qkv silently; separate is the same sum.
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return model if zero3 is not None else model.to(dtype)


def _partitioned(zero3, dtype):
    if zero3 is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=zero3, dtype=dtype)


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


register_family("timm", _build)

_ATTN = r"blocks\.\d+\.attn\.(qkv|proj)"
_MLP = r"blocks\.\d+\.mlp\.(fc1|fc1_g|fc1_x|fc2)"  # fc1_g/fc1_x: SwiGLU (EVA-02)
# A 1408 -> 6144 MLP (ViT-g, EVA giant) is adapted between two widths (aurora/layer.py).
_PRESETS = {"paper": TargetPreset((_ATTN, _MLP)), "all-linear": TargetPreset((_ATTN, _MLP))}
_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def _vit(name: str, arch: str, shape: dict, image_size: int, description: str, model_class: str | None = None):
    register_backbone(BackboneSpec(name, "timm", "vision", shape, _PRESETS, image_size, description=description,
                                   extra={"arch": arch}), model_class)


_vit("vit-tiny", "vit_base_patch16_224", _TINY, 32, "tiny timm ViT", "VisionTransformer")
_vit("vit-base", "vit_base_patch16_224", {"num_classes": 0}, 224, "timm ViT-B/16")
_vit("vit-huge", "vit_huge_patch14_224", {"num_classes": 0}, 224, "timm ViT-H/14 (0.63 B parameters, width 1280)")
_vit("vit-giant", "vit_giant_patch14_224", {"num_classes": 0}, 224,
     "timm ViT-g/14 (1.0 B parameters, width 1408, MLP 6144)")
_vit("vit-gigantic", "vit_gigantic_patch14_224", {"num_classes": 0}, 224,
     "timm ViT-G/14 (1.8 B parameters, width 1664, MLP 8192)")
# EVA's blocks name their layers as timm's ViT does; the tiny shape keeps ViT-g's MLP ratio.
_vit("eva-tiny", "eva_giant_patch14_224", {**_TINY, "embed_dim": 48, "mlp_ratio": 208 / 48}, 32,
     "tiny EVA with a 48 -> 208 MLP (two widths, as EVA giant)", "Eva")
_vit("eva-giant", "eva_giant_patch14_224", {"num_classes": 0}, 224,
     "timm EVA giant/14, BLIP-2's vision tower (1.0 B parameters, width 1408, MLP 6144)")
