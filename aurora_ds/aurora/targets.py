"""Target presets: which module names a preset such as ``paper`` means for a backbone.

Backbones register their presets here (keyed by backbone name and by model class name) so
that the method itself never imports a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetPreset:
    """Regular expressions (``re.fullmatch`` on module names).

    ``linear``: the ``nn.Linear`` layers that receive a mode-approximation update.
    ``gated_query``: attention blocks whose output passes through GQT (the fusion encoder).
    ``context``: the ``nn.Linear`` matching head whose input receives ICE ("" if none).
    """

    linear: tuple[str, ...]
    gated_query: tuple[str, ...] = ()
    context: str = ""


_PRESETS: dict[str, dict[str, TargetPreset]] = {}


def register_presets(model_class: str, presets: dict[str, TargetPreset]):
    _PRESETS.setdefault(model_class, {}).update(presets)


def find_preset(keys: list[str | None], name: str) -> TargetPreset:
    """The preset ``name`` of the first key (backbone name, then model class) that has presets."""
    key = next((k for k in keys if k in _PRESETS), None)
    if key is None:
        raise ValueError(
            f"no target presets are registered for {[k for k in keys if k]}; pass targets as a list "
            f"of module-name patterns, or use a registered backbone ({sorted(_PRESETS)})"
        )
    if name not in _PRESETS[key]:
        raise ValueError(f"unknown target preset {name!r} for {key}; known presets: {sorted(_PRESETS[key])}")
    return _PRESETS[key][name]
