"""params.yaml, validated: one frozen dataclass per section, unknown keys rejected.

params.yaml is the single source of hyperparameters (DVC tracks it, `dvc exp run -S` edits it).
Each stage reads only the sections it declares in dvc.yaml; `load_params()` builds every section so
that a typo anywhere fails before work starts, naming the key (e.g. ``train.cyclegan.lamda_A``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown or invalid; the message names the key."""


# Names that become paths (data/raw/<key>, models/<task>) or shell words (`torchrun ... ${key}` in dvc.yaml).
NAME_RULE = "1-64 characters among letters, digits, '_', '-' and '.', not starting with '.' or '-'"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_name(kind: str, value: Any) -> str:
    """`value` if it is a safe name (NAME_RULE), else ConfigError naming `kind` (e.g. "datasets key")."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{kind} {value!r}: not a valid name ({NAME_RULE})")
    return value


@dataclass(frozen=True)
class BaseConfig:
    seed: int = 0                      # Global seed: data generation, init, sampling.


@dataclass(frozen=True)
class DatasetConfig:
    source: str                        # "embedded" | "cyclegan" | "pix2pix" | "cityscapes" | "folder"
    name: Optional[str] = None         # Registry name when it differs from the key (e.g. pix2pix "facades").
    path: Optional[str] = None         # source=folder: the user's folder; cityscapes: where the zips are.
    url: Optional[str] = None          # Override the registry URL (mirrors, tests).
    sha256: Optional[str] = None       # Expected archive hash; recorded on first download when null.
    kind: Optional[str] = None         # source=embedded: which generator of the embedded suite.
    size: int = 64                     # source=embedded: image side in pixels.
    n_train: int = 200                 # source=embedded: training images per domain.
    n_test: int = 50                   # source=embedded: test images per domain.
    resize: Optional[int] = None       # prepare: resize every image (square) to this side; null keeps sizes.
    load_size: Optional[int] = None    # This dataset's data.load_size (train resize); null: see dataset_data().
    crop_size: Optional[int] = None    # This dataset's data.crop_size (train crop, test size); null: data.crop_size.


@dataclass(frozen=True)
class DataConfig:
    load_size: int = 286               # Train transform: resize to load_size x load_size (bicubic) ...
    crop_size: int = 256               # ... then random crop; test images are resized to crop_size.
    flip: bool = True                  # Random horizontal flip at train time.
    num_workers: int = 0               # DataLoader workers per process.
    bad_images: str = "skip"           # prepare: "skip" bad files (and report them) or "stop".
    max_download_bytes: int = 20 * 2**30   # Refuse archives that expand beyond this.
    download_timeout: float = 60.0     # Seconds without data before a download attempt fails.
    download_retries: int = 4          # Attempts, with exponential backoff, before giving up.


GENERATORS = ("resnet_6blocks", "resnet_9blocks", "unet_128", "unet_256")
NORMS = ("instance", "batch", "none")
# Layer groups a lambda override may name (`networks.layer_groups` maps them onto each architecture).
LAYER_GROUPS = ("first", "down", "blocks", "up", "last")


def check_lam(value: Any, key: str) -> float:
    """A lambda (the unconstrained fraction of a layer's filters per task) as a float; ValueError naming
    `key` unless it is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key}: lambda must be in (0, 1], got {value!r}")
    return float(value)


