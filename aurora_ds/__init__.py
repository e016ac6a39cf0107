"""aurora_ds: Aurora mode-approximation tuning of large multimodal backbones at scale."""

from . import backbones  # noqa: F401  (registers the backbones' target presets)
from .aurora import AuroraConfig, AuroraModel, inject_aurora, load_adapter
from .backbones import build_backbone, list_backbones

__all__ = ["AuroraConfig", "AuroraModel", "build_backbone", "inject_aurora", "list_backbones", "load_adapter"]
