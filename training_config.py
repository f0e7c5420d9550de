"""The training YAML: its schema and defaults, `--set` overrides, and the check of every key and value.

load_config reads a train.py config whole before any data or weights are loaded: a bad value is a ConfigError
naming the file, the key, the value and what was expected. Like config.py, importing it loads neither torch nor a
project module other than config.py (so `--help` answers at once); load_config itself reads transformers' schedulers
and activations (SchedulerType, ACT2FN), and so imports torch, but never builds a model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from config import (
    DTYPE_NAMES,
    ConfigError,
    PhiClipConfig,
    backbone_architecture,
    checkpoint_directory,
    checkpoint_problem,
    feature_layers_used,
    installed,
    is_int,
    require_bitsandbytes,
    shown_path,
)

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")  # training_args.optim: TrainingArguments' names
# The integrations a user names that need a package of their own (transformers' callbacks import it at start).
REPORT_TO_MODULES = {
    "azure_ml": "azureml", "clearml": "clearml", "codecarbon": "codecarbon", "comet_ml": "comet_ml",
    "dagshub": "dagshub", "dvclive": "dvclive", "mlflow": "mlflow", "neptune": "neptune", "swanlab": "swanlab",
    "trackio": "trackio", "wandb": "wandb",
}  # fmt: skip

REQUIRED, NONE = object(), type(None)
# key: (accepted types, default); a nested dict is a section.
# fmt: off
SCHEMA: dict[str, Any] = {
    "dtype": ((str,), "bfloat16"), "seed": ((int,), 42), "model": ((dict,), None),
    "checkpoint": {"output_dir": ((str,), REQUIRED), "load_dir": ((str, NONE), None),
                   "loaded_lora": ((str,), "continue")},
    "phase_one": {"annotation_file": ((str,), REQUIRED), "image_directory": ((str,), REQUIRED)},
    "phase_two": {"directory": ((str,), REQUIRED)},
    "data": {"train": ((dict, list, NONE), None), "val": ((dict, list, NONE), None), "num_workers": ((int,), 2),
             "on_bad_image": ((str,), "skip"), "on_bad_record": ((str,), "skip"), "eval_captions": ((int,), 4)},
    "training_args": {
        "num_train_epochs": ((float,), 1.0), "max_steps": ((int,), -1), "learning_rate": ((float,), 1e-4),
        "batch_size": ((int,), 8), "eval_batch_size": ((int, NONE), None), "gradient_accumulation_steps": ((int,), 1),
        "warmup_steps": ((float,), 0.03), "lr_scheduler": ((str,), "cosine"), "weight_decay": ((float,), 0.0),
        "max_grad_norm": ((float,), 1.0), "gradient_checkpointing": ((bool,), False),
        "torch_compile": ((bool,), False), "save_steps": ((int,), 500), "save_total_limit": ((int, NONE), 2),
        "logging_steps": ((int,), 10), "eval_steps": ((int, NONE), 500), "report_to": ((str, list), "auto"),
        "optim": ((str,), "adamw_torch"), "use_liger_kernel": ((bool,), False),
    },
    "peft_text": ((dict, NONE), None), "peft_vision": ((dict, NONE), None),
    "text_warmup": {"steps": ((int,), 0), "learning_rate": ((float,), 1e-3), "batch_size": ((int,), 32),
                    "describe": ((bool,), True), "data": ((dict, list, NONE), None)},
}
# fmt: on
# PhiClipConfig fields that training records in config.json: a YAML model section does not set them. LoRA it would
# claim is refused; a copied config.json's record of its own run (stored backbones, hub revisions) is dropped.
RECORDED_LORA, RECORDED_RUN = ("lora_text", "lora_vision"), ("saved_backbones", "revisions")
RECORDED_KEYS = RECORDED_LORA + RECORDED_RUN
OPTIONAL_SECTIONS = {"phase_one", "phase_two"}  # the original project's data sections
# The original project's spellings that have no counterpart here: a one-line message says what to do instead.
RETIRED_KEYS = {
    "peft_adapter": "the adapter trains in full in phase two (no LoRA needed on it): delete the peft_adapter section",
}
TORCH_DTYPE_SPELLING = {f"torch.{name}": name for name in DTYPE_NAMES}  # the original wrote `dtype: torch.bfloat16`
DATA_PATH_KEYS = ("annotation_file", "image_directory", "data_dir")  # dataset.py's path keys
# transformers' schedules that need more than train.py gives them: lr_scheduler_kwargs (min_lr, decay steps)
SCHEDULERS_WITH_ARGUMENTS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
SCHEDULERS_ON_EVAL_LOSS = ("reduce_lr_on_plateau", "greedy")  # they step on the eval loss: evaluation must run


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a section written twice would silently drop the first's settings."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` merges may be overridden by the keys beside them, as YAML means
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(
    path: str | Path,
    overrides: list[str] | tuple = (),
    phase: str | None = None,
    check_paths: bool = True,
    splits: tuple[str, ...] = ("train", "val"),
    resuming: bool = False,
) -> dict[str, Any]:
    """Read, override (`key.sub=value`, YAML-typed) and validate a training config.

    Returns the whole config as nested plain dicts with every key of SCHEMA present (defaults filled in), plus
    `config["path"]` (the file) and `data.train` filled from the original's `phase_one` / `phase_two` sections when
    those are used. `model` holds only the keys the file gives (PhiClipConfig.from_dict accepts it). Paths: `~` and
    $VARIABLES expanded, relative ones read from the working directory (local model paths stored absolute). `phase`
    ("one"/"two"/None) adds that phase's checks, `splits` names the splits whose files must exist, and
    `check_paths=False` checks neither files nor bitsandbytes (dry runs plan on any machine); `resuming` does not
    need phase two's load_dir (a resume loads its checkpoint). Raises ConfigError.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'a directory, not a config file' if path.is_dir() else 'config file not found'}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key.sub=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(
                f"--set {override!r}: the value is not valid YAML ({' '.join(str(error).split())})"
            ) from None
    for key, instead in RETIRED_KEYS.items():
        if key in raw:
            raise ConfigError(f"{path}: {key}: {instead}")
    if isinstance(raw.get("dtype"), str):
        raw["dtype"] = TORCH_DTYPE_SPELLING.get(raw["dtype"], raw["dtype"])
    config = _validate(raw, SCHEMA, path, "")
    config["path"] = str(path)
    _expand_paths(config)
    _check_semantics(config, path, phase, check_paths, splits, resuming)
    return config


