"""DeepSpeed config files: recipe-decided fields filled the way transformers fills "auto".

A config may also spell a value out; if it contradicts the recipe that is an error, not a
silent winner. The optimizer and schedule always come from the recipe (one code path with
the ``--no-deepspeed`` reference), so a config that brings its own is refused.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import types
import typing
from importlib import resources
from pathlib import Path


def shipped_ds_configs() -> dict:
    """Name -> file of every config shipped in the ``ds_configs`` package (``zero3``, ...)."""
    folder = resources.files("ds_configs")
    return {entry.name[: -len(".json")]: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def resolve_ds_config(name: str):
    """A shipped config by name (``zero3``) or a path to a JSON file; the result has ``read_text``."""
    path = Path(name)
    if path.suffix == ".json" or len(path.parts) > 1:
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
        return path
    shipped = shipped_ds_configs()
    if name not in shipped:
        raise FileNotFoundError(f"unknown DeepSpeed config {name!r}; shipped configs: {sorted(shipped)} "
                                "(or give the path of a DeepSpeed JSON file)")
    return shipped[name]


def gpus_per_node(world_size: int) -> int:
    """Ranks per node as the launcher says: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (the
    deepspeed launcher); one node of ``world_size`` without a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)


def build_ds_config(name: str, cfg, world_size: int) -> dict:
    """The config ``name`` (a shipped name, a path, or ``auto``: the layout ``aurora-plan``
    recommends for this run) with every ``"auto"`` field filled from the recipe and the launch."""
    if name == "auto":
        from ..plan import choose_layout

        name = choose_layout(cfg, world_size, gpus_per_node(world_size))["ds_config"]
    path = resolve_ds_config(name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    for key in ("optimizer", "scheduler"):
        if key in raw:
            raise ValueError(
                f"{path}: remove the {key!r} section; aurora_ds builds the optimizer and the "
                f"warmup+cosine schedule from the recipe (optimizer, lr, weight_decay, warmup_steps)"
            )
    offload = raw.get("zero_optimization", {}).get("offload_param", {})
    if offload.get("device") == "nvme" and not Path(offload.get("nvme_path", "")).is_dir():
        raise ValueError(f"{path}: zero_optimization.offload_param.nvme_path {offload.get('nvme_path')!r} is not a "
                         "directory on this machine; point it at a local NVMe mount (DeepSpeed's async I/O op "
                         "must be built: DS_BUILD_AIO=1)")
    if cfg.engine.precision == "fp16" and not _has_gpu():
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    ds = copy.deepcopy(raw)
    wanted = {
        ("train_micro_batch_size_per_gpu",): cfg.optim.batch_size,
        ("gradient_accumulation_steps",): cfg.optim.grad_accum,
        ("train_batch_size",): cfg.optim.batch_size * cfg.optim.grad_accum * world_size,
        ("gradient_clipping",): cfg.optim.clip_grad,
        ("bf16", "enabled"): cfg.engine.precision == "bf16",
        ("fp16", "enabled"): cfg.engine.precision == "fp16",
    }
    if "zero_hpz_partition_size" in ds.get("zero_optimization", {}):
        # ZeRO++ hierarchical partitioning: the secondary copy spans one node's GPUs.
        wanted[("zero_optimization", "zero_hpz_partition_size")] = gpus_per_node(world_size)
    for keys, value in wanted.items():
        parent = ds
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
        current = parent.get(keys[-1], "auto")
        if current == "auto":
            parent[keys[-1]] = value
        elif current != value:
            where = ".".join(keys)
            hint = ""
            if keys == ("train_batch_size",):
                hint = f" (= batch_size {cfg.optim.batch_size} x grad_accum {cfg.optim.grad_accum} x world size {world_size})"
            raise ValueError(f"{path}: {where} is {current!r} but the recipe needs {value!r}{hint}")
    validate_ds_config(ds, path)
    return ds


# Top-level keys DeepSpeed reads. DeepSpeed itself ignores any other key, so a misspelt
# "zero_optimisation" would silently run stage 0; here it is an error.
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "bfloat16", "fp16", "amp", "torch_autocast", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "activation_checkpointing", "communication_data_type", "seq_parallel_communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "flops_profiler", "tensorboard", "wandb",
    "csv_monitor", "comet", "comms_logger", "aio", "data_types", "checkpoint", "elasticity", "compression_training",
    "data_efficiency", "autotuning", "nebula", "pipeline", "dataloader_drop_last", "compile", "timers",
    "monitor_config", "graph_harvesting", "use_data_before_expert_parallelism", "disable_allgather",
}


# Top-level keys the product fills or relies on, with their JSON types. DeepSpeed reads them as
# plain Python values, where ``true`` is the integer 1 and ``"1"`` a string.
TOP_LEVEL_TYPES = {
    "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
    "steps_per_print": int, "gradient_clipping": float, "zero_allow_untested_optimizer": bool,
    "zero_force_ds_cpu_optimizer": bool, "wall_clock_breakdown": bool, "memory_breakdown": bool,
    "prescale_gradients": bool, "gradient_predivide_factor": float, "sparse_gradients": bool,
}


def validate_ds_config(ds: dict, path) -> None:
    """Unknown top-level keys and values of the wrong type are errors naming the key and the file:
    the top-level keys of ``TOP_LEVEL_TYPES``, and zero_optimization, bf16 and fp16 checked with
    DeepSpeed's own schemas, after a stricter check of their JSON types (pydantic takes
    ``"stage": true`` as stage 1 and ``"overlap_comm": "false"`` as false)."""
    for key in ds:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            raise ValueError(f"{path}: unknown DeepSpeed config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, typ in TOP_LEVEL_TYPES.items():
        if key in ds:
            _check_json_type(path, key, ds[key], typ)
    from pydantic import ValidationError
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for key, schema in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                        ("fp16", DeepSpeedFP16Config)):
        section = ds.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {key} must be a JSON object, got {section!r}")
        _check_section_types(path, key, section, schema)
        try:
            schema(**section)
        except ValidationError as e:
            problems = "; ".join(f"{key}.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                                 for err in e.errors())
            raise ValueError(f"{path}: {problems}") from None


def _check_section_types(path, where: str, section: dict, schema) -> None:
    """Every bool, integer and number field of ``section`` against its pydantic ``schema``,
    nested schemas (offload_param, ...) included; other fields are left to the schema."""
    from pydantic import BaseModel

    fields = {}
    for name, info in schema.model_fields.items():
        fields[name] = fields[info.alias or name] = info.annotation
    for key, value in section.items():
        typ = fields.get(key)
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(options) == 1:
            typ = options[0]  # Optional[X]
        if isinstance(typ, type) and issubclass(typ, BaseModel) and isinstance(value, dict):
            _check_section_types(path, f"{where}.{key}", value, typ)
        elif isinstance(typ, type) and issubclass(typ, (bool, int, float)):  # an IntEnum (stage) is an int
            _check_json_type(path, f"{where}.{key}", value, bool if typ is bool else float if typ is float else int)


def _check_json_type(path, where: str, value, typ) -> None:
    """``value`` is a JSON boolean (``typ`` bool), a finite number (float) or a whole number (int:
    ``1e5`` counts, as DeepSpeed's own examples write it); never a boolean for a number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typ is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif typ is float:
        ok, expected = number, "a finite number"
    else:
        ok, expected = number and float(value).is_integer(), "an integer"
    if not ok:
        raise ValueError(f"{path}: {where} must be {expected}, got {json.dumps(value, default=str)}")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
