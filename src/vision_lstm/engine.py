"""The training engine: data feeding, optimisation, evaluation, checkpoints, logs and plots.

Every source of randomness is derived from (seed, epoch, step), so a run resumed from a mid-epoch checkpoint
continues exactly as the uninterrupted run would have (same data order, augmentation and drop-path draws).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint, save_weights
from .config import TrainConfig, save_config, tta_kind
from .data import (
    ImageDataset,
    get_spec,
    load_split,
    mix_batch,
    normalize,
    random_affine,
    random_erase,
    random_hflip,
    random_translate,
    split_off_validation,
    tta_views,
)
from .errors import VilError
from .model import VisionLSTM, create_model, list_models
from .runtime import device_name, resolve_precision

# Settings that may change when a run is resumed; everything else is taken from the checkpoint.
RESUMABLE_OVERRIDES = {"resume", "output", "data_dir", "download", "quiet", "device", "threads", "epochs",
                       "save_every", "eval_batch_size", "tta", "tta_epochs", "eval_raw", "grad_checkpointing",
                       "precision"}
_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing): independent streams per (seed, epoch, step)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & _MASK63
        x = (x * 0xBF58476D1CE4E5B9) & _MASK63
    return x


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # The store from torchrun's rendezvous, with a prefix per restart round: after a worker is restarted, the
        # new round must not read the previous round's peer addresses (seen with gloo: "Connection refused" to a
        # dead worker's port, then a hang).
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"vision_lstm/attempt_{attempt}", store),
                                rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the training step


def param_groups(model: VisionLSTM, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norm scales, the learnable skip and the position embedding."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The run's optimiser: AdamW over :func:`param_groups`, fused on the CPU and CUDA (one kernel per parameter
    tensor for the whole update instead of about ten PyTorch ops: ViL-T has 513 tensors, and its update took 23
    against 8 ms per step, 2 cores of a Xeon, session 29, ad hoc). The same update, to float rounding."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                             fused=device.type in ("cpu", "cuda"))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimiser's own ``fused``: a checkpoint's param groups carry
    theirs, and one written before :func:`adamw` fused the update would turn it off for the rest of the run."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = optimizer.defaults.get("fused")


class EMA:
    """Exponential moving average of the weights (and buffers), kept in a separate model for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warmup: early averages follow the weights
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):  # batch-norm statistics: follow the model
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def augment_batch(images: torch.Tensor, spec_augment: dict, gen: torch.Generator, mean) -> torch.Tensor:
    """uint8 (N, C, H, W) -> augmented uint8, batched: rotation/zoom, shift, flip, then random erasing with the
    dataset ``mean`` (on the [0, 1] scale) as the fill. A disabled step draws nothing from ``gen``, so adding one
    leaves the others' draws unchanged."""
    degrees, zoom = float(spec_augment.get("rotate", 0) or 0), float(spec_augment.get("zoom", 0) or 0)
    if degrees or zoom:
        images = random_affine(images, gen, degrees, zoom)
    pad = int(spec_augment.get("translate", 0) or 0)
    if pad:
        images = random_translate(images, pad, gen)
    if spec_augment.get("hflip"):
        images = random_hflip(images, gen)
    erase = float(spec_augment.get("erase", 0) or 0)
    if erase:
        images = random_erase(images, gen, erase, [round(255 * m) for m in mean])
    return images


