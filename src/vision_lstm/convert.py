"""Load the official NX-AI/vision-lstm ``VisionLSTM2`` checkpoints into :class:`~vision_lstm.model.VisionLSTM`.

Two layouts exist: the torch.hub layout (``blocks.3.rowwise_from_bot_right.layer.proj_up.weight``, ...) and the raw
training layout (a dict with ``state_dict``; flat ``blocks.i`` with ``.xlstm.``, ``.xlstm_norm.``, ``.conv1d.``,
``post_blocks_norm``, ``head.0``/``head.1``). Both are first brought to the hub layout, then renamed to ours.
"""
from __future__ import annotations

import re

import torch

from .errors import VilError
from .layers import interpolate_pos_embed

_HUB_TO_OURS = (
    (".rowwise_from_top_left.", ".forward_block."),
    (".rowwise_from_bot_right.", ".backward_block."),
    (".layer.mlstm_cell.", ".layer."),
    ("legacy_norm.", "head_norm."),
)


def _raw_to_hub(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The raw training layout -> the hub layout (flat block i -> pair i // 2, even = top-left, odd = bottom-right)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".xlstm.", ".layer.").replace("xlstm.", "")
        key = key.replace(".xlstm_norm.", ".norm.").replace(".conv1d.", ".conv.")
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match:
            i, rest = int(match.group(1)), match.group(2)
            direction = "rowwise_from_top_left" if i % 2 == 0 else "rowwise_from_bot_right"
            key = f"blocks.{i // 2}.{direction}.{rest}"
        key = key.replace("post_blocks_norm.", "norm.")
        out[key] = value
    if "head.1.weight" in out:  # head = Sequential(LayerNorm, Linear) in the raw layout
        for p in ("weight", "bias"):
            out[f"legacy_norm.{p}"] = out.pop(f"head.0.{p}")
            out[f"head.{p}"] = out.pop(f"head.1.{p}")
    return out


def official_to_ours(state_dict: dict) -> dict[str, torch.Tensor]:
    """Rename an official state dict (either layout) to this library's parameter names."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    raw = any(re.match(r"blocks\.\d+\.(xlstm|xlstm_norm)\.", k) for k in state_dict)
    hub = _raw_to_hub(state_dict) if raw else dict(state_dict)
    out = {}
    for key, value in hub.items():
        for old, new in _HUB_TO_OURS:
            key = key.replace(old, new)
        out[key] = value
    return out


def load_official_state_dict(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """Load official VisionLSTM2 weights into ``model`` (in place; returns it).

    The position embedding is resized (bicubic) when the model's patch grid differs. Raises :class:`VilError`
    naming the missing, unexpected and mis-shaped keys when the weights do not fit.
    """
    ours = official_to_ours(state_dict)
    target = model.state_dict()
    if "pos_embed.embed" in ours and "pos_embed.embed" in target:
        ours["pos_embed.embed"] = interpolate_pos_embed(ours["pos_embed.embed"], target["pos_embed.embed"].shape[1:3])
    check_state_dict_fits(target, ours, source="the official checkpoint's weights")
    model.load_state_dict(ours)
    return model


def check_state_dict_fits(target: dict, incoming: dict, source: str = "the weights") -> None:
    """Raise :class:`VilError` listing missing, unexpected and mis-shaped keys (at most a few of each)."""
    missing = sorted(set(target) - set(incoming))
    unexpected = sorted(set(incoming) - set(target))
    mis_shaped = sorted(k for k in set(target) & set(incoming) if tuple(target[k].shape) != tuple(incoming[k].shape))
    if not (missing or unexpected or mis_shaped):
        return

    def show(keys, describe=lambda k: k):
        listed = ", ".join(describe(k) for k in keys[:5])
        return listed + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if mis_shaped:
        parts.append("mis-shaped keys: " + show(
            mis_shaped, lambda k: f"{k} {tuple(incoming[k].shape)} vs model {tuple(target[k].shape)}"))
    raise VilError(f"{source} do not fit the model: " + "; ".join(parts)
                   + ". Build the model with the configuration the weights were trained with.")