def expand_path(value: str) -> str:
    """`~` and `$VARIABLES` expanded, once, for every path a config names."""
    return os.path.expanduser(os.path.expandvars(value))


def _expand_paths(config: dict) -> None:
    checkpoint = config["checkpoint"]
    for key in ("output_dir", "load_dir"):
        if checkpoint[key] is not None:
            checkpoint[key] = expand_path(checkpoint[key])
    if checkpoint["load_dir"]:  # a file in a checkpoint means the checkpoint: the original named its .pt
        checkpoint["load_dir"] = str(checkpoint_directory(checkpoint["load_dir"]))
    for section in ("phase_one", "phase_two"):
        for key, value in (config[section] or {}).items():
            config[section][key] = expand_path(value)
    for split in (config["data"]["train"], config["data"]["val"], config["text_warmup"]["data"]):
        for source in data_sources(split):
            for key, value in source.items() if isinstance(source, dict) else ():
                if key in DATA_PATH_KEYS and isinstance(value, str):
                    source[key] = expand_path(value)
    for key in ("text_model", "vision_model", "tokenizer"):
        value = (config["model"] or {}).get(key)
        if isinstance(value, str):
            local = Path(expand_path(value))
            # A local directory wins over a hub id of the same name (as in transformers); stored absolute.
            config["model"][key] = str(local.resolve()) if local.exists() else value