def default_augment(dataset: str) -> dict:
    spec = get_spec(dataset)
    return {"translate": 4 if "crop" in spec.augment else (2 if "translate" in spec.augment else 0),
            "hflip": "hflip" in spec.augment}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageDataset, batch_size: int, device: torch.device,
             precision: str = "fp32", tta: str | None = None, info: DistInfo | None = None) -> dict:
    """Loss, accuracy and confusion matrix of ``model`` on ``data`` (sharded over processes under torchrun).

    tta: "flip", "shift" or "flip-shift" adds ``accuracy_tta``, the accuracy of the softmax averaged over
    :func:`tta_views` (True, as before there was a choice, means "flip").
    """
    tta = tta_kind(tta)
    info = info or DistInfo()
    model.eval()
    n_classes = len(data.spec.classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct_tta = torch.zeros((), dtype=torch.int64)
    indices = torch.arange(len(data))[info.rank::info.world]
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        views = tta_views(data.images[idx], tta)  # uint8, so shifts fill in black as the training shifts do
        y = data.labels[idx]
        with _autocast(device, precision):
            logits = model(normalize(views[0], data.spec.mean, data.spec.std).to(device)).float().cpu()
            if tta:
                logits_tta = logits.softmax(-1)
                for view in views[1:]:
                    x = normalize(view, data.spec.mean, data.spec.std).to(device)
                    logits_tta += model(x).float().cpu().softmax(-1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(-1)
        confusion += torch.bincount(y * n_classes + pred, minlength=n_classes ** 2).view(n_classes, n_classes)
        if tta:
            correct_tta += (logits_tta.argmax(-1) == y).sum()
    for t in (confusion, loss_sum, correct_tta):
        all_reduce_sum(t, info)
    n = int(confusion.sum())
    result = {"n": n, "loss": float(loss_sum) / max(n, 1), "accuracy": float(confusion.trace()) / max(n, 1),
              "confusion": confusion}
    if tta:
        result["accuracy_tta"] = float(correct_tta) / max(n, 1)
    return result


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Output helpers


class RunLog:
    """Prints to stdout and appends to ``log.txt`` in the output folder (main process only)."""

    def __init__(self, folder: Path | None, enabled: bool = True):
        self.path = folder / "log.txt" if folder else None
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(history[0].keys())
    for row in history[1:]:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def plot_curves(path: Path, history: list[dict], eval_split: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h[f"{eval_split}_loss"] for h in history], "o-", label=eval_split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h[f"{eval_split}_acc"] for h in history], "o-", label=eval_split)
    if all(f"{eval_split}_acc_raw" in h for h in history):
        ax_acc.plot(epochs, [100 * h[f"{eval_split}_acc_raw"] for h in history], "o--",
                    label=f"{eval_split} (raw weights, no EMA)")
    tta = [(h["epoch"], 100 * h[f"{eval_split}_acc_tta"]) for h in history
           if isinstance(h.get(f"{eval_split}_acc_tta"), float)]
    if tta:
        ax_acc.plot(*zip(*tta), "s", label=f"{eval_split} (test-time augmentation)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(path: Path, confusion: torch.Tensor, classes: tuple[str, ...], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    norm = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            count = int(confusion[i, j])
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class NonFiniteError(VilError):
    pass


@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    correct: float = 0.0  # fractional under mixup/CutMix (credit by mixing weight)
    seen: int = 0
    skipped: int = 0

    def as_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "skipped": self.skipped}


