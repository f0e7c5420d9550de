"""LoRA on the backbones: which linear layers a `target_modules` setting adapts, and the settings that shape it.

peft builds and merges the LoRA layers; what it does not do is written here: name a target that matches nothing
(peft passes a dead target silently when another one matches), compare two LoRA settings by what decides their
weights, and give a LoRA-wrapped backbone's frozen weights back under their plain names.
"""

from __future__ import annotations

import re

from torch import nn


def base_model(backbone: nn.Module) -> nn.Module:
    """The transformers model inside peft's LoRA wrapper, or `backbone` itself when it carries no LoRA."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def without_lora(state_dict: dict) -> dict:
    """A LoRA-wrapped backbone's state dict as the plain backbone's: no LoRA tensors or trained copies of
    `modules_to_save` (they live in the LoRA directory), no `.base_layer.` / `.original_module.` in names."""
    return {
        k.replace(".base_layer.", ".").replace(".original_module.", "."): v
        for k, v in state_dict.items()
        if "lora_" not in k and ".modules_to_save." not in k
    }


# The LoRA settings that decide its weights' shapes and meaning, with peft's defaults.
SHAPING_DEFAULTS = {
    "r": 8,
    "lora_alpha": 8,
    "use_rslora": False,
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def lora_shape(settings: dict | None) -> dict:
    """The LoRA settings that decide its weights' shapes and meaning (peft's defaults filled in)."""
    settings = settings or {}
    shape = {key: settings.get(key) or default for key, default in SHAPING_DEFAULTS.items()}
    for key in ("target_modules", "modules_to_save"):  # lists of names, in any order
        names = settings.get(key)
        shape[key] = sorted(names) if isinstance(names, (list, tuple, set)) else names
    return shape


NARROWING_KEYS = ("exclude_modules", "layers_to_transform")  # peft settings that leave matched layers out


def check_lora_targets(backbone: nn.Module, settings: dict, where: str) -> list[str]:
    """The names of the layers a LoRA setting adapts; ValueError naming any `target_modules` entry that matches none.

    peft only complains when *no* target matches; a single dead target (the seed's CLIP `o_proj`) passed silently.
    Matching is peft's own (a name, a dotted suffix, or a regex over the full name; exclude_modules,
    layers_to_transform), applied one list entry at a time to find the dead ones.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = settings.get("target_modules")
    if not targets:
        raise ValueError(f"{where}.target_modules: give the module names to adapt, e.g. ['q_proj', 'v_proj']")
    linear = {name: m for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    short_names = sorted({name.rsplit(".", 1)[-1] for name in linear})
    narrowing = [key for key in NARROWING_KEYS if settings.get(key) is not None]

    def matches(target: str | list[str], narrowed: bool = True) -> list[str]:
        values = {**settings, "target_modules": target}
        if not narrowed:
            values = {k: v for k, v in values.items() if k not in NARROWING_KEYS}
        config = LoraConfig(**values)
        return [name for name in linear if check_target_module_exists(config, name)]

    if targets == "all-linear":  # peft resolves this itself, leaving out the output layer; exclusions still apply
        output_layer = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
        return matches([name for name, m in linear.items() if m is not output_layer])

    if isinstance(targets, str):  # peft: a regex that must match a module's full name
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"{where}.target_modules: {targets!r} is not a valid regex ({error})") from None
        if not (matched := matches(targets)):
            raise ValueError(
                f"{where}.target_modules: the regex {targets!r} matches no linear layer of {type(backbone).__name__} "
                f"(it must match a whole name such as {next(iter(linear), '')!r}); layer names: {short_names}"
            )
        return matched
    dead = [target for target in targets if not matches([target])]
    excluded = [target for target in dead if narrowing and matches([target], narrowed=False)]
    if excluded:
        raise ValueError(f"{where}.target_modules: {excluded} match only layers left out by {' and '.join(narrowing)}")
    if dead:
        raise ValueError(
            f"{where}.target_modules: {dead} match no linear layer of {type(backbone).__name__}; "
            f"available: {short_names}"
        )
    return matches(list(targets))
