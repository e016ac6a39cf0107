"""Injecting Aurora into an existing model, and the handle that manages it afterwards."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import AuroraConfig
from .extras import ContextEnhancement, GatedQueryTransform
from .io import read_adapter, read_adapter_config, write_adapter
from .layer import AuroraFactors, AuroraLinear, InputSharing
from .targets import TargetPreset, find_preset

FACTORS_ATTR = "aurora_factors"
CONTEXT_ATTR = "aurora_context"


def context_module(model: nn.Module) -> ContextEnhancement | None:
    """The Informative Context Enhancement module injected into ``model``, or None: the public
    way for a backbone's matching path to apply it (where it lives on the model is Aurora's)."""
    return getattr(model, CONTEXT_ATTR, None)


def numel(p: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local shape is [0])."""
    return getattr(p, "ds_numel", p.numel())


def _list_names(names: list[str], limit: int = 60) -> str:
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {shown}{more}"


def _match(patterns, candidates: list[str], kind: str) -> list[str]:
    """Names matching any pattern; a pattern that matches nothing is an error."""
    chosen = []
    for pattern in patterns:
        hits = [n for n in candidates if re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no {kind}; candidates are:{_list_names(candidates)}")
        chosen += [n for n in hits if n not in chosen]
    return sorted(chosen, key=candidates.index)


def _layer_widths(layer: nn.Linear) -> tuple[int, int]:
    """(input width, output width) of the factor sets a layer uses.

    Square blocks of the smaller side when both sides are whole multiples of it (qkv, fc1,
    fc2 of a 4x MLP); otherwise one block between the two widths (a 1408 -> 6144 MLP, a
    cross-attention key from 1408-d image tokens to a 768-d text tower).
    """
    d = min(layer.in_features, layer.out_features)
    if layer.in_features % d or layer.out_features % d:
        return layer.in_features, layer.out_features
    return d, d


def _factor_key(width: int, tower: str) -> str:
    return f"{tower.replace('.', '_')}_d{width}" if tower else f"d{width}"


def _resolve_preset(model: nn.Module, config: AuroraConfig) -> TargetPreset:
    if isinstance(config.targets, str):
        preset = find_preset([config.backbone, type(model).__name__], config.targets)
    else:
        preset = TargetPreset(linear=tuple(config.targets))
    if config.gated_query_targets:
        preset = TargetPreset(preset.linear, tuple(config.gated_query_targets), preset.context)
    return preset


def _block_width(name: str, block: nn.Module) -> int:
    """The output width of an attention block = out_features of its last linear layer."""
    linears = [m for m in block.modules() if isinstance(m, (nn.Linear, AuroraLinear))]
    if not linears:
        raise ValueError(f"gated-query target {name} contains no linear layer to take its width from")
    return linears[-1].out_features


@dataclass
class AuroraModel:
    """What :func:`inject_aurora` returns: the model plus everything needed to manage Aurora."""

    model: nn.Module
    config: AuroraConfig
    layers: dict[str, AuroraLinear]
    gated_query: dict[str, GatedQueryTransform]

    @property
    def factors(self) -> nn.ModuleDict:
        return getattr(self.model, FACTORS_ATTR)

    @property
    def context(self) -> ContextEnhancement | None:
        return context_module(self.model)

    def named_aurora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter Aurora added (factors, coefficients, GQT, ICE), by model name."""
        return [(n, p) for n, p in self.model.named_parameters() if _is_aurora_name(n)]

    def named_aurora_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """State Aurora keeps besides parameters (ICE's running context), by model name."""
        return [(n, b) for n, b in self.model.named_buffers() if _is_aurora_name(n)]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Aurora parameters plus any backbone modules the caller chose to train (heads)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(numel(p) for _, p in self.named_trainable_parameters())

    def parameter_report(self) -> dict:
        aurora = sum(numel(p) for _, p in self.named_aurora_parameters())
        trainable = self.num_trainable()
        total = sum(numel(p) for p in self.model.parameters())
        backbone = total - aurora
        return {
            "aurora": aurora,
            "heads": trainable - aurora,
            "trainable": trainable,
            "backbone": backbone,
            "total": total,
            "aurora_percent": 100.0 * aurora / backbone,
            "trainable_percent": 100.0 * trainable / backbone,
        }

    def format_parameter_report(self) -> str:
        r = self.parameter_report()
        return (
            f"Aurora {r['aurora']:,} params ({r['aurora_percent']:.3f}% of the {r['backbone'] / 1e6:.1f}M backbone); "
            f"trainable incl. heads {r['trainable']:,} ({r['trainable_percent']:.3f}%)"
        )

    def train_modules(self, patterns: list[str]):
        """Unfreeze whole backbone modules (e.g. projection or matching heads) by name pattern."""
        names = [n for n, _ in self.model.named_modules() if n]
        for name in _match(patterns, names, "module"):
            for p in self.model.get_submodule(name).parameters():
                p.requires_grad_(True)

    def merge(self):
        """Fold every update into its frozen weight: inference then costs nothing extra."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self):
        for layer in self.layers.values():
            layer.unmerge()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds: every trainable parameter and Aurora's buffers,
        detached, on CPU."""
        named = self.named_trainable_parameters() + self.named_aurora_buffers()
        return {n: p.detach().cpu().contiguous() for n, p in named}

    def describe(self) -> dict:
        """The structure half of ``adapter_config.json``: enough to rebuild and check."""
        return {
            "factor_sets": {k: {"width": f.width, "rank": f.rank, "parts": f.parts} for k, f in self.factors.items()},
            "layers": list(self.layers),
            "gated_query_modules": list(self.gated_query),
            "context_enhancement": self.context is not None,
            "trained_parameters": sorted({n for n, _ in self.named_trainable_parameters() if not _is_aurora_name(n)}),
        }

    def save(self, directory, extra: dict | None = None):
        write_adapter(directory, self.adapter_state_dict(), self.config, self.describe(), extra)

    def load(self, directory):
        tensors, _ = read_adapter(directory, self)
        load_adapter_tensors(self, tensors)


def _is_aurora_name(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in (FACTORS_ATTR, CONTEXT_ATTR) or "aurora_gqt" in parts or parts[-1] == "coeffs"


@torch.no_grad()
def load_adapter_tensors(handle: AuroraModel, tensors: dict[str, torch.Tensor]):
    targets = dict(handle.named_trainable_parameters() + handle.named_aurora_buffers())
    for name, value in tensors.items():
        targets[name].copy_(value.to(targets[name].dtype))


def as_one_call(fn, model: nn.Module):
    """``fn``, which calls ``model``'s adapted towers (maybe several times), run as one call of
    the adapted model (:meth:`CallMemo.as_one_call`): what to compile for a training step."""
    sharing = next((m.sharing for m in model.modules() if isinstance(m, AuroraLinear) and m.sharing), None)
    return fn if sharing is None else sharing.as_one_call(fn)


def inject_aurora(model: nn.Module, config: AuroraConfig) -> AuroraModel:
    """Freeze ``model`` and add Aurora in place; returns the managing handle.

    Adapted layers stay at their original attribute paths; the factors are registered once
    at the root as ``aurora_factors.d{width}`` (``aurora_factors.{tower}_d{width}`` for a tower
    with its own rank).
    """
    if hasattr(model, FACTORS_ATTR):
        raise ValueError("this model already has Aurora injected")
    preset = _resolve_preset(model, config)
    for p in model.parameters():
        p.requires_grad_(False)

    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = _match(preset.linear, linear_names, "nn.Linear module")
    plan = {}  # layer name -> (source key, target key)
    parts: dict[tuple[int, str], set] = {}  # (width, tower) -> parts used
    for name in chosen:
        d_in, d_out = _layer_widths(model.get_submodule(name))
        tower = config.tower_of(name)
        parts.setdefault((d_in, tower), set()).add("down")
        parts.setdefault((d_out, tower), set()).add("up")
        plan[name] = (_factor_key(d_in, tower), _factor_key(d_out, tower))
        if config.rank_for(d_in, tower) != config.rank_for(d_out, tower):
            raise ValueError(
                f"cannot adapt {name}: it maps width {d_in} (rank {config.rank_for(d_in, tower)}) to width "
                f"{d_out} (rank {config.rank_for(d_out, tower)}), and a layer between two widths needs equal "
                f"ranks; set them equal in ranks, give its tower its own rank (tower_ranks), or remove it"
            )

    factors = nn.ModuleDict()
    for (d, tower), used in sorted(parts.items(), key=lambda item: (item[0][1], item[0][0])):
        weight = next(model.get_submodule(n).weight for n in chosen if config.tower_of(n) == tower)
        factors[_factor_key(d, tower)] = AuroraFactors(d, config.rank_for(d, tower), config.dropout, weight.dtype,
                                                       weight.device, tuple(p for p in ("down", "up") if p in used))
    model.add_module(FACTORS_ATTR, factors)

    layers = {}
    sharing = InputSharing()
    sharing.merging = config.merged
    for name, (source, target) in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = AuroraLinear(getattr(parent, attr), factors[source], factors[target], config.scale, sharing)
        setattr(parent, attr, layers[name])
    # One U·x per input within a call of the model or of one of its towers (backbones call
    # model.vision_model, model.text_encoder, ... directly).
    towers = {name.split(".")[0] for name in plan}
    sharing.norms = {id(m.weight): m.eps for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    sharing.attach([model, *(m for n, m in model.named_children() if n in towers)])

    gated = {}
    if config.gated_query and preset.gated_query:
        block_names = [n for n, _ in model.named_modules() if n]
        for name in _match(preset.gated_query, block_names, "module"):
            block = model.get_submodule(name)
            ref = next(block.parameters())
            gated[name] = GatedQueryTransform(_block_width(name, block), config.gated_query_scale, ref.dtype, ref.device,
                                              sharing)
            gated[name].attach(block)

    if config.context_enhancement and preset.context:
        head = dict(model.named_modules()).get(preset.context)
        if head is None:  # e.g. a retrieval configuration given a VQA model
            raise ValueError(f"Aurora for {config.backbone or 'this model'} enhances the context of {preset.context!r}, "
                             f"which {type(model).__name__} does not have: the configuration is for another model")
        model.add_module(CONTEXT_ATTR, ContextEnhancement(head.in_features, config.context_scale,
                                                          dtype=head.weight.dtype, device=head.weight.device))

    model.train(model.training)  # the new modules follow the model's train/eval mode (dropout)
    handle = AuroraModel(model, config, layers, gated)
    for _, p in handle.named_aurora_parameters():
        p.requires_grad_(True)
    return handle


def load_adapter(model: torch.nn.Module, directory):
    """Inject Aurora as recorded in ``directory`` into ``model`` and load its tensors."""
    meta = read_adapter_config(directory)
    try:
        handle = inject_aurora(model, AuroraConfig.from_dict(meta["aurora"]))
    except ValueError as exn:
        raise ValueError(f"adapter {directory} does not fit this {type(model).__name__}: {exn}") from None
    if handle.describe()["layers"] != meta["layers"]:
        got, want = set(handle.describe()["layers"]), set(meta["layers"])
        raise ValueError(
            f"adapter {directory} adapts layers this model does not resolve to: only in the file "
            f"{sorted(want - got)[:10]}, only in the model {sorted(got - want)[:10]}"
        )
    if meta["trained_parameters"]:
        params = dict(model.named_parameters())
        unknown = [n for n in meta["trained_parameters"] if n not in params]
        if unknown:
            raise ValueError(f"adapter {directory} trains parameters this model lacks: {unknown[:10]}")
        for name in meta["trained_parameters"]:
            params[name].requires_grad_(True)
    tensors, _ = read_adapter(directory, handle)
    load_adapter_tensors(handle, tensors)
    return handle
