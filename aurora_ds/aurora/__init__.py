"""The Aurora method alone: factors, adapted linear layers, injection, GQT/ICE, adapter files.

Depends on torch (and safetensors for the file format) only.
"""

from .config import AuroraConfig
from .extras import ContextEnhancement, GatedQueryTransform
from .io import read_adapter_config, write_adapter
from .layer import AuroraFactors, AuroraLinear
from .model import AuroraModel, as_one_call, context_module, inject_aurora, load_adapter, numel
from .targets import TargetPreset, register_presets

__all__ = [
    "AuroraConfig",
    "AuroraFactors",
    "AuroraLinear",
    "AuroraModel",
    "ContextEnhancement",
    "GatedQueryTransform",
    "TargetPreset",
    "as_one_call",
    "context_module",
    "inject_aurora",
    "load_adapter",
    "numel",
    "read_adapter_config",
    "register_presets",
    "write_adapter",
]
