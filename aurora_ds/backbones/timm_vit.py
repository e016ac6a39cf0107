"""timm vision transformers (fused qkv), built by name with no weights."""

from __future__ import annotations

from ..aurora.targets import TargetPreset
from . import BackboneSpec, register_backbone, register_family


def _build(spec: BackboneSpec, checkpoint, dtype):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(spec.extra["arch"], pretrained=False, **spec.shape)
    if checkpoint is not None:
        weights = checkpoint / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"timm checkpoint {weights} does not exist")
        model.load_state_dict(load_file(str(weights)))
    return model.to(dtype)


register_family("timm", _build)

_ATTN = r"blocks\.\d+\.attn\.(qkv|proj)"
_MLP = r"blocks\.\d+\.mlp\.fc[12]"
_FULL = {"paper": TargetPreset((_ATTN, _MLP)), "all-linear": TargetPreset((_ATTN, _MLP))}
# ViT-g/14's MLP is 1408 -> 6144, not square blocks of 1408: attention only.
_ATTN_ONLY = {"paper": TargetPreset((_ATTN,)), "all-linear": TargetPreset((_ATTN,))}

register_backbone(
    BackboneSpec("vit-tiny", "timm", "vision", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                      "num_classes": 10}, _FULL, 32,
                 description="tiny timm ViT", extra={"arch": "vit_base_patch16_224"}),
    "VisionTransformer",
)
register_backbone(
    BackboneSpec("vit-base", "timm", "vision", {"num_classes": 0}, _FULL, 224,
                 description="timm ViT-B/16", extra={"arch": "vit_base_patch16_224"}),
)
register_backbone(
    BackboneSpec("vit-giant", "timm", "vision", {"num_classes": 0}, _ATTN_ONLY, 224,
                 description="timm ViT-g/14 (1.0 B parameters, width 1408)", extra={"arch": "vit_giant_patch14_224"}),
)