def _flat_overrides(overrides: Any, prefix: str = "") -> dict[str, Any]:
    """{model: {26: x}} -> {"model.26": x}: what `-S +model.lam_overrides.model.26=x` gives for a dotted name."""
    if not isinstance(overrides, dict):
        raise ValueError(f"lam_overrides{prefix and '.' + prefix[:-1]}: expected a mapping, got {overrides!r}")
    out = {}
    for k, v in overrides.items():
        out.update(_flat_overrides(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass(frozen=True)
class GeneratorConfig:
    """The architecture every task of a generator bank shares; saved in each checkpoint's meta.json.

    Validated here, once: a wrong value is a ValueError naming the field. `lam_overrides` keeps only
    the overrides that are set (null means "use lam"), each a layer group (`LAYER_GROUPS`) or an exact
    piggyback layer name (checked against the network by `networks.build_generator`).
    """

    netG: str = "resnet_9blocks"       # resnet_6blocks | resnet_9blocks | unet_128 | unet_256
    input_nc: int = 3                  # Channels in.
    output_nc: int = 3                 # Channels out.
    ngf: int = 64                      # Filters of the first conv.
    norm: str = "instance"             # instance (affine=False, no state) | batch | none
    use_dropout: bool = False          # Dropout(0.5) in ResNet blocks / U-Net middle blocks.
    lam: float = 0.25                  # Unconstrained fraction of every layer's filters per task (tasks >= 2).
    lam_overrides: dict = field(default_factory=dict)  # {layer group | layer name: lambda or null}

    def __post_init__(self):
        if self.netG not in GENERATORS:
            raise ValueError(f"netG: {self.netG!r} is not one of {list(GENERATORS)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: {self.norm!r} is not one of {list(NORMS)}")
        object.__setattr__(self, "lam", check_lam(self.lam, "lam"))
        overrides = {str(k): check_lam(v, f"lam_overrides.{k}")
                     for k, v in _flat_overrides(self.lam_overrides).items() if v is not None}
        object.__setattr__(self, "lam_overrides", overrides)

    @classmethod
    def from_model_config(cls, model_cfg: Any) -> "GeneratorConfig":
        """The generator part of a `ModelConfig` (netD/ndf/n_layers_D/init_from are dropped)."""
        return cls(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GeneratorConfig)}


@dataclass(frozen=True)
class ModelConfig(GeneratorConfig):
    """params.yaml `model`: the generator configuration plus the discriminator and the starting checkpoint."""

    netD: str = "basic"                # basic (70x70 PatchGAN) | n_layers | pixel
    ndf: int = 64                      # Discriminator filters in the first layer.
    n_layers_D: int = 3                # PatchGAN depth when netD=n_layers.
    init_from: Optional[str] = None    # A lifelong checkpoint under pretrained/ (`piggyback import-reference`):
                                       # the chain starts from its tasks instead of an empty model.


@dataclass(frozen=True)
class CycleGANConfig:
    gan_mode: str = "lsgan"
    lambda_A: float = 10.0             # Cycle loss weight A -> B -> A.
    lambda_B: float = 10.0             # Cycle loss weight B -> A -> B.
    lambda_identity: float = 0.5       # Identity loss weight, relative to lambda_A / lambda_B.
    pool_size: int = 50                # Image pool of earlier fakes shown to the discriminators.


@dataclass(frozen=True)
class Pix2PixConfig:
    gan_mode: str = "vanilla"
    lambda_L1: float = 100.0
    pool_size: int = 0


@dataclass(frozen=True)
class TrainConfig:
    method: str = "piggyback"          # piggyback | separate | finetune (baselines, see README)
    epochs: int = 100                  # Epochs at the initial learning rate ...
    epochs_decay: int = 100            # ... then epochs of linear decay towards 0.
    batch_size: int = 1                # Per process.
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    nproc: int = 1                     # torchrun --nproc_per_node (dvc.yaml reads it).
    snapshot_every: int = 500          # Iterations between resume snapshots (0: only at epoch ends).
    probe_images: int = 4              # Test images whose outputs prove a task was not forgotten.
    max_steps: int = 0                 # Stop each task after this many iterations (0: no limit).
    amp: str = "none"                  # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    batch_calls: bool = False          # One call for independent calls through a network (models.batchable; same outputs).
    adam_impl: str = "auto"            # auto (fused on the CPU from 2M parameters) | default (PyTorch's per device) | loop | foreach | fused
    conv_kernels: str = "auto"         # auto | direct: the training-time convolution kernel (piggyback/convkernels.py)
    log_every: int = 10                # Iterations between loss logs to MLflow.
    cyclegan: CycleGANConfig = field(default_factory=CycleGANConfig)
    pix2pix: Pix2PixConfig = field(default_factory=Pix2PixConfig)


@dataclass(frozen=True)
class TaskConfig:
    dataset: str                       # Key in `datasets`.
    prev: str                          # Predecessor task id, or "init" for the first task.
    mode: str = "cyclegan"             # cyclegan (unpaired) | pix2pix (paired)
    direction: str = "AtoB"            # AtoB | BtoA
    epochs: Optional[int] = None       # Per-task overrides of train.epochs / train.epochs_decay / model.lam.
    epochs_decay: Optional[int] = None
    lam: Optional[float] = None


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 50
    fid_weights: Optional[str] = None  # Path to pt_inception-2015-12-05-6726825d.pth; else hub cache, else download.
    require_fid: bool = False          # Fail the stage when FID cannot be computed (no weights).
    kid_subsets: int = 100
    kid_subset_size: int = 1000        # Lowered automatically to the size of small test sets.
    num_test: int = 0                  # Translate at most this many test images (0: all).
    grid_images: int = 8               # Images in the sample grid.


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    experiment: str = "piggyback-gan"
    enabled: bool = True
    registered_model: Optional[str] = "piggyback-gan"  # report: register the final generator under this name (null: don't)


@dataclass(frozen=True)
class Params:
    base: BaseConfig
    datasets: dict                     # {name: DatasetConfig}
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    tasks: dict                        # {task id: TaskConfig}, insertion order as in params.yaml
    eval: EvalConfig
    mlflow: MlflowConfig

    def task_order(self) -> list[str]:
        """Task ids in training order, following `prev` links from "init"."""
        return task_order(self.tasks)


CHOICES = {
    "DatasetConfig.source": {"embedded", "cyclegan", "pix2pix", "cityscapes", "folder"},
    "DataConfig.bad_images": {"skip", "stop"},
    "ModelConfig.netD": {"basic", "n_layers", "pixel"},
    "CycleGANConfig.gan_mode": {"lsgan", "vanilla"},
    "Pix2PixConfig.gan_mode": {"lsgan", "vanilla"},
    "TrainConfig.method": {"piggyback", "separate", "finetune"},
    "TrainConfig.amp": {"none", "bf16", "fp16"},
    "TrainConfig.adam_impl": {"auto", "default", "foreach", "fused", "loop"},
    "TrainConfig.conv_kernels": {"auto", "direct"},
    "TaskConfig.mode": {"cyclegan", "pix2pix"},
    "TaskConfig.direction": {"AtoB", "BtoA"},
}


# Inclusive bounds of every number in params.yaml (None: unbounded); "open" marks an excluded lower bound.
# Floats must also be finite. tests/test_hostile_numbers.py checks that every numeric field is listed here.
RANGES: dict[str, tuple] = {
    "BaseConfig.seed": (0, 2**63 - 1),
    "DatasetConfig.size": (1, 4096), "DatasetConfig.n_train": (1, None), "DatasetConfig.n_test": (1, None),
    "DatasetConfig.resize": (1, 16384), "DatasetConfig.load_size": (1, 16384), "DatasetConfig.crop_size": (1, 16384),
    "DataConfig.load_size": (1, 16384), "DataConfig.crop_size": (1, 16384), "DataConfig.num_workers": (0, 256),
    "DataConfig.max_download_bytes": (1, None), "DataConfig.download_timeout": (0, 86400, "open"),
    "DataConfig.download_retries": (1, 100),
    "ModelConfig.ngf": (1, 4096), "ModelConfig.ndf": (1, 4096), "ModelConfig.n_layers_D": (1, 10),
    "ModelConfig.input_nc": (1, 64), "ModelConfig.output_nc": (1, 64), "ModelConfig.lam": (0, 1, "open"),
    "CycleGANConfig.lambda_A": (0, None), "CycleGANConfig.lambda_B": (0, None),
    "CycleGANConfig.lambda_identity": (0, None), "CycleGANConfig.pool_size": (0, None),
    "Pix2PixConfig.lambda_L1": (0, None), "Pix2PixConfig.pool_size": (0, None),
    "TrainConfig.epochs": (0, None), "TrainConfig.epochs_decay": (0, None), "TrainConfig.batch_size": (1, None),
    "TrainConfig.lr": (0, 1, "open"), "TrainConfig.beta1": (0, 0.999999), "TrainConfig.beta2": (0, 0.999999),
    "TrainConfig.nproc": (1, 1024), "TrainConfig.snapshot_every": (0, None), "TrainConfig.probe_images": (1, 1024),
    "TrainConfig.max_steps": (0, None), "TrainConfig.log_every": (1, None),
    "TaskConfig.epochs": (0, None), "TaskConfig.epochs_decay": (0, None), "TaskConfig.lam": (0, 1, "open"),
    "EvalConfig.batch_size": (1, None), "EvalConfig.kid_subsets": (1, None), "EvalConfig.kid_subset_size": (1, None),
    "EvalConfig.num_test": (0, None), "EvalConfig.grid_images": (0, 1024),
}


def check_range(key: str, value: Any, bounds: tuple) -> None:
    """ConfigError naming `key` when the number `value` is not finite or outside `bounds` (see RANGES)."""
    lo, hi, *open_ = bounds
    low_ok = value > lo if open_ else value >= lo
    if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
        span = f"{'(' if open_ else '['}{lo}, {'inf)' if hi is None else f'{hi}]'}"
        raise ConfigError(f"{key}: must be a finite number in {span}, got {value!r}")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float, str, bool, dict) and not isinstance(value, tp) or (
        tp is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys; `key` names it in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"Unknown config key: {key}.{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{key}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"Missing config key: {sub}")
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            value = build(tp, value, sub)
        else:
            value = _check_type(value, tp, sub)
        allowed = CHOICES.get(f"{cls.__name__}.{f.name}")
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"{sub}: {value!r} is not one of {sorted(allowed)}")
        bounds = RANGES.get(f"{cls.__name__}.{f.name}")
        if bounds and value is not None:
            check_range(sub, value, bounds)
        kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own validation names the field: prefix the section
        raise ConfigError(f"{key}.{e}") from None
    _validate(obj, key)
    return obj


