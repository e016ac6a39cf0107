"""Run configuration as plain values, in sections: recipe YAML, then ``--set section.key=value``.

One nested dataclass, ``TrainConfig``, with one section per concern::

    backbone   what is adapted: registry name, checkpoint and tokenizer directories, heads
    aurora     the adapter itself: an ``AuroraConfig`` (aurora/config.py), not a copy of it
    data       media kind, shard URL specs, image size, frames, words, loader workers
    objective  the task and its loss: temperature, queue, distillation, ITM, negatives
    optim      batch size, accumulation, optimizer, learning rate and schedule, length
    eval       evaluation batch size, k_test, QA inference and answer list, how often
    engine     DeepSpeed on/off and its config, precision, activation checkpointing, seed
    output     run directory, resume, checkpoint/log cadence, progress bar

Every key has a default here. A recipe, ``--set`` or a dict of overrides naming an unknown
section or key, or giving a value of the wrong type, is an error naming it and listing the
known ones; so is a float key given ``nan`` or ``inf``. Per-width ranks are mappings end to end:
``aurora: {ranks: {1408: 64}}`` in YAML, ``--set 'aurora.ranks={1408: 64, 768: 32}'`` on the
command line (a YAML flow mapping).

``aurora-eval`` has its own small ``EvalRunConfig``; the rest of its run configuration comes
from the adapter, which records the run that wrote it (see ``EvalRunConfig.run_config``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..aurora.config import AuroraConfig
from ..backbones import PRECISIONS
from ..data.loader import LoaderConfig



def _choice(section: str, key: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{section}.{key} must be one of {tuple(allowed)}, got {value!r}")


def _not_negative(section: str, obj, *keys):
    for key in keys:
        if getattr(obj, key) < 0:
            raise ValueError(f"{section}.{key} must be >= 0, got {getattr(obj, key)!r}")


def _positive(section: str, obj, *keys):
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ValueError(f"{section}.{key} must be > 0, got {getattr(obj, key)!r}")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, which a launcher or SLURM may bind to
    fewer than the node has (os.cpu_count where there is no mask, as on macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class BackboneSection:
    name: str = "blip-tiny-retrieval"  # a registered backbone (aurora_ds.backbones)
    checkpoint: str = ""  # local backbone directory; empty = random init from the named config
    tokenizer: str = ""  # tokenizer directory; empty = the checkpoint's (required for a checkpoint)
    # train a WordPiece tokenizer on data.train_shards' text: for random weights only (no
    # checkpoint, or a random-weight one such as the demo's); a pretrained checkpoint without
    # its tokenizer is an error, never a fallback
    train_tokenizer: bool = False
    train_heads: bool = True  # also train the backbone's small task heads (ITM, projections)
    # BLIP's own token conventions (the Salesforce checkpoints were trained with them): [DEC]/[ENC]
    # added to a tokenizer lacking them, [ENC] at position 0 of matching and the VQA question
    # encoder. false: [CLS] there, as transformers' BLIP classes do. BLIP-2 keeps its own.
    blip_special_tokens: bool = True


@dataclass
class DataSection:
    """The loader's keys default to the loader's own defaults (data.LoaderConfig): one set."""

    source: str = "shards"  # shards | synthetic
    media: str = "image"  # image | video
    train_shards: str = ""
    eval_shards: str = ""  # validation: periodic evaluation, and the choice of adapter_best
    test_shards: str = ""  # test: the chosen adapter (adapter_best, else the last) evaluated once at the end
    # BLIP counts an epoch in captions: "all" = one training pair per caption per epoch (the
    # paper's recipes); "random" = one pair per image/video, a random caption (OpenCLIP's).
    caption_per_sample: str = LoaderConfig.caption_per_sample
    resampled: bool = LoaderConfig.resampled  # draw shards with replacement (OpenCLIP's --dataset-resampled)
    # training pairs per epoch over all ranks: required with resampled; otherwise, when > 0, the
    # epoch length in place of the manifest's counts (0 = the manifest's)
    train_num_samples: int = 0
    image_size: int = 0  # 0 = the backbone's
    num_frames: int = LoaderConfig.num_frames
    frame_sampling: str = LoaderConfig.frame_sampling  # uniform | random | headtail
    max_words: int = LoaderConfig.max_words
    num_workers: int = LoaderConfig.num_workers
    shuffle_buffer: int = LoaderConfig.shuffle_buffer  # training items held for shuffling per loader worker (<= 1: none)
    # a tar member larger than this is not read: its sample is skipped (member_too_large), so one
    # huge file cannot grow a loader worker by its size; far above COCO images and MSRVTT clips
    max_member_mb: float = LoaderConfig.max_member_mb

    def __post_init__(self):
        _choice("data", "source", self.source, ("shards", "synthetic"))
        _choice("data", "media", self.media, ("image", "video"))
        _choice("data", "frame_sampling", self.frame_sampling, ("uniform", "random", "headtail"))
        _choice("data", "caption_per_sample", self.caption_per_sample, ("random", "all"))
        _positive("data", self, "num_frames", "max_words", "max_member_mb")  # (float keys are finite: _scalar)
        _not_negative("data", self, "train_num_samples", "num_workers", "shuffle_buffer")
        # An error, not a silent cap: the worker count decides how shards are split and where a
        # resume continues, so the run must use the count its configuration records.
        cpus = usable_cpus()
        if self.num_workers > cpus:
            raise ValueError(f"data.num_workers={self.num_workers} is more than the {cpus} CPU(s) this process may "
                             f"use: each worker is a process decoding media, more only compete for the same CPUs; "
                             f"set data.num_workers to at most {cpus}")
        if self.resampled and not self.train_num_samples:
            raise ValueError("data.resampled=true needs data.train_num_samples: shards drawn with replacement have "
                             "no end, so an epoch is that many training pairs (over all ranks)")


@dataclass
class ObjectiveSection:
    task: str = "retrieval"  # retrieval | qa
    temp: float = 0.07
    queue_size: int = 57600
    alpha: float = 0.4
    momentum: float = 0.995
    distill: bool = True
    itm: bool = True
    negatives_all_ranks: bool = True
    frame_aware_attention: bool = False

    def __post_init__(self):
        _choice("objective", "task", self.task, ("retrieval", "qa"))
        _positive("objective", self, "temp")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"objective.momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"objective.alpha must be in [0, 1], got {self.alpha!r}")


@dataclass
class OptimSection:
    batch_size: int = 16  # per rank, per micro-step
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs x steps per epoch
    clip_grad: float = 0.0

    def __post_init__(self):
        _choice("optim", "optimizer", self.optimizer, ("adamw", "sgd"))
        _positive("optim", self, "batch_size", "grad_accum", "epochs", "lr")
        _not_negative("optim", self, "weight_decay", "warmup_steps", "max_steps", "clip_grad")


@dataclass
class EvalSection:
    batch_size: int = 32
    k_test: int = 128  # retrieval: candidates re-ranked by ITM per query
    inference: str = "candidates"  # QA: candidates (BLIP's ranking over the answer list) | generate
    max_new_tokens: int = 10  # QA generate: the longest answer, in tokens (BLIP and BLIP-2 use 10)
    answer_list: str = ""  # QA: JSON list of answers; empty = the most frequent training answers
    every: int = 0  # evaluate every N steps (0 = at the end only)
    at_start: bool = True  # also before the first step: the frozen model's metrics (Aurora starts as the identity)

    def __post_init__(self):
        _choice("eval", "inference", self.inference, ("candidates", "generate"))
        _positive("eval", self, "batch_size", "k_test", "max_new_tokens")
        _not_negative("eval", self, "every")


@dataclass
class EngineSection:
    deepspeed: bool = True
    ds_config: str = "zero3"  # auto (aurora-plan recommends) | a name in ds_configs/ (dsconfig.shipped_ds_configs) | path
    precision: str = "fp32"  # a PRECISIONS name
    activation_checkpointing: bool = False
    seed: int = 42
    collective_timeout_s: int = 600  # a rank waiting longer than this in one collective fails
    compile: str = "off"  # off | on | auto: the training step captured as one graph (backend.compile_step)

    def __post_init__(self):
        _choice("engine", "precision", self.precision, PRECISIONS)
        _choice("engine", "compile", self.compile, ("off", "on", "auto"))
        _positive("engine", self, "collective_timeout_s")


@dataclass
class OutputSection:
    dir: str = "runs/aurora"
    resume: str = ""  # "" | auto | a checkpoint directory
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2  # 0 = keep all
    progress: bool = True

    def __post_init__(self):
        _not_negative("output", self, "save_every", "keep_checkpoints")
        _positive("output", self, "log_every")


SECTIONS = {
    "backbone": BackboneSection, "aurora": AuroraConfig, "data": DataSection, "objective": ObjectiveSection,
    "optim": OptimSection, "eval": EvalSection, "engine": EngineSection, "output": OutputSection,
}
# AuroraConfig fields that are not configuration keys: the run fills them in (adapter_config()).
_NOT_KEYS = {"aurora": {"backbone"}}


@dataclass
class TrainConfig:
    """The whole run. Build it with ``build_config``; every section validates its own keys."""

    backbone: BackboneSection = field(default_factory=BackboneSection)
    aurora: AuroraConfig = field(default_factory=AuroraConfig)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    engine: EngineSection = field(default_factory=EngineSection)
    output: OutputSection = field(default_factory=OutputSection)
    recipe: str = ""  # the recipe it was built from (recorded, not a key)

    def __post_init__(self):
        if self.data.source == "shards" and not self.data.train_shards:
            raise ValueError("data.train_shards is empty: give a URL spec (--set data.train_shards=... or "
                             "--train-shards) or data.source=synthetic")
        if self.engine.compile == "on" and self.engine.deepspeed:
            raise ValueError("engine.compile=on captures the single-process step (engine.deepspeed=false) only: "
                             "under DeepSpeed the step's collectives and ZeRO-3's gather hooks are not captured yet")

    def adapter_config(self) -> AuroraConfig:
        """The ``aurora`` section as injected: with the backbone's name, and context enhancement
        only where there is a matching head (retrieval)."""
        return dataclasses.replace(self.aurora, backbone=self.backbone.name,
                                   context_enhancement=self.aurora.context_enhancement and self.objective.task == "retrieval")

    def to_dict(self) -> dict:
        """Nested plain values (JSON-safe); ``build_config(base=...)`` reads them back."""
        out = {}
        for name in SECTIONS:
            values = dataclasses.asdict(getattr(self, name))
            for key in _NOT_KEYS.get(name, ()):
                values.pop(key)
            out[name] = values
        out["recipe"] = self.recipe
        return out


# ---- building: defaults, then a base (a recorded run), a recipe, then overrides ----------------


def section_keys(section: str) -> dict[str, object]:
    """The keys of a section and their types."""
    hints = typing.get_type_hints(SECTIONS[section])
    return {f.name: hints[f.name] for f in dataclasses.fields(SECTIONS[section])
            if f.name not in _NOT_KEYS.get(section, ())}


def known_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in section_keys(s)]


def _scalar(where: str, value, typ):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # nan passes every range check (each comparison is false) and inf passes "> 0":
            # refused here, for every float key at once, before anything is built.
            if not math.isfinite(number):
                raise ValueError(f"config key {where!r} must be a finite number, got {value!r}")
            return number
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"config key {where!r} expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _structured(where: str, value, kind: str):
    """A mapping or list from YAML, or from a ``--set`` string written as YAML flow syntax."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"config key {where!r} expects a YAML {kind}, e.g. "
                             f"{'{1408: 64}' if kind == 'mapping' else '[a, b]'}, got {value!r}") from None
    if value is None:
        value = {} if kind == "mapping" else []
    if not isinstance(value, dict if kind == "mapping" else list):
        raise ValueError(f"config key {where!r} expects a {kind}, got {value!r}")
    return value