def _validate(values: dict, schema: dict, path: Path, where: str) -> dict:
    unknown = sorted(set(values) - set(schema))
    if unknown:
        section = f" in {where[:-1]}" if where else ""
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(where + k for k in unknown)}; valid keys{section}: {list(schema)}"
        )
    result = {}
    for key, spec in schema.items():
        name, value = where + key, values.get(key)
        if isinstance(spec, dict):  # a section
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: {name} must be a section (a mapping), got {value!r}")
            skip = value is None and key in OPTIONAL_SECTIONS
            result[key] = None if skip else _validate(value or {}, spec, path, name + ".")
            continue
        types, default = spec
        if key not in values:
            if default is REQUIRED:
                raise ConfigError(f"{path}: {name} is required")
            result[key] = default
            continue
        if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-4` (no dot) as a string
                value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is NONE else t.__name__ for t in types)
            raise ConfigError(f"{path}: {name} must be {wanted}, got {value!r}")
        result[key] = value
    return result


def _check_semantics(
    config: dict, path: Path, phase: str | None, check_paths: bool, splits: tuple, resuming: bool
) -> None:
    def require(condition: Any, message: str) -> None:
        if not condition:
            raise ConfigError(f"{path}: {message}")

    require(config["dtype"] in DTYPE_NAMES, f"dtype must be one of {list(DTYPE_NAMES)}, got {config['dtype']!r}")
    require(0 <= config["seed"] < 2**32, f"seed must be in [0, 2**32), got {config['seed']}")
    ckpt, args = config["checkpoint"], config["training_args"]
    require(ckpt["output_dir"].strip(), "checkpoint.output_dir is empty: name the run's directory")
    loaded_lora = ("continue", "merge")
    require(
        ckpt["loaded_lora"] in loaded_lora,
        f"checkpoint.loaded_lora must be one of {loaded_lora}, got {ckpt['loaded_lora']!r}",
    )
    warmup = config["text_warmup"]
    require(warmup["steps"] >= 0, f"text_warmup.steps must be 0 (off) or more, got {warmup['steps']}")
    for key in ("learning_rate", "batch_size"):
        require(0 < warmup[key] < float("inf"), f"text_warmup.{key} must be positive (and finite), got {warmup[key]}")
    require(config["model"] is not None or phase != "one", "model is required for phase one")
    if config["model"] is not None:
        _check_model_section(config["model"], path, phase, require)
    _check_data(config, phase, require)
    _check_training_args(args, require)
    require(
        args["lr_scheduler"] not in SCHEDULERS_ON_EVAL_LOSS or (config["data"]["val"] and args["eval_steps"]),
        f"training_args.lr_scheduler {args['lr_scheduler']} steps on the eval loss: give data.val and eval_steps",
    )
    for name in ("peft_text", "peft_vision"):
        if config[name] is not None:
            _check_lora(config[name], name, require)
    _check_phase(config, phase, check_paths and not resuming, require)
    if check_paths:  # a dry run plans on any machine
        for name, value in _local_paths(config, phase, splits):
            require(Path(value).expanduser().exists(), f"{name}: {shown_path(value)} does not exist")
        _check_optional_packages(config, path, phase)


def _check_model_section(model: dict, path: Path, phase: str | None, require) -> None:
    for key in RECORDED_RUN:
        model.pop(key, None)
    recorded = [key for key in RECORDED_LORA if model.get(key)]
    require(
        not recorded,
        f"model.{(recorded or [''])[0]}: recorded by training in a checkpoint's config.json, not a setting "
        "(LoRA is configured in peft_text / peft_vision)",
    )
    try:
        settings = PhiClipConfig.from_dict(model, where="model")
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: {error}") from None
    layers = (backbone_architecture(settings.vision_model) or {}).get("num_hidden_layers")
    if layers is not None:  # else not knowable offline: PhiClipMLLM checks it when the tower is built
        try:
            feature_layers_used(settings.vision_feature_layer, layers)  # as PhiClipMLLM will, before any weight loads
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None
    require(
        phase == "two" or not isinstance(settings.text_model, dict) or settings.tokenizer,
        "model.tokenizer is required with an inline text_model (a random LM has no tokenizer of its own): "
        "a tokenizer directory or hub id, e.g. microsoft/Phi-3-mini-4k-instruct",
    )


def _check_data(config: dict, phase: str | None, require) -> None:
    data = config["data"]
    # The original's data sections: phase_one (COCO captions) trains phase one, phase_two (a cc_sbu_align
    # directory) phase two; its phase-two file carries both.
    original = config["phase_two"] if phase == "two" and config["phase_two"] else config["phase_one"]
    if original is not None:
        section = "phase_two" if original is config["phase_two"] else "phase_one"
        require(data["train"] is None, f"give the training data once: {section} (the original's keys) or data.train")
        if section == "phase_one":
            data["train"] = {"format": "coco", **original}
        else:
            data["train"] = {"format": "cc_sbu_align", "data_dir": original["directory"]}
    require(phase is None or data["train"] is not None, "no training data: add data.train or phase_one")
    policies = ("skip", "error")
    for key in ("on_bad_image", "on_bad_record"):
        require(data[key] in policies, f"data.{key} must be one of {policies}, got {data[key]!r}")
    sources = {"data.train": data["train"], "data.val": data["val"], "text_warmup.data": config["text_warmup"]["data"]}
    for name, split in sources.items():  # data.on_bad_* are the defaults of every split
        require(split != [], f"{name}: an empty list of data sources")
        for source in data_sources(split):
            require(isinstance(source, dict), f"{name}: a data source is a mapping with a format, got {source!r}")
            source.setdefault("on_bad_image", data["on_bad_image"])
            source.setdefault("on_bad_record", data["on_bad_record"])
    require(data["num_workers"] >= 0, f"data.num_workers must be 0 or more, got {data['num_workers']}")
    require(data["eval_captions"] >= 0, f"data.eval_captions must be 0 or more, got {data['eval_captions']}")


def _check_phase(config: dict, phase: str | None, check_load_dir: bool, require) -> None:
    ckpt = config["checkpoint"]
    if phase == "one":  # phase one builds a fresh model and trains its adapter only: these would be ignored
        given = [k for k in ("peft_text", "peft_vision") if config[k]]
        given += ["checkpoint.load_dir"] if ckpt["load_dir"] else []
        require(
            not given, f"{' and '.join(given)}: phase two's settings (this config is for phase two): drop --phase_one"
        )
    if phase == "two":
        require(
            config["peft_text"] or config["peft_vision"],
            "phase two needs peft_text and/or peft_vision (pass --phase_one to train the adapter only)",
        )
        require(ckpt["load_dir"], "checkpoint.load_dir is required for phase two: the phase-one output directory")
        require(
            Path(ckpt["load_dir"]).resolve() != Path(ckpt["output_dir"]).resolve(),
            "checkpoint.output_dir must differ from checkpoint.load_dir (the phase-one model)",
        )
        problem = checkpoint_problem(ckpt["load_dir"]) if check_load_dir else None
        first = (
            "; run phase one first (python train.py --phase_one --config ...)" if problem == "no such directory" else ""
        )
        require(not problem, f"checkpoint.load_dir {shown_path(ckpt['load_dir'])}: {problem}{first}")


def _local_paths(config: dict, phase: str | None, splits: tuple) -> list[tuple[str, str]]:
    """(key, path) of what the run reads from disk: local backbones and tokenizer, the splits' and warm-up's data."""
    # A hub id is `org/name`; absolute, dotted or deeper names are local paths that must exist.
    paths = [
        (f"model.{k}", v)
        for k, v in (config["model"] or {}).items()
        if k in ("text_model", "vision_model", "tokenizer")
        and isinstance(v, str)
        and (v.startswith((".", "/", "~")) or v.count("/") > 1)
    ]
    for split in splits:
        for source in data_sources(config["data"][split]):
            paths += [(f"data.{split}.{k}", str(v)) for k, v in source.items() if k in DATA_PATH_KEYS]
    for source in data_sources(config["text_warmup"]["data"]) if phase == "one" else ():
        paths += [(f"text_warmup.data.{k}", str(v)) for k, v in source.items() if k in DATA_PATH_KEYS]
    return paths


def data_sources(split: dict | list | None) -> list:
    """A data split's sources: one mapping, or a list of them (mixed into one dataset)."""
    return [] if split is None else split if isinstance(split, list) else [split]


def _check_training_args(args: dict, require) -> None:
    for key in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps", "learning_rate"):
        require(0 < args[key] < float("inf"), f"training_args.{key} must be positive (and finite), got {args[key]}")
    for key in ("num_train_epochs", "weight_decay", "max_grad_norm", "warmup_steps"):
        require(math.isfinite(args[key]), f"training_args.{key} must be a finite number, got {args[key]}")
    require(
        args["max_steps"] == -1 or args["max_steps"] > 0,
        f"training_args.max_steps must be positive (or -1: train num_train_epochs), got {args['max_steps']}",
    )
    require(
        args["max_steps"] > 0 or args["num_train_epochs"] > 0,
        f"training_args.num_train_epochs must be positive, got {args['num_train_epochs']:g} "
        "(a run of zero steps would write an untrained model)",
    )
    require(
        args["eval_steps"] is None or args["eval_steps"] > 0,
        f"training_args.eval_steps must be positive, or null for no periodic evaluation, got {args['eval_steps']}",
    )
    for key in ("weight_decay", "max_grad_norm"):
        require(args[key] >= 0, f"training_args.{key} must be 0 or more, got {args[key]}")
    warmup = args["warmup_steps"]
    require(
        warmup >= 0 and (warmup < 1 or float(warmup).is_integer()),
        f"training_args.warmup_steps must be a fraction below 1 or a whole number of steps, got {warmup}",
    )
    require(
        args["eval_batch_size"] is None or args["eval_batch_size"] > 0,
        f"training_args.eval_batch_size must be positive or null, got {args['eval_batch_size']}",
    )
    require(
        args["save_total_limit"] is None or args["save_total_limit"] > 0,
        f"training_args.save_total_limit must be positive or null (keep all), got {args['save_total_limit']}",
    )
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType if s.value not in SCHEDULERS_WITH_ARGUMENTS]
    name = args["lr_scheduler"]
    require(
        name not in SCHEDULERS_WITH_ARGUMENTS,
        f"training_args.lr_scheduler {name} needs lr_scheduler_kwargs (min_lr, decay steps), which train.py does not "
        f"take; one of {schedulers}",
    )
    require(name in schedulers, f"training_args.lr_scheduler must be one of {schedulers}, got {name!r}")
    require(
        args["optim"] in OPTIMIZERS, f"training_args.optim must be one of {list(OPTIMIZERS)}, got {args['optim']!r}"
    )
    # The integrations this transformers knows (5.0 has no kubeflow), and ours: auto (tensorboard when installed).
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = ["auto", "none", "all", *sorted(INTEGRATION_TO_CALLBACK)]
    unknown = [name for name in _report_to_list(args["report_to"]) if name not in known]
    require(not unknown, f"training_args.report_to: unknown integration(s) {unknown}; expected some of {known}")


def _report_to_list(report_to: str | list[str]) -> list[str]:
    return [report_to] if isinstance(report_to, str) else report_to


def _check_optional_packages(config: dict, path: Path, phase: str | None) -> None:
    # Phase two runs the phase-one model as stored, unless its model section sets quantize (build_model does so too).
    quantize = (config["model"] or {}).get("quantize")
    stored = Path(config["checkpoint"]["load_dir"] or "") / "config.json"
    if phase == "two" and "quantize" not in (config["model"] or {}) and stored.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            quantize = json.loads(stored.read_text()).get("quantize")
    if quantize is not None:
        require_bitsandbytes(f"{path}: model.quantize={quantize}")
    if config["training_args"]["optim"] != "adamw_torch":
        require_bitsandbytes(f"{path}: training_args.optim={config['training_args']['optim']}")
    attention = (config["model"] or {}).get("attn_implementation")
    if attention == "flash_attention_2" and not installed("flash_attn"):
        raise ConfigError(
            f"{path}: model.attn_implementation=flash_attention_2 needs the flash-attn package (and a CUDA GPU), "
            "which is not installed: pip install flash-attn, or use sdpa"
        )
    # transformers 5.0 imports FlashAttention 3 as flash_attn_3, later versions as flash_attn_interface.
    if attention == "flash_attention_3" and not (installed("flash_attn_interface") or installed("flash_attn_3")):
        raise ConfigError(
            f"{path}: model.attn_implementation=flash_attention_3 needs FlashAttention 3 (a Hopper GPU and the "
            "package built from flash-attention's hopper/ directory), which is not installed; or use sdpa"
        )
    for name in _report_to_list(config["training_args"]["report_to"]):
        module = REPORT_TO_MODULES.get(name)
        if module and not installed(module):
            raise ConfigError(
                f"{path}: training_args.report_to names {name}, which is not installed: pip install {module}, or "
                "leave it out (auto: tensorboard when installed)"
            )
    if config["training_args"]["use_liger_kernel"] and not installed("liger_kernel"):
        raise ConfigError(
            f"{path}: training_args.use_liger_kernel=true needs liger-kernel (Triton kernels for a CUDA GPU), which is "
            "not installed: pip install -e '.[liger]' (or pip install liger-kernel)"
        )


# The LoRA keys a config may give: five that _check_lora checks one by one, and those peft would only trip over
# later, deep inside get_peft_model, checked by type: (accepted types, what to write).
LORA_TYPES = {
    "use_rslora": ((bool,), "true or false"),
    "use_dora": ((bool,), "true or false"),
    "init_lora_weights": ((bool, str), "true, false or a peft init name (e.g. gaussian)"),
    "modules_to_save": ((list,), "a list of module names"),
    "layers_to_transform": ((int, list), "a layer index or a list of them"),
    "layers_pattern": ((str, list), "a module name or a list of them"),
    "rank_pattern": ((dict,), "a mapping of module-name pattern to rank"),
    "alpha_pattern": ((dict,), "a mapping of module-name pattern to alpha"),
    "exclude_modules": ((str, list), "a module name (regex) or a list of them"),
    "fan_in_fan_out": ((bool,), "true or false"),
}
LORA_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", *LORA_TYPES)


def _check_lora(settings: dict, name: str, require) -> None:
    unknown = sorted(set(settings) - set(LORA_KEYS))
    require(not unknown, f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys: {list(LORA_KEYS)}")
    r = settings.get("r", 8)
    require(is_int(r) and r > 0, f"{name}.r must be a positive integer, got {r!r}")
    alpha = settings.get("lora_alpha", 8)
    require(
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
        f"{name}.lora_alpha must be a positive number, got {alpha!r}",
    )
    dropout = settings.get("lora_dropout", 0.0)
    if isinstance(dropout, str):  # YAML 1.1 reads `5e-2` (no dot) as a string, as for the training_args numbers
        with contextlib.suppress(ValueError):
            dropout = settings["lora_dropout"] = float(dropout)
    require(
        isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
        f"{name}.lora_dropout must be in [0, 1), got {dropout!r}",
    )
    bias = settings.get("bias", "none")
    require(bias in ("none", "all", "lora_only"), f"{name}.bias must be none, all or lora_only, got {bias!r}")
    for key, (types, expected) in LORA_TYPES.items():
        value = settings.get(key)
        require(
            value is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)),
            f"{name}.{key} must be {expected}, got {value!r}",
        )
    for key, kind in (("rank_pattern", "integer"), ("alpha_pattern", "number")):
        for pattern, value in (settings.get(key) or {}).items():
            number = is_int(value) or (kind == "number" and isinstance(value, float))
            require(number and value > 0, f"{name}.{key}: {pattern!r} must map to a positive {kind}, got {value!r}")
    targets = settings.get("target_modules")
    require(
        (isinstance(targets, str) and targets)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)),
        f"{name}.target_modules must be a list of module names (e.g. [q_proj, v_proj]), got {targets!r}",
    )