def _validate(obj: Any, key: str) -> None:
    """Checks across fields, and of values the type table cannot express (hashes, URLs). Numbers are checked
    against RANGES in `build`; lambdas and their overrides by GeneratorConfig itself."""
    if isinstance(obj, DatasetConfig):
        if obj.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", obj.sha256):
            raise ConfigError(f"{key}.sha256: expected 64 hex digits (a SHA-256), got {obj.sha256!r}")
        if obj.url is not None and urllib.parse.urlsplit(obj.url).scheme.lower() not in ("http", "https"):
            raise ConfigError(f"{key}.url: only http:// and https:// URLs are downloaded, got {obj.url!r}")
    if isinstance(obj, DataConfig) and obj.load_size < obj.crop_size:
        raise ConfigError(f"{key}.load_size ({obj.load_size}) must be >= {key}.crop_size ({obj.crop_size})")
    if isinstance(obj, TrainConfig) and (obj.epochs < 0 or obj.epochs_decay < 0 or obj.epochs + obj.epochs_decay == 0):
        raise ConfigError(f"{key}.epochs / epochs_decay: need >= 0 each and at least one epoch in all")


def task_order(tasks: dict) -> list[str]:
    """Follow `prev` links from "init"; every task must be reached exactly once."""
    nexts: dict[str, list[str]] = {}
    for tid, t in tasks.items():
        nexts.setdefault(t.prev, []).append(tid)
    order, cur = [], "init"
    while cur in nexts:
        (nxt, *more) = nexts[cur]
        if more:
            raise ConfigError(f"tasks: {cur!r} has several successors: {sorted(nexts[cur])}")
        order.append(nxt)
        cur = nxt
    missing = sorted(set(tasks) - set(order))
    if missing:
        raise ConfigError(f"tasks.{missing[0]}.prev: {tasks[missing[0]].prev!r} does not lead back to 'init'")
    return order


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from params.yaml) into `Params`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    sections = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"Unknown config key: {unknown[0]} in {source} (sections: {', '.join(sorted(sections))})")
    datasets = {_check_key("datasets", k): build(DatasetConfig, v, f"datasets.{k}")
                for k, v in _section(raw, "datasets").items()}
    tasks = {}
    for tid, v in _section(raw, "tasks").items():
        if _check_key("tasks", tid) == "init":
            raise ConfigError("tasks key 'init': reserved for the empty model that the first task starts from")
        tasks[tid] = build(TaskConfig, v, f"tasks.{tid}")
        if tasks[tid].dataset not in datasets:
            raise ConfigError(f"tasks.{tid}.dataset: {tasks[tid].dataset!r} is not a key of `datasets`")
    p = Params(
        base=build(BaseConfig, raw.get("base"), "base"),
        datasets=datasets,
        data=build(DataConfig, raw.get("data"), "data"),
        model=build(ModelConfig, raw.get("model"), "model"),
        train=build(TrainConfig, raw.get("train"), "train"),
        tasks=tasks,
        eval=build(EvalConfig, raw.get("eval"), "eval"),
        mlflow=build(MlflowConfig, raw.get("mlflow"), "mlflow"),
    )
    task_order(p.tasks)
    for tid in p.tasks:
        r = task_recipe(p, tid)
        if r.epochs + r.epochs_decay == 0:
            raise ConfigError(f"tasks.{tid}.epochs / epochs_decay: the task would train 0 epochs "
                              f"({r.epochs} + {r.epochs_decay}, after train.epochs / train.epochs_decay)")
    for key in p.datasets:
        dataset_data(p, key)   # per-dataset sizes checked like data.*
    return p


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to settings, got {value!r}")
    return value