def _coerce(where: str, value, typ):
    """Bring a YAML or command-line value to the key's type, or fail naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is dict:
        mapping = _structured(where, value, "mapping")
        return {_scalar(f"{where}[{k}]", k, args[0]): _scalar(f"{where}[{k}]", v, args[1]) for k, v in mapping.items()}
    if origin is list:
        return [_scalar(f"{where}[{i}]", v, args[0]) for i, v in enumerate(_structured(where, value, "list"))]
    if origin in (types.UnionType, typing.Union):  # str | list[str]: a list when given one
        is_list = isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("["))
        listed = [a for a in args if typing.get_origin(a) is list]
        return _coerce(where, value, listed[0] if is_list and listed else next(a for a in args if a not in listed))
    return _scalar(where, value, typ)


def _merge(values: dict, where: str, data: dict):
    """Merge nested ``{section: {key: value}}`` or dotted ``{"section.key": value}`` into values."""
    for name, value in data.items():
        name = str(name)
        if name == "recipe":
            continue  # recorded by build_config, not a key
        section, dot, key = name.partition(".")
        if section not in SECTIONS:
            hint = [k for k in known_keys() if k.endswith("." + section)]
            raise ValueError(f"unknown config section {section!r} in {where}"
                             + (f" (did you mean {hint[0]!r}?)" if hint and not dot else "")
                             + f"; known sections: {list(SECTIONS)}")
        entries = {key: value} if dot else value
        if not isinstance(entries, dict):
            raise ValueError(f"config section {section!r} in {where} must be a mapping of keys to values, "
                             f"got {value!r}; known keys: {sorted(section_keys(section))}")
        keys = section_keys(section)
        for k, v in entries.items():
            k = str(k)
            if k not in keys:
                nested = "." in k and k.split(".")[0] in keys
                raise ValueError(f"unknown config key {section + '.' + k!r} in {where}; "
                                 + (f"set the whole mapping, e.g. {section}.{k.split('.')[0]}={{1408: 64}}; "
                                    if nested else "")
                                 + f"known keys of {section!r}: {sorted(keys)}")
            values.setdefault(section, {})[k] = _coerce(f"{section}.{k}", v, keys[k])


def build_config(recipe: str = "", overrides: list[str] | dict | None = None, *, base: dict | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a recorded ``to_dict()``), the recipe, then the overrides
    (``section.key=value`` strings, or a dict of ``"section.key"`` keys or nested sections)."""
    sources = [("the recorded run configuration", base or {})]
    if recipe:
        sources.append((f"recipe {recipe!r}", load_recipe(recipe)))
    sources.append(("overrides", overrides) if isinstance(overrides, dict) else ("--set", _pairs(overrides or [])))
    return _build(sources, recipe or (base or {}).get("recipe", ""))


