"""Command-line entry points: ``vil-train``, ``vil-evaluate``, ``vil-predict`` (also ``train.py`` etc. at the root)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import TTA_KINDS
from .errors import VilError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def default_recipe(dataset: str) -> Path | None:
    from .data import get_spec
    name = get_spec(dataset).name
    for folder in (Path.cwd() / "configs", REPO_CONFIGS):
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def train_parser() -> argparse.ArgumentParser:
    from .data import dataset_names
    from .model import list_models

    p = argparse.ArgumentParser(
        prog="train.py", description="Train a Vision-LSTM classifier. Flags override the YAML recipe "
        "(default: configs/<dataset>.yaml).")
    p.add_argument("--dataset", choices=dataset_names(),
                   help="dataset (default: the --config recipe's, else mnist)")
    p.add_argument("--model", choices=list_models(), help="registry name (default: from the recipe)")
    p.add_argument("--config", help="YAML recipe (default: configs/<dataset>.yaml)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--mixup", type=float, help="mixup Beta alpha, e.g. 0.8 (0: off)")
    p.add_argument("--cutmix", type=float, help="CutMix Beta alpha, e.g. 1.0 (0: off); with --mixup, one per batch")
    p.add_argument("--drop-path", type=float, help="drop-path rate (model override)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="override one argument of the model (repeatable; the value is read as YAML), e.g. dim=128 "
                        "or mlstm_mode=chunkwise")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block pair's activations in backward: much less memory, slower steps")
    p.add_argument("--erase", type=float, metavar="P",
                   help="random erasing: probability per image of blanking one random rectangle (0: off)")
    p.add_argument("--rotate", type=float, metavar="DEG", help="random rotation up to +-DEG degrees (0: off)")
    p.add_argument("--zoom", type=float, metavar="Z", help="random scaling by a factor in [1-Z, 1+Z] (0: off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="dataset folder (default: $VIL_DATA_DIR, else ./data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing files")
    p.add_argument("--output", help="run folder (default: runs/<dataset>-<time>)")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the latest in --output")
    p.add_argument("--save-every", type=int, help="steps between mid-epoch checkpoints (0: epoch ends only)")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on the first N training images")
    p.add_argument("--test-subset", type=int, metavar="N", help="evaluate on the first N test images")
    p.add_argument("--val-split", type=int, metavar="N",
                   help="hold out the last N training images and evaluate on them instead of the test set")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast, fp32, or auto (the recipes' choice): bf16 where the processor has bf16 matrix "
                        "arithmetic (AVX512-BF16, AMX), else fp32")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights")
    p.add_argument("--eval-raw", action="store_true", default=None,
                   help="with EMA: also evaluate the raw weights each epoch (what the run gives without EMA)")
    p.add_argument("--tta", nargs="?", const="flip", choices=[*TTA_KINDS, "none"],
                   help="also report test-time-augmented accuracy: flip (default), shift (8 one-pixel shifts) or "
                        "flip-shift (both, 18 views)")
    p.add_argument("--tta-epochs", choices=["all", "last"], help="evaluate TTA after all epochs or the last only")
    p.add_argument("--nan-policy", choices=["stop", "skip"])
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    return p


def parse_model_args(items: list[str]) -> dict:
    """["dim=128", "mlstm_mode=chunkwise"] -> {"dim": 128, "mlstm_mode": "chunkwise"}: each value read as YAML."""
    import yaml
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VilError(f"--model-arg expects KEY=VALUE (e.g. dim=128), got {item!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise VilError(f"--model-arg {item!r}: the value is not valid YAML ({e})") from None
    return parsed


def train_main(argv: list[str] | None = None) -> dict:
    from .config import build_config
    from .engine import Trainer

    args = train_parser().parse_args(argv)
    try:
        # --config alone trains on the recipe's dataset; --dataset alone picks configs/<dataset>.yaml.
        recipe = args.config or default_recipe(args.dataset or "mnist")
        if recipe is None:
            print(f"note: no recipe configs/{args.dataset or 'mnist'}.yaml found; using built-in defaults",
                  file=sys.stderr)
        overrides = {
            "dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
            "label_smoothing": args.label_smoothing, "mixup": args.mixup, "cutmix": args.cutmix,
            "seed": args.seed, "data_dir": args.data_dir,
            "download": False if args.no_download else None, "output": args.output, "resume": args.resume,
            "save_every": args.save_every, "train_subset": args.train_subset, "test_subset": args.test_subset,
            "val_split": args.val_split, "precision": args.precision, "compile": args.compile, "ema": args.ema,
            "eval_raw": args.eval_raw, "tta": args.tta, "tta_epochs": args.tta_epochs, "nan_policy": args.nan_policy,
            "device": args.device, "threads": args.threads, "quiet": args.quiet, "grad_checkpointing": args.grad_checkpointing,
        }
        # Mapping overrides are merged into the recipe's model_args / augment by build_config.
        model_args = parse_model_args(args.model_arg or [])
        if args.drop_path is not None:
            model_args["drop_path_rate"] = args.drop_path
        if model_args:
            overrides["model_args"] = model_args
        augment = {key: value for key, value in (("erase", args.erase), ("rotate", args.rotate), ("zoom", args.zoom))
                   if value is not None}
        if augment:
            overrides["augment"] = augment
        config = build_config(recipe, overrides)
        explicit = {k for k, v in overrides.items() if v is not None}
        return Trainer(config, explicit=explicit).run()
    except VilError as e:
        _fail(str(e))


def evaluate_parser() -> argparse.ArgumentParser:
    from .data import dataset_names
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate saved weights on a dataset split.")
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--weights", required=True,
                   help="model.safetensors written by train.py, or a run's last.ckpt (its EMA weights if it keeps one)")
    p.add_argument("--data-dir", help="dataset folder (default: $VIL_DATA_DIR, else ./data)")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--val-split", type=int, metavar="N",
                   help="evaluate on the last N training images (the validation split of train.py --val-split N)")
    p.add_argument("--tta", nargs="?", const="flip", choices=TTA_KINDS,
                   help="also report the accuracy of predictions averaged over the image and its mirror image "
                        "(flip, the default), its 8 one-pixel shifts (shift) or both (flip-shift, 18 views)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="default: the precision the weights were trained and evaluated in (fp32 if unknown), or fp32 "
                        "where that was bf16 and this processor has no bf16 matrix arithmetic")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-download", action="store_true")
    return p


def evaluate_main(argv: list[str] | None = None) -> dict:
    import torch

    from .checkpoint import load_weights
    from .data import get_spec, load_split, split_off_validation
    from .engine import evaluate

    args = evaluate_parser().parse_args(argv)
    try:
        model, metadata = load_weights(args.weights, device=args.device)
        spec = get_spec(args.dataset)
        if tuple(spec.image_shape[:1]) != (model.config.in_chans,) or len(spec.classes) != model.config.num_classes:
            raise VilError(f"weights {args.weights} were trained for {model.config.in_chans}-channel images and "
                           f"{model.config.num_classes} classes (dataset {metadata.get('dataset', '?')}); "
                           f"{spec.name} has {spec.image_shape[0]} channels and {len(spec.classes)} classes")
        split = args.split
        if args.val_split is not None:
            split = "val"
            data = load_split(args.dataset, "train", args.data_dir, download=not args.no_download)
            data = split_off_validation(data, args.val_split, "--val-split")[1]
        else:
            data = load_split(args.dataset, args.split, args.data_dir, download=not args.no_download)
        precision = _evaluation_precision(args.precision, metadata.get("precision", "fp32"), args.device)
        result = evaluate(model, data, args.batch_size, torch.device(args.device), precision, tta=args.tta)
    except VilError as e:
        _fail(str(e))
    out = {"dataset": spec.name, "split": split, "n": result["n"], "precision": precision,
           "accuracy": round(result["accuracy"], 6)}
    if args.tta:
        out["tta"] = args.tta
        out["accuracy_tta"] = round(result["accuracy_tta"], 6)
    if metadata.get("epochs_done") is not None:  # a training checkpoint: say how far its run had got
        out["epochs_done"] = metadata["epochs_done"]
    print(json.dumps(out), flush=True)
    return out


def _evaluation_precision(requested: str | None, trained: str, device: str) -> str:
    """The precision to evaluate in. By default the one the run evaluated in (its logged accuracy reproduces
    exactly), unless that was bf16 and this processor would emulate it (many times slower): then fp32, said on
    stderr."""
    from .runtime import native_bf16, resolve_precision

    if requested is None and trained == "bf16":  # bf16 wherever it is native, even where fp32 would be faster
        precision = "bf16" if native_bf16(device) else "fp32"
        if precision != "bf16":
            print("note: these weights were evaluated in bf16 during training, but this processor has no bf16 matrix "
                  "arithmetic (AVX512-BF16 or AMX); evaluating in fp32 instead, which may differ from the logged "
                  "accuracy in the last digits (--precision bf16 reproduces it exactly, slowly)", file=sys.stderr,
                  flush=True)
        return precision
    precision, note = resolve_precision(requested or trained, device)
    if note and requested == "bf16":
        print(note, file=sys.stderr, flush=True)
    return precision


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description="Classify image files (PNG, JPEG, ...).")
    p.add_argument("--weights", required=True, help="model.safetensors written by train.py")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("images", nargs="+", help="image files")
    return p


def load_image(path: str, in_chans: int, size: tuple[int, int]):
    """An image file -> uint8 tensor (C, H, W) resized to the model's input."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if in_chans == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise VilError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VilError(f"{path}: not a readable image ({e})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def predict_main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from .checkpoint import load_weights
    from .data import normalize

    args = predict_parser().parse_args(argv)
    try:
        model, metadata = load_weights(args.weights)
        classes = metadata.get("classes") or [str(i) for i in range(model.config.num_classes)]
        mean = tuple(metadata.get("mean") or (0.5,) * model.config.in_chans)
        std = tuple(metadata.get("std") or (0.5,) * model.config.in_chans)
        images = torch.stack([load_image(p, model.config.in_chans, model.config.img_size_hw) for p in args.images])
    except VilError as e:
        _fail(str(e))
    with torch.no_grad():
        probs = model(normalize(images, mean, std)).softmax(-1)
    results = []
    k = min(args.topk, probs.shape[1])
    for path, p in zip(args.images, probs):
        top = p.topk(k)
        ranked = [{"class": classes[i], "prob": round(float(v), 4)} for v, i in zip(top.values, top.indices)]
        results.append({"image": path, "top": ranked})
        print(f"{path}: " + ", ".join(f"{r['class']} {100 * r['prob']:.1f}%" for r in ranked), flush=True)
    print(json.dumps(results), flush=True)
    return results