def _check_key(section: str, key: Any) -> str:
    """Dataset keys and task ids: safe names, and without '.', since dvc.yaml reads `<section>.<key>`."""
    check_name(f"{section} key", key)
    if "." in key:
        raise ConfigError(f"{section} key {key!r}: dataset keys and task ids may not hold '.' "
                          f"(dvc.yaml reads their params as {section}.<key>)")
    return key


def dataset_data(p: Params, dataset: str) -> DataConfig:
    """`data` with `dataset`'s own load_size / crop_size put in: what its tasks train and test at.

    Only crop_size given: load_size keeps data's ratio (72 / 64 * 256 = 288), so the random crop still
    jitters. Only load_size given: crop_size is data.crop_size, capped at it.
    """
    ds, data = p.datasets[dataset], p.data
    if ds.load_size is None and ds.crop_size is None:
        return data
    crop = ds.crop_size if ds.crop_size is not None else min(data.crop_size, ds.load_size)
    load = ds.load_size if ds.load_size is not None else round(crop * data.load_size / data.crop_size)
    return build(DataConfig, {**as_dict(data), "load_size": load, "crop_size": crop}, f"datasets.{dataset}")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); is it the right file?") from e
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse_params(raw or {}, str(path))
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


@dataclass(frozen=True)
class TaskRecipe:
    """Everything one task trains with: shared train settings with the task's overrides applied."""
    task: str
    dataset: str
    mode: str
    direction: str
    epochs: int
    epochs_decay: int
    lam: float


def task_recipe(p: Params, task: str) -> TaskRecipe:
    if task not in p.tasks:
        raise ConfigError(f"tasks.{task}: no such task (known: {', '.join(p.tasks) or 'none'})")
    t = p.tasks[task]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return TaskRecipe(
        task=task, dataset=t.dataset, mode=t.mode, direction=t.direction,
        epochs=pick(t.epochs, p.train.epochs), epochs_decay=pick(t.epochs_decay, p.train.epochs_decay),
        lam=pick(t.lam, p.model.lam),
    )


def as_dict(obj: Any) -> Any:
    """Dataclasses (nested, in dicts) to plain dicts, for JSON metadata and MLflow params."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
