"""Atomic checkpoints (temporary file, fsync, rename) and self-describing safetensors weights."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from safetensors import safe_open

from .convert import check_state_dict_fits
from .errors import VilError
from .model import ViLConfig, VisionLSTM


_FILE_MODE = 0o644


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated one. On failure (disk full,
    ...) the temporary file is removed and the old file stays; the OSError propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a training checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise VilError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise VilError(f"checkpoint {path} is corrupt or not a vision-lstm checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise VilError(f"checkpoint {path} is not a vision-lstm training checkpoint (no model/step entries)")
    return state


METADATA_KEY = "vision_lstm"


def save_weights(model: VisionLSTM, path: str | Path, model_name: str, extra: dict | None = None) -> None:
    """Write the model's weights as safetensors with everything needed to rebuild it in the metadata.

    The metadata is one JSON entry with sorted keys (safetensors does not keep the order of several entries), so
    the same weights always give the same bytes.
    """
    info = {"model": model_name, "config": model.config.to_dict(), **(extra or {})}
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Through atomic_write like every other output (same file mode, fsync, rename); safetensors' own save_file
    # would recreate the temporary file with mode 0600.
    atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata=metadata)))


def read_weights_metadata(path: str | Path) -> dict:
    """The metadata dict written by :func:`save_weights` (model name, config, dataset, classes, ...)."""
    path = Path(path)
    if not path.is_file():
        raise VilError(f"weights file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise VilError(f"weights file {path} is not a valid safetensors file ({e})") from None
    try:
        metadata = json.loads(raw) if raw else None
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("config"), dict):
        raise VilError(f"weights file {path} has no vision-lstm metadata (model config); "
                       f"it was not written by this library's save_weights")
    return metadata


def load_weights(path: str | Path, device: str | torch.device = "cpu",
                 mlstm_mode: str | None = None) -> tuple[VisionLSTM, dict]:
    """Rebuild the model described by a weights file's metadata and load the weights. Returns (model, metadata).

    ``mlstm_mode`` replaces the form of the cell the weights were saved with (the same function: for example
    "parallel" for weights trained with a GPU-only ``kernels:`` backend).

    ``path`` is a ``model.safetensors`` written at the end of a run, or a run's training checkpoint ``last.ckpt``
    (a run in progress): then the weights are the ones the run evaluates (the EMA weights if it keeps an EMA), and
    the metadata is rebuilt from the checkpoint's config in the same form.
    """
    path = Path(path)
    if not path.is_file():
        raise VilError(f"weights file {path} not found")
    with open(path, "rb") as f:
        is_checkpoint = f.read(2) == b"PK"  # torch.save writes a zip archive; safetensors starts with a length
    if is_checkpoint:
        config, tensors, metadata = _weights_from_checkpoint(path)
    else:
        metadata = read_weights_metadata(path)
        try:
            config = ViLConfig(**metadata["config"])
        except (TypeError, ValueError) as e:
            raise VilError(f"weights file {path}: invalid model config in metadata ({e})") from None
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise VilError(f"weights file {path} is corrupt ({e})") from None
    if mlstm_mode is not None:
        try:
            config = dataclasses.replace(config, mlstm_mode=mlstm_mode)
        except ValueError as e:
            raise VilError(str(e)) from None
    model = VisionLSTM(config)
    check_state_dict_fits(model.state_dict(), tensors, source=f"the weights in {path}")
    model.load_state_dict(tensors)
    return model.to(device).eval(), metadata


def _weights_from_checkpoint(path: Path) -> tuple[ViLConfig, dict, dict]:
    """(model config, state dict, metadata as save_weights writes it) of a training checkpoint."""
    from .data import get_spec

    state = load_checkpoint(path)
    run = state.get("config") if isinstance(state.get("config"), dict) else {}
    try:
        config = ViLConfig(**state["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise VilError(f"checkpoint {path} has no usable model config ({type(e).__name__}: {e})") from None
    ema = state.get("ema") is not None
    metadata = {"model": state.get("model_name", run.get("model")), "config": config.to_dict(), "ema": ema,
                "precision": run.get("precision", "fp32"), "epochs_done": state.get("epoch"),
                "step": state.get("step")}
    if run.get("dataset"):
        spec = get_spec(run["dataset"])
        metadata.update(dataset=spec.name, classes=list(spec.classes), mean=list(spec.mean), std=list(spec.std))
    return config, state["ema"] if ema else state["model"], metadata
