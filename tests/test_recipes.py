"""The shipped recipes (configs/*.yaml): each one parses and builds a model that runs on its dataset's images."""
from pathlib import Path

import pytest
import torch
from conftest import REPO

from vision_lstm import VilError
from vision_lstm.config import build_config
from vision_lstm.data import get_spec
from vision_lstm.model import create_model

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_the_documented_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"mnist", "fashion-mnist", "cifar10", "cifar10-vil"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_builds_and_runs(path: Path):
    cfg = build_config(str(path), {})
    spec = get_spec(cfg.dataset)
    C, H, W = spec.image_shape
    model = create_model(cfg.model, img_size=H, in_chans=C, num_classes=len(spec.classes), **cfg.model_args)
    with torch.no_grad():
        logits = model(torch.randn(2, C, H, W))
    assert logits.shape == (2, len(spec.classes))
    assert torch.isfinite(logits).all()


def test_plain_cifar_recipe_differs_from_the_hybrid_only_in_the_tokenizer():
    hybrid = build_config(str(REPO / "configs" / "cifar10.yaml"), {})
    plain = build_config(str(REPO / "configs" / "cifar10-vil.yaml"), {})
    model = create_model(plain.model, img_size=32, num_classes=10, **plain.model_args)
    assert model.config.stem == "patch" and model.config.grid == (8, 8)
    same = {k: v for k, v in vars(hybrid).items() if k not in ("model", "model_args")}
    assert same == {k: v for k, v in vars(plain).items() if k not in ("model", "model_args")}


def test_augment_settings_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: mnist\naugment:\n")  # left empty: the dataset's default
    assert build_config(str(recipe), {}).augment == {}
    recipe.write_text("dataset: mnist\naugment: {erase: 0.25}\n")
    assert build_config(str(recipe), {}).augment == {"erase": 0.25}
    for bad, message in (("{flip: true}", "keys among erase, hflip, rotate, translate, zoom"),
                         ("{erase: -0.1}", "probability"), ("{rotate: 200}", "angle in degrees"),
                         ("[translate]", "must be a mapping")):
        recipe.write_text(f"dataset: mnist\naugment: {bad}\n")
        with pytest.raises(VilError, match=message):
            build_config(str(recipe), {})
