"""Registry of supported backbones: named shapes, Aurora target maps, build and load.

Every entry builds with random weights from its config (tests, demos, scaling runs) or loads
from a local checkpoint directory (``save_pretrained`` layout for transformers models,
``model.safetensors`` for timm). Nothing is ever downloaded. Heavy imports (transformers,
timm) happen only when a model is built.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..aurora.targets import TargetPreset, register_presets


@dataclass(frozen=True)
class BackboneSpec:
    """``family`` picks the builder; ``task`` the interface (retrieval, vqa, clip, vision);
    ``shape`` holds the config values of this size; ``interface`` names the model interface
    the tasks drive (``blip`` or ``blip2``: ``backbones/blip.py``, ``blip2.py``) and, with the
    task, picks the objective (``tasks/objectives.py``); empty for models aurora-train does not
    serve (CLIP, timm towers)."""

    name: str
    family: str
    task: str
    shape: dict
    presets: dict[str, TargetPreset]
    image_size: int
    trained_heads: tuple[str, ...] = ()
    description: str = ""
    interface: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """The vocabulary a tokenizer must fit: that of the config section holding the text
        model the task tokenizes for (``extra["text_key"]``), or transformers' default."""
        section = self.shape.get(self.extra.get("text_key", "text_config"), {})
        return section.get("vocab_size", self.extra.get("default_vocab_size", 30524))


_REGISTRY: dict[str, BackboneSpec] = {}
_BUILDERS: dict[str, Callable] = {}
# The one precision table: config name -> the torch dtype a backbone is built in (bytes per
# element: ``.itemsize``).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def register_backbone(spec: BackboneSpec, model_class: str | None = None):
    """Add ``spec``; its presets are found by backbone name, and by class name if given."""
    _REGISTRY[spec.name] = spec
    register_presets(spec.name, spec.presets)
    if model_class:
        register_presets(model_class, spec.presets)


def register_family(family: str, builder: Callable):
    _BUILDERS[family] = builder


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {list_backbones()}")
    return _REGISTRY[name]


def backbone_config(name: str, checkpoint: str | Path | None = None):
    """The transformers config a backbone will be built from, without building it: the
    checkpoint's ``config.json`` (what every check against the loaded model uses), else the
    registry shape. An error names the path when the checkpoint has no readable config."""
    import transformers

    spec = get_spec(name)
    if "config_class" not in spec.extra:
        raise ValueError(f"backbone {name!r} has no transformers config")
    cls = getattr(transformers, spec.extra["config_class"])
    if checkpoint is None:
        return cls(**spec.shape)
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"backbone.checkpoint: checkpoint directory {path} for backbone {name!r} does not "
                                "exist (nothing is downloaded: save the model there with save_pretrained first)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"backbone.checkpoint={path}: no config.json there (a save_pretrained directory "
                                f"of {spec.extra['model_class']} is expected; nothing is downloaded)")
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"backbone.checkpoint={path}: config.json is not a {spec.extra['config_class']}: {e}") from None


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


WEIGHTS_DIGEST_CACHE = ".aurora_weights_sha256.json"


def checkpoint_identity(checkpoint) -> dict:
    """What identifies a checkpoint directory: the SHA-256 over its ``config.json``, its weight
    index (a sharded checkpoint's) and the names and sizes of its weight files (``sha256``, the
    form adapters recorded first), the SHA-256 of the weight bytes themselves
    (``weights_sha256``: two checkpoints of one config, such as BLIP's COCO and Flickr ITM, differ
    only there) and the config's ``architectures``. A copy moved elsewhere keeps it; another
    model, or the same one re-saved in another dtype or sharding, changes it."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"backbone.checkpoint: checkpoint directory {path} does not exist")
    digest = hashlib.sha256()
    for name in ("config.json", *WEIGHT_INDEXES):
        if (path / name).is_file():
            digest.update(f"{name}\0".encode() + (path / name).read_bytes() + b"\0")
    files = [f for f in sorted(path.iterdir()) if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    weights = {f.name: f.stat().st_size for f in files}
    for name, size in weights.items():
        digest.update(f"{name}\0{size}\0".encode())
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "weights": weights,
            "weights_sha256": weights_digest(path, files), "architectures": checkpoint_architectures(path)}


def checkpoint_architectures(path) -> list[str]:
    """The model classes a checkpoint's ``config.json`` says it holds (empty when it says none)."""
    import json

    try:
        return list(json.loads(Path(path, "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def weights_digest(path: Path, files: list[Path]) -> str:
    """SHA-256 over the bytes of the weight ``files`` (GBs for BLIP-2: read once), cached in
    ``WEIGHTS_DIGEST_CACHE`` beside them per file name, size and mtime; a read-only directory
    is read every time instead."""
    import json

    cache_file = path / WEIGHTS_DIGEST_CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = {f.name: f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files}
    fresh = {}
    for f in files:
        known = cache.get(f.name) or {}
        if known.get("key") == keys[f.name]:
            fresh[f.name] = known
            continue
        one = hashlib.sha256()
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                one.update(block)
        fresh[f.name] = {"key": keys[f.name], "sha256": one.hexdigest()}
    if fresh != cache:
        try:
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh, indent=1, sort_keys=True))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only checkpoint: digested again next time
    digest = hashlib.sha256()
    for name in sorted(fresh):
        digest.update(f"{name}\0{fresh[name]['sha256']}\0".encode())
    return digest.hexdigest()


def text_vocab_size(spec: BackboneSpec, config) -> int:
    """The vocabulary a tokenizer must fit, read from the (loaded) config: the section holding
    the text model the task tokenizes for."""
    section = getattr(config, spec.extra.get("text_key", "text_config"), None)
    return int(getattr(section, "vocab_size", None) or spec.vocab_size)


def build_backbone(name: str, checkpoint: str | Path | None = None, dtype: torch.dtype = torch.float32,
                   zero3: dict | None = None):
    """The backbone ``name`` with random weights, or loaded from the local ``checkpoint`` dir.

    Built directly partitioned across ranks for ZeRO-3: the transformers families when called
    while a ``transformers.integrations.HfDeepSpeedConfig`` is alive (kept for the whole run,
    as ``aurora-train`` does: transformers also reads it in ``generate``); the timm towers when
    given the DeepSpeed config as ``zero3`` (``deepspeed.init_distributed`` must have run).
    """
    spec = get_spec(name)
    if zero3 is not None and spec.family != "timm":
        raise ValueError(f"{name} is a transformers model: build it while a transformers.integrations."
                         "HfDeepSpeedConfig(ds_config) is alive instead of passing zero3")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {checkpoint} for backbone {name!r} does not exist "
                f"(nothing is downloaded: save the model there with save_pretrained first)"
            )
    if spec.family == "timm":
        return _BUILDERS[spec.family](spec, checkpoint, dtype, zero3)
    return _BUILDERS[spec.family](spec, checkpoint, dtype)


from . import blip2, hf, timm_vit  # noqa: E402,F401  (each registers its families and entries)
from .probe import example_batch, forward_features  # noqa: E402,F401  (re-exported)
