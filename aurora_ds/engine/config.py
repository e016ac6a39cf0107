"""Run configuration as plain values: recipe YAML, then ``--set key=value`` overrides.

Every key has a default here; a recipe or an override naming an unknown key, or giving a
value of the wrong type, is an error before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # what to train
    recipe: str = ""
    task: str = "retrieval"  # retrieval | qa
    media: str = "image"  # image | video
    backbone: str = "blip-tiny-retrieval"
    checkpoint: str = ""  # local backbone directory; empty = random init from the named config
    tokenizer: str = ""  # tokenizer directory; empty = the checkpoint's, or trained on the captions
    # Aurora
    rank: int = 32
    ranks: str = ""  # per hidden width, "1408:64,768:32"
    tower_ranks: str = ""  # own factor sets per tower (module prefix), "qformer:16"
    targets: str = "paper"
    dropout: float = 0.1
    scale: float = 1.0
    context_enhancement: bool = True
    context_scale: float = 0.1
    gated_query: bool = True
    gated_query_scale: float = 0.1
    train_heads: bool = True
    # data
    data: str = "shards"  # shards | synthetic
    train_shards: str = ""
    eval_shards: str = ""
    train_num_samples: int = 0
    image_size: int = 0  # 0 = the backbone's
    num_frames: int = 8
    frame_sampling: str = "uniform"
    max_words: int = 30
    num_workers: int = 2
    # optimisation
    batch_size: int = 16  # per rank, per micro-step
    eval_batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs x steps per epoch
    clip_grad: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    seed: int = 42
    # retrieval objective
    temp: float = 0.07
    queue_size: int = 57600
    alpha: float = 0.4
    momentum: float = 0.995
    distill: bool = True
    itm: bool = True
    negatives_all_ranks: bool = True
    frame_aware_attention: bool = False
    k_test: int = 128
    # qa
    inference: str = "rank"  # rank | generate
    answer_list: str = ""
    # engine
    deepspeed: bool = True
    ds_config: str = "zero3"
    out_dir: str = "runs/aurora"
    resume: str = ""  # "" | auto | a checkpoint directory
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        choices = {
            "task": ("retrieval", "qa"), "media": ("image", "video"), "data": ("shards", "synthetic"),
            "optimizer": ("adamw", "sgd"), "precision": ("fp32", "bf16", "fp16"),
            "frame_sampling": ("uniform", "random", "headtail"), "inference": ("rank", "generate"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("rank", "batch_size", "eval_batch_size", "grad_accum", "epochs", "num_frames", "max_words"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("lr", "temp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.momentum < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("dropout and momentum must be in [0, 1), alpha in [0, 1]")
        parse_rank_map("ranks", self.ranks, int)
        parse_rank_map("tower_ranks", self.tower_ranks, str)
        if self.data == "shards" and not self.train_shards:
            raise ValueError("train_shards is empty: give a URL spec (--set train_shards=...) or data=synthetic")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def parse_rank_map(key: str, text: str, key_type) -> dict:
    """ "a:8,b:16" -> {a: 8, b: 16}, or an error naming the config key."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rank = item.partition(":")
        try:
            out[key_type(name.strip())] = int(rank)
        except ValueError:
            raise ValueError(f"config key {key!r} expects 'name:rank,...' with integer ranks, got {text!r}") from None
        if out[key_type(name.strip())] <= 0:
            raise ValueError(f"config key {key!r}: rank of {name.strip()!r} must be > 0, got {text!r}")
    return out


def _coerce(key: str, value, typ):
    """Bring a YAML or command-line value to the field's type, or fail naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, dict):  # a YAML mapping for ranks / tower_ranks
            return ",".join(f"{k}:{v}" for k, v in value.items())
        return str(value)
    raise ValueError(f"config key {key!r} expects {typ.__name__}, got {value!r}")


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("aurora_ds.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict:
    """A packaged recipe by name, or a YAML file by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text = path.read_text()
    else:
        resource = resources.files("aurora_ds.recipes") / f"{name}.yaml"
        if not resource.is_file():
            raise ValueError(f"unknown recipe {name!r}; known recipes: {list_recipes()}")
        text = resource.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {name!r} must be a mapping of keys to values")
    return data


def build_config(recipe: str = "", overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults, then the recipe, then the overrides (``key=value`` strings or a dict)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    values: dict = {}
    sources = []
    if recipe:
        sources.append((f"recipe {recipe!r}", load_recipe(recipe)))
        values["recipe"] = recipe
    if isinstance(overrides, dict):
        sources.append(("overrides", overrides))
    elif overrides:
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value
        sources.append(("--set", pairs))
    for where, data in sources:
        for key, value in data.items():
            if key not in types:
                raise ValueError(f"unknown config key {key!r} in {where}; known keys: {sorted(types)}")
            values[key] = _coerce(key, value, _TYPES[types[key]])
    return TrainConfig(**values)