def _build(sources, recipe: str) -> TrainConfig:
    values: dict = {}
    for where, data in sources:
        _merge(values, where, data)
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values.get(name, {}))
        except ValueError as e:
            raise ValueError(f"config section {name!r}: {e}") from None
    return TrainConfig(**sections, recipe=recipe)


def _pairs(items: list[str]) -> dict:
    """``["section.key=value", ...]`` -> ``{"section.key": "value"}``."""
    pairs = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ValueError(f"--set expects section.key=value, got {item!r}; known keys: {known_keys()}")
        pairs[key.strip()] = value
    return pairs


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("aurora_ds.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict:
    """A packaged recipe by name, or a YAML file by path: a mapping of sections to mappings."""
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
        raise ValueError(f"recipe {name!r} must be a mapping of sections ({list(SECTIONS)}) to keys and values")
    return data


# ---- aurora-eval ----------------------------------------------------------------------------


@dataclass
class EvalRunConfig:
    """What ``aurora-eval`` needs beyond the adapter's own run configuration."""

    adapter: str = ""  # adapter directory (adapter_config.json + adapter.safetensors); "" = zero-shot
    shards: str = ""  # URL spec of the evaluation shards
    out: str = "runs/eval"  # metrics (and QA result files) go to out/eval/
    batch_size: int = 0  # 0 = the run's eval.batch_size
    k_test: int = 0  # 0 = the run's eval.k_test
    precision: str = ""  # "" = the run's engine.precision
    deepspeed: bool = True
    ds_config: str = ""  # "" = the run's engine.ds_config
    recipe: str = ""  # instead of the recorded run configuration (needed where there is none)
    overrides: list[str] = field(default_factory=list)  # --set section.key=value, on top

    def run_config(self) -> TrainConfig:
        """The run configuration the adapter records (else, for an adapter without a record, the
        recipe), the recipe on top if one is given, the adapter's own ``aurora`` section and what
        it carries (tokenizer, answer list, image size), the ``--set`` overrides, then this
        config's values. Whether the result still fits the adapter is checked by ``evaluate``."""
        from ..aurora.io import read_adapter_config
        from .adapter_record import carried_values

        if not self.adapter and not self.recipe:
            raise ValueError("--zero-shot evaluates the frozen checkpoint of a recipe: give --recipe (and "
                             "--set backbone.checkpoint=DIR)")
        meta = read_adapter_config(self.adapter) if self.adapter else {}
        record = meta.get("run")
        if self.adapter and record is None and not self.recipe:
            raise ValueError(f"adapter {self.adapter} does not record the run that trained it (adapter format "
                             f"{meta['format_version']}, or saved by the Python API): give --recipe and --set "
                             "backbone.checkpoint=DIR, backbone.tokenizer=DIR (and eval.answer_list=FILE for QA)")
        sources = [(f"the run configuration recorded in adapter {self.adapter}", record["config"])] if record else []
        if self.recipe:
            sources.append((f"recipe {self.recipe!r}", load_recipe(self.recipe)))
        if self.adapter:
            aurora = dict(meta["aurora"])
            backbone = aurora.pop("backbone", None)
            own = {"aurora": aurora, **carried_values(self.adapter, record)} if record else {"aurora": aurora}
            if record is None and backbone:  # an adapter without a record names its backbone only here
                own["backbone.name"] = backbone
            sources.append((f"adapter {self.adapter}", own))
        sources.append(("--set", _pairs(self.overrides)))
        values = {"data.eval_shards": self.shards, "data.train_shards": self.shards, "data.test_shards": "",
                  "data.source": "shards",
                  "output.dir": self.out, "output.resume": "", "engine.deepspeed": self.deepspeed}
        for key, value in (("eval.batch_size", self.batch_size), ("eval.k_test", self.k_test),
                           ("engine.precision", self.precision), ("engine.ds_config", self.ds_config)):
            if value:
                values[key] = value
        sources.append(("aurora-eval", values))
        return _build(sources, self.recipe or (record or {}).get("config", {}).get("recipe", ""))
