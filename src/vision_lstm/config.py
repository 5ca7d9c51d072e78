"""Training configuration: a dataclass built from a YAML recipe plus command-line overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import VilError
from .runtime import PRECISIONS

# Test-time augmentations (data.tta_views): mirror image; 8 one-pixel shifts; both (18 views).
TTA_KINDS = ("flip", "shift", "flip-shift")


def tta_kind(value) -> str | None:
    """A tta setting as evaluation uses it: True (the setting before there was a choice) means "flip"; False,
    None and "none" (the CLI's word) mean no TTA; a kind passes through (checked by the caller)."""
    if value is True:
        return "flip"
    return None if value in (False, None, "none") else value

RECIPE_DIR_NAME = "configs"
AUGMENT_KEYS = {"translate", "hflip", "erase", "rotate", "zoom"}


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    model: str = "vil_tiny"
    model_args: dict = field(default_factory=dict)  # overrides of the registry entry (dim, depth, patch_size, ...)
    epochs: int = 10
    batch_size: int = 128  # global batch (split over processes under torchrun)
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema: bool = False
    ema_decay: float = 0.999
    eval_raw: bool = False  # with ema: also evaluate the raw weights each epoch (= the same run without EMA)
    # {"translate": pad, "hflip": bool, "erase": probability of random erasing, "rotate": max degrees, "zoom": max
    # relative scale change}; keys not given: the dataset's default
    augment: dict = field(default_factory=dict)
    mixup: float = 0.0  # Beta alpha of mixup (0: off)
    cutmix: float = 0.0  # Beta alpha of CutMix (0: off); with both on, one of the two per batch
    seed: int = 0
    data_dir: str | None = None
    download: bool = True
    output: str | None = None
    resume: str | None = None
    save_every: int = 500  # steps between mid-epoch checkpoints (0: only at epoch ends)
    train_subset: int | None = None
    val_split: int = 0  # hold out the last N training images as a validation set (then the test set is not used)
    test_subset: int | None = None
    eval_batch_size: int = 500
    # "bf16" (autocast; weights, optimiser and EMA stay fp32), "fp32", or "auto": bf16 where the processor has bf16
    # matrix arithmetic and its bf16 products measure >= 1.5x fp32's, else fp32 (runtime.resolve_precision)
    precision: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False  # recompute block pairs' activations in backward: less memory, 15-35 % slower
    device: str = "auto"
    threads: int | None = None
    nan_policy: str = "stop"  # "stop" or "skip" a step whose loss or gradient is not finite
    # also report accuracy with test-time augmentation: "flip" (the image and its mirror image) or "shift" (the image
    # and its 8 one-pixel shifts); true means "flip"
    tta: str | bool | None = None
    tta_epochs: str = "all"  # evaluate the TTA accuracy after "all" epochs or only after the "last" (shift: 9x cost)
    quiet: bool = False

    def validate(self) -> "TrainConfig":
        if self.augment is None:  # `augment:` left empty in a recipe: the dataset's default
            self.augment = {}
        aug = self.augment if isinstance(self.augment, dict) else {}
        erase, rotate, zoom = (float(aug.get(key) or 0) for key in ("erase", "rotate", "zoom"))
        self.tta = tta_kind(self.tta)
        checks = [
            (self.tta in (None, *TTA_KINDS), f"tta must be one of {', '.join(TTA_KINDS)}, true or false, "
                                             f"got {self.tta!r}"),
            (self.tta_epochs in ("all", "last"), f"tta_epochs must be all or last, got {self.tta_epochs!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.nan_policy in ("stop", "skip"), f"nan_policy must be stop or skip, got {self.nan_policy!r}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.val_split >= 0, f"val_split must be >= 0, got {self.val_split}"),
            (self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1"),
            (self.mixup >= 0 and self.cutmix >= 0,
             f"mixup and cutmix are Beta alphas and must be >= 0, got {self.mixup} and {self.cutmix}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (isinstance(self.augment, dict) and set(self.augment) <= AUGMENT_KEYS,
             f"augment must be a mapping with keys among {', '.join(sorted(AUGMENT_KEYS))}, got {self.augment!r}"),
            (0 <= erase <= 1, f"augment.erase is a probability in [0, 1], got {erase}"),
            (0 <= rotate <= 180, f"augment.rotate is a maximum angle in degrees in [0, 180], got {rotate}"),
            (0 <= zoom < 1, f"augment.zoom is a maximum relative scale change in [0, 1), got {zoom}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VilError(f"invalid configuration: {message}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise VilError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise VilError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise VilError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - config_fields())
    if unknown:
        raise VilError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                       f"valid: {', '.join(sorted(config_fields()))}")
    return data


def build_config(recipe: str | Path | None, overrides: dict) -> TrainConfig:
    """Recipe values first, then every override that is not None; a mapping override (model_args, augment) is
    merged into the recipe's mapping key by key, so e.g. --drop-path keeps the recipe's model size."""
    values = load_yaml(recipe) if recipe else {}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        elif value is not None:
            values[key] = value
    return TrainConfig(**values).validate()


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