class Trainer:
    def __init__(self, config: TrainConfig, explicit: set[str] | None = None):
        self.cfg = config
        self.explicit = explicit if explicit is not None else set(config.to_dict())
        self._stop_signal: int | None = None

    # -- setup ------------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # Subnormal floats are very slow on x86 CPUs and carry no useful signal in training.
        torch.set_flush_denormal(True)
        if cfg.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(cfg.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise VilError("--device cuda was requested but CUDA is not available; use --device cpu")
        self.info = setup_distributed(device.type)
        if device.type == "cuda" and self.info.enabled:
            device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if cfg.batch_size % self.info.world:
            raise VilError(f"batch size {cfg.batch_size} is not divisible by the {self.info.world} processes")

        # Output folder and resume.
        resume_path = None
        output = Path(cfg.output) if cfg.output else None
        if cfg.resume == "auto":
            if output is None:
                raise VilError("--resume auto needs --output: the run folder to continue")
            candidate = output / "last.ckpt"
            resume_path = candidate if candidate.exists() else None
        elif cfg.resume:
            resume_path = Path(cfg.resume)
            if not resume_path.is_file():
                raise VilError(f"--resume {resume_path}: no such checkpoint file")
            output = output or resume_path.parent
        if output is None:
            output = Path("runs") / f"{get_spec(cfg.dataset).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.output = output
        self.ckpt = load_checkpoint(resume_path) if resume_path else None
        if self.ckpt is not None:
            self._merge_checkpoint_config()
        # The precision this run computes in: "auto" depends on the processor, which may differ on a resume.
        self.precision, self.precision_note = resolve_precision(self.cfg.precision, self.device.type)
        if self.info.enabled:  # "auto" times products on each process: all of them take the main process's choice
            chosen = [self.precision, self.precision_note]
            dist.broadcast_object_list(chosen, src=0)
            self.precision, self.precision_note = chosen
        # Data, before the output folder: a run that cannot start (missing or corrupt files) leaves no folder behind.
        # The main process downloads what is missing; the others read the files once it has (after the barrier).
        cfg = self.cfg
        self.spec = get_spec(cfg.dataset)
        if self.info.is_main:
            train = load_split(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
        if self.info.enabled:
            dist.barrier()
        if not self.info.is_main:
            train = load_split(cfg.dataset, "train", cfg.data_dir, download=False)
        if cfg.val_split:
            train, self.eval_data = split_off_validation(train, cfg.val_split)
            self.eval_split = "val"
        else:
            self.eval_data = load_split(cfg.dataset, "test", cfg.data_dir, download=False)
            self.eval_split = "test"
            if cfg.test_subset:
                self.eval_data = self.eval_data.subset(0, cfg.test_subset)
        if cfg.train_subset:
            train = train.subset(0, min(cfg.train_subset, len(train)))
        self.train_data = train
        if len(train) < cfg.batch_size:
            raise VilError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}; "
                           f"lower --batch-size")
        if self.info.is_main:
            try:
                output.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise VilError(f"cannot create output folder {output}: {e}") from None
        if self.info.enabled:
            dist.barrier()
        self.log = RunLog(output, enabled=self.info.is_main)
        if self.info.is_main:
            save_config(cfg, output / "config.yaml")
        self.augment = {**default_augment(cfg.dataset), **cfg.augment}  # keys not given: the dataset's default

        # Model and optimiser.
        torch.manual_seed(cfg.seed)
        C, H, W = self.spec.image_shape
        model_args = {"img_size": (H, W) if H != W else H, "in_chans": C,
                      "num_classes": len(self.spec.classes), **cfg.model_args}
        if cfg.model not in list_models():
            raise VilError(f"unknown model {cfg.model!r}; choose from: {', '.join(list_models())}")
        try:
            self.model = create_model(cfg.model, **model_args).to(self.device)
        except ValueError as e:
            raise VilError(f"cannot build model {cfg.model!r} with {model_args}: {e}") from None
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.steps_per_epoch = len(train) // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = adamw(self.model, cfg, self.device)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps, min_ratio))
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.train_model = self.model
        if self.info.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

        # State.
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.history: list[dict] = []
        self.stats = _EpochStats()
        self.elapsed_before = 0.0
        self.resumes = 0
        if self.ckpt is not None:
            self._restore(self.ckpt)

    def _merge_checkpoint_config(self):
        saved = self.ckpt.get("config", {})
        current = self.cfg.to_dict()
        merged = dict(current)
        changed = []
        for key, value in saved.items():
            if key not in current:
                continue
            if key in RESUMABLE_OVERRIDES and key in self.explicit:
                continue
            if key in ("resume", "output"):
                continue
            if current[key] != value and key in self.explicit:
                changed.append(f"{key}={current[key]!r} (checkpoint: {value!r})")
            merged[key] = value
        if changed:
            print("warning: resuming with the checkpoint's settings; ignored " + ", ".join(changed),
                  file=sys.stderr, flush=True)
        self.cfg = TrainConfig(**merged).validate()

    def _restore(self, ckpt: dict):
        try:
            self.model.load_state_dict(ckpt["model"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise VilError(f"checkpoint does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
        self.step, self.epoch, self.step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        self.history = list(ckpt.get("history", []))
        self.stats = _EpochStats(**ckpt.get("epoch_stats", {}))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.resumes = int(ckpt.get("resumes", 0)) + 1
        if "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "epoch_stats": self.stats.as_dict(),
            "history": self.history,
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": self.model.config.to_dict(),
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
            "resumes": self.resumes,
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> None:
        if not self.info.is_main:
            return
        path = self.output / "last.ckpt"
        try:
            save_checkpoint(self._state(), path)
        except OSError as e:
            raise VilError(f"could not write checkpoint {path} ({e}); training stopped. The previous checkpoint "
                           f"(if any) is intact: free space and resume with --resume auto --output {self.output}") \
                from None

    # -- signals ----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signals(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _check_stop(self):
        stop = torch.tensor([1 if self._stop_signal else 0])
        all_reduce_sum(stop, self.info)
        if int(stop):
            self.save_checkpoint()
            name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
            self.log(f"{name} received: checkpoint saved at step {self.step} in {self.output / 'last.ckpt'}; "
                     f"continue with --resume auto --output {self.output}")
            raise SystemExit(128 + (self._stop_signal or signal.SIGTERM))

    # -- training ---------------------------------------------------------------------------------------------
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor,
                    gen: torch.Generator) -> tuple[float, float] | None:
        cfg = self.cfg
        # Mixing on the host batch before the transfer; with both alphas 0 it returns its inputs and lam = 1.
        x, y_mix, lam = mix_batch(normalize(images, self.spec.mean, self.spec.std), labels, gen, cfg.mixup,
                                  cfg.cutmix)
        x = x.to(self.device, non_blocking=True)
        y = labels.to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            logits = self.train_model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if lam < 1.0:
                y_mix = y_mix.to(self.device, non_blocking=True)
                loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_mix, label_smoothing=cfg.label_smoothing)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value) and not self.info.enabled:
            return self._non_finite("loss", loss_value)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            return self._non_finite("gradient norm" if math.isfinite(loss_value) else "loss", grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        pred = logits.detach().argmax(-1)
        correct = int((pred == y).sum())
        if lam < 1.0:
            correct = lam * correct + (1.0 - lam) * int((pred == y_mix).sum())
        return loss_value, correct

    def _non_finite(self, what: str, value: float):
        self.optimizer.zero_grad(set_to_none=True)
        where = f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.step_in_epoch + 1})"
        if self.cfg.nan_policy == "skip":
            self.log(f"warning: non-finite {what} ({value}) at {where}: step skipped")
            return None
        has_ckpt = self.output / "last.ckpt"
        kept = f"the last good checkpoint {has_ckpt} is kept" if has_ckpt.exists() else "no checkpoint was written yet"
        raise NonFiniteError(f"non-finite {what} ({value}) at {where}; training stopped, {kept}. Lower --lr, "
                             f"raise warmup, or set nan_policy: skip")

    def run(self) -> dict:
        self.t_start = time.perf_counter()  # wall clock includes data loading and model setup
        self._setup()
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        # the start and every resume name the processor: a resumed run may land on another machine
        where = f"{torch.get_num_threads()} threads, device {self.device} ({device_name(self.device)})"
        if self.ckpt is None:
            self.log(f"training {cfg.model} ({n_params / 1e6:.3f}M params, {self.model.config.grid[0]}x"
                     f"{self.model.config.grid[1]} tokens) on {self.spec.name}: {len(self.train_data)} train / "
                     f"{len(self.eval_data)} {self.eval_split} images, {cfg.epochs} epochs x "
                     f"{self.steps_per_epoch} steps, batch {cfg.batch_size}, {self.precision}, "
                     f"{self.info.world} process(es), {where}")
            self.log(f"output: {self.output}")
        else:
            self.log(f"resumed from checkpoint at step {self.step} (epoch {self.epoch + 1}, batch "
                     f"{self.step_in_epoch}) -- resume #{self.resumes}; {where}")
        if self.precision_note:
            self.log(self.precision_note)
        with self._signals():
            while self.epoch < cfg.epochs:
                self._run_epoch()
        return self._finish(n_params)

    def _run_epoch(self):
        cfg = self.cfg
        N, B = len(self.train_data), cfg.batch_size
        perm = torch.randperm(N, generator=generator(cfg.seed, 1, self.epoch))
        progress = None
        if self.info.is_main and not cfg.quiet and sys.stdout.isatty():
            from tqdm import tqdm
            progress = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, unit="step", dynamic_ncols=True,
                            desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False)
        t_epoch = time.perf_counter()
        images_this_segment = 0
        self.train_model.train()
        while self.step_in_epoch < self.steps_per_epoch:
            idx = perm[self.step_in_epoch * B:(self.step_in_epoch + 1) * B]
            gen = generator(cfg.seed, 2, self.epoch, self.step_in_epoch)
            images = augment_batch(self.train_data.images[idx], self.augment, gen, self.spec.mean)
            labels = self.train_data.labels[idx]
            images, labels = images[self.info.rank::self.info.world], labels[self.info.rank::self.info.world]
            torch.manual_seed(derive_seed(cfg.seed, 3, self.step, self.info.rank))  # drop-path draws
            result = self._train_step(images, labels, gen)
            self.scheduler.step()
            self.step += 1
            self.step_in_epoch += 1
            images_this_segment += B
            if result is None:
                self.stats.skipped += 1
            else:
                self.stats.loss_sum += result[0] * len(labels)
                self.stats.correct += result[1]
                self.stats.seen += len(labels)
            if progress is not None:
                rate = images_this_segment / max(time.perf_counter() - t_epoch, 1e-9)
                progress.set_postfix(loss=f"{self.stats.loss_sum / max(self.stats.seen, 1):.4f}",
                                     acc=f"{100 * self.stats.correct / max(self.stats.seen, 1):.2f}%",
                                     img_s=f"{rate:.0f}", refresh=False)
                progress.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
            if self._stop_signal is not None or self.info.enabled:
                self._check_stop()
        if progress is not None:
            progress.close()
        train_time = time.perf_counter() - t_epoch
        self._end_epoch(train_time, images_this_segment)

    def _end_epoch(self, epoch_time: float, images: int):
        cfg = self.cfg
        totals = torch.tensor([self.stats.loss_sum, self.stats.correct, self.stats.seen], dtype=torch.float64)
        all_reduce_sum(totals, self.info)
        eval_model = self.ema.model if self.ema is not None else self.model
        last = self.epoch + 1 == cfg.epochs
        tta = cfg.tta if cfg.tta_epochs == "all" or last else None
        result = evaluate(eval_model, self.eval_data, cfg.eval_batch_size, self.device, self.precision,
                          tta=tta, info=self.info)
        self.last_eval = result
        elapsed = self.elapsed_before + (time.perf_counter() - self.t_start)
        row = {
            "epoch": self.epoch + 1,
            "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)),
            f"{self.eval_split}_loss": result["loss"],
            f"{self.eval_split}_acc": result["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time,
            "elapsed_s": elapsed,
            "img_per_s": images / max(epoch_time, 1e-9),
        }
        if tta:
            row[f"{self.eval_split}_acc_tta"] = result["accuracy_tta"]
        raw = ""
        if cfg.eval_raw and self.ema is not None:
            # The raw weights are trained exactly as without EMA (the average never feeds back), so this column is
            # the no-EMA ablation of the same run at the cost of one more evaluation per epoch.
            raw_result = evaluate(self.model, self.eval_data, cfg.eval_batch_size, self.device, self.precision,
                                  tta=tta, info=self.info)
            row[f"{self.eval_split}_acc_raw"] = raw_result["accuracy"]
            raw_tta = ""
            if tta:
                row[f"{self.eval_split}_acc_raw_tta"] = raw_result["accuracy_tta"]
                raw_tta = f", TTA {100 * raw_result['accuracy_tta']:.2f}%"
            raw = f" (raw weights {100 * raw_result['accuracy']:.2f}%{raw_tta})"
        if self.stats.skipped:
            row["skipped_steps"] = self.stats.skipped
        self.history.append(row)
        tta_note = f" ({tta}-TTA {100 * result['accuracy_tta']:.2f}%)" if tta else ""
        self.log(f"epoch {row['epoch']:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc "
                 f"{100 * row['train_acc']:.2f}%  {self.eval_split} loss {result['loss']:.4f} acc "
                 f"{100 * result['accuracy']:.2f}%{tta_note}{raw}  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  "
                 f"epoch {epoch_time:.1f}s  elapsed {elapsed:.1f}s")
        self.epoch += 1
        self.step_in_epoch = 0
        self.stats = _EpochStats()
        if self.info.is_main:
            write_metrics_csv(self.output / "metrics.csv", self.history)
        self.save_checkpoint()

    def _finish(self, n_params: int) -> dict:
        cfg = self.cfg
        final_model = self.ema.model if self.ema is not None else self.model
        if not hasattr(self, "last_eval"):  # resumed after the last epoch had finished
            self.last_eval = evaluate(final_model, self.eval_data, cfg.eval_batch_size, self.device,
                                      self.precision, tta=cfg.tta, info=self.info)
        elapsed = self.elapsed_before + (time.perf_counter() - self.t_start)
        summary = {
            "dataset": self.spec.name, "model": cfg.model, "epochs": cfg.epochs,
            "test_accuracy": self.last_eval["accuracy"] if self.eval_split == "test" else None,
            "train_time_s": round(elapsed, 2), "output": str(self.output),
        }
        if self.eval_split == "val":
            summary["val_accuracy"] = self.last_eval["accuracy"]
        if cfg.tta:
            summary[f"{self.eval_split}_accuracy_tta"] = self.last_eval["accuracy_tta"]
        summary["params"] = n_params
        if self.info.is_main:
            save_weights(final_model, self.output / "model.safetensors", cfg.model,
                         extra={"dataset": self.spec.name, "classes": list(self.spec.classes),
                                "mean": list(self.spec.mean), "std": list(self.spec.std),
                                f"{self.eval_split}_accuracy": self.last_eval["accuracy"], "ema": bool(self.ema),
                                "precision": self.precision})
            plot_curves(self.output / "curves.png", self.history, self.eval_split)
            plot_confusion(self.output / "confusion.png", self.last_eval["confusion"], self.spec.classes,
                           f"{cfg.model} on {self.spec.name} {self.eval_split} "
                           f"({100 * self.last_eval['accuracy']:.2f}%)")
            self.log(json.dumps(summary))
        if self.info.enabled:
            dist.barrier()
        return summary
