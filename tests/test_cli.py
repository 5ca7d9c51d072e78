"""The command-line tools through subprocesses: a short real run, resume, evaluate, predict and bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

TINY_RECIPE = {
    "model": "vil_tiny",
    "model_args": {"dim": 16, "depth": 1, "patch_size": 7},
    "epochs": 1, "batch_size": 32, "lr": 0.003, "warmup_epochs": 0.2, "eval_batch_size": 250,
}


def run(script, *args, env=None, check=True, timeout=300):
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


def test_one_epoch_run_writes_every_output(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--train-subset", 512, "--test-subset", 500, "--seed", 1)
    summary = last_json(proc.stdout)
    assert set(summary) >= {"dataset", "model", "epochs", "test_accuracy", "train_time_s", "output"}
    assert summary["dataset"] == "mnist" and summary["epochs"] == 1 and summary["output"] == str(out)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    for name in ("config.yaml", "metrics.csv", "last.ckpt", "model.safetensors", "curves.png", "confusion.png",
                 "log.txt"):
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_time_s,elapsed_s,img_per_s"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model_args"] == TINY_RECIPE["model_args"] and saved["seed"] == 1  # flags override the recipe
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No precision in the recipe: "auto", bf16 autocast only where the processor has bf16 matrix arithmetic and
    # its bf16 products measure well ahead of fp32's.
    from vision_lstm.runtime import resolve_precision
    assert saved["precision"] == "auto"
    log = (out / "log.txt").read_text()
    assert f"batch 32, {resolve_precision('auto')[0]}, " in log and "precision auto: " in log

    # evaluate.py rebuilds the model from the weights' metadata alone and reproduces the accuracy.
    ev = run("evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors", "--data-dir", shared_data)
    result = last_json(ev.stdout)
    assert result["dataset"] == "mnist" and result["split"] == "test" and result["n"] == 10000
    assert 0.0 <= result["accuracy"] <= 1.0

    # predict.py on PNG files.
    from PIL import Image
    from vision_lstm.data import load_split
    test = load_split("mnist", "test", shared_data, download=False)
    paths = []
    for i in range(2):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).resize((56, 56)).save(p)
        paths.append(p)
    pred = run("predict.py", "--weights", out / "model.safetensors", "--topk", 2, *paths)
    ranked = last_json(pred.stdout)
    assert [r["image"] for r in ranked] == [str(p) for p in paths]
    assert all(len(r["top"]) == 2 and r["top"][0]["class"] in "0123456789" for r in ranked)


def test_evaluate_reproduces_a_bf16_runs_accuracy(tmp_path, recipe, shared_data):
    # The weights remember the precision they were evaluated in during training; evaluate.py uses it by default,
    # so the plain command reproduces the reported number exactly (fp32 and bf16 logits can rank images differently).
    # Where the processor would emulate bf16 (many times slower), the default is fp32 instead, said on stderr, and
    # --precision bf16 reproduces the number.
    from vision_lstm.runtime import native_bf16
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--train-subset", 256, "--precision", "bf16")
    reported = last_json(proc.stdout)["test_accuracy"]
    assert ("has no bf16 matrix arithmetic" in proc.stdout) == (not native_bf16())  # an explicit bf16 is kept
    plain = run("evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors", "--data-dir", shared_data)
    ev = last_json(plain.stdout)
    assert ev["precision"] == ("bf16" if native_bf16() else "fp32") and ev["n"] == 10000
    assert ("evaluating in fp32 instead" in plain.stderr) == (not native_bf16())
    exact = ev if native_bf16() else last_json(run(
        "evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors", "--data-dir", shared_data,
        "--precision", "bf16").stdout)
    assert exact["precision"] == "bf16" and exact["accuracy"] == pytest.approx(reported, abs=1e-6)
    forced = last_json(run("evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors",
                           "--data-dir", shared_data, "--precision", "fp32").stdout)
    assert forced["precision"] == "fp32"


def test_eval_raw_is_the_same_run_without_ema(tmp_path, recipe, shared_data):
    # The EMA never feeds back into training, so the raw weights of an EMA run are the weights of the same run
    # without EMA: the raw column must match that run's accuracy (the no-EMA ablation for free).
    common = ("--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--train-subset", 512,
              "--test-subset", 500, "--epochs", 2, "--seed", 3)
    run("train.py", *common, "--output", tmp_path / "ema", "--ema", "--eval-raw")
    run("train.py", *common, "--output", tmp_path / "plain")
    ema_rows, plain_rows = (list(csv.DictReader((tmp_path / name / "metrics.csv").read_text().splitlines()))
                            for name in ("ema", "plain"))
    assert [r["test_acc_raw"] for r in ema_rows] == [r["test_acc"] for r in plain_rows]
    assert "test_acc_raw" not in plain_rows[0]  # nothing extra without EMA
    assert "raw weights" in (tmp_path / "ema" / "log.txt").read_text()


def test_resume_continues_at_the_right_step(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    args = ["--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
            "--train-subset", 256, "--test-subset", 200, "--quiet"]
    first = run("train.py", *args, "--epochs", 1)
    state = torch.load(out / "last.ckpt", weights_only=True)
    assert (state["step"], state["epoch"]) == (8, 1)
    proc = run("train.py", *args, "--epochs", 2, "--resume", "auto")
    assert "resumed from checkpoint at step 8 (epoch 2, batch 0)" in proc.stdout
    # Both the start and every resume name the processor: a resumed run may land on another machine.
    from vision_lstm.runtime import device_name
    assert device_name("cpu").strip()  # a name, not an empty pair of brackets
    cpu = f"device cpu ({device_name('cpu')})"
    assert cpu in first.stdout.splitlines()[0]
    assert cpu in next(line for line in proc.stdout.splitlines() if line.startswith("resumed from checkpoint"))
    state = torch.load(out / "last.ckpt", weights_only=True)
    assert (state["step"], state["epoch"]) == (16, 2)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_val_split_keeps_test_set_out(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--val-split", 300, "--train-subset", 256, "--quiet", "--mixup", 0.8, "--cutmix", 1.0)
    summary = last_json(proc.stdout)
    assert summary["test_accuracy"] is None and 0 <= summary["val_accuracy"] <= 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mixup"] == 0.8 and saved["cutmix"] == 1.0
    # Mixed batches credit a prediction by the mixing weight: 256 images give a fractional count of correct ones.
    train_acc = float((out / "metrics.csv").read_text().splitlines()[1].split(",")[2])
    assert abs(train_acc * 256 - round(train_acc * 256)) > 1e-3
    assert "300 val images" in proc.stdout
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",")[3:5] == ["val_loss", "val_acc"]


def test_shift_tta_on_the_last_epoch_and_evaluate_on_the_val_split(tmp_path, recipe, shared_data):
    # tta: shift with tta_epochs: last evaluates the 9-view prediction only after the last epoch (it costs 9
    # forward passes); evaluate.py --val-split N evaluates the same held-out images and reproduces both numbers.
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--val-split", 300, "--train-subset", 256, "--epochs", 2, "--tta", "shift", "--tta-epochs", "last",
               "--quiet")
    summary = last_json(proc.stdout)
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert "shift-TTA" not in epoch_lines[0] and "shift-TTA" in epoch_lines[1]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert rows[0]["val_acc_tta"] == "" and float(rows[1]["val_acc_tta"]) == pytest.approx(
        summary["val_accuracy_tta"], abs=1e-6)
    ev = last_json(run("evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors", "--data-dir",
                       shared_data, "--val-split", 300, "--tta", "shift").stdout)
    assert (ev["split"], ev["n"], ev["tta"]) == ("val", 300, "shift")
    assert ev["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-6)
    assert ev["accuracy_tta"] == pytest.approx(summary["val_accuracy_tta"], abs=1e-6)
    # The run's training checkpoint evaluates the same (a run in progress can be evaluated the same way).
    ev = last_json(run("evaluate.py", "--dataset", "mnist", "--weights", out / "last.ckpt", "--data-dir",
                       shared_data, "--val-split", 300, "--tta", "flip-shift").stdout)
    assert ev["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-6)
    assert ev["tta"] == "flip-shift" and 0 < ev["accuracy_tta"] <= 1 and ev["epochs_done"] == 2
    proc = run("evaluate.py", "--dataset", "mnist", "--weights", out / "model.safetensors", "--data-dir",
               shared_data, "--val-split", 60000, check=False)
    assert_clean_error(proc, "--val-split 60000 leaves no training images")
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--tta-epochs", "some", check=False)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_config_alone_uses_the_recipes_dataset(tmp_path, shared_data):
    recipe = tmp_path / "fashion.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "dataset": "fashion-mnist"}))
    proc = run("train.py", "--config", recipe, "--data-dir", shared_data, "--output", tmp_path / "run",
               "--train-subset", 64, "--test-subset", 100, "--quiet")
    assert last_json(proc.stdout)["dataset"] == "fashion-mnist"
    assert "on fashion-mnist" in proc.stdout


# --- bad input: one clear line, non-zero exit, no traceback ----------------------------------------------------


def assert_clean_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_unknown_dataset_and_model():
    proc = run("train.py", "--dataset", "imagenet", check=False)
    assert_clean_error(proc, "invalid choice: 'imagenet'", "mnist", "cifar10")
    proc = run("train.py", "--model", "vil_huge", check=False)
    assert_clean_error(proc, "invalid choice: 'vil_huge'", "vil_tiny")


def test_negative_mixing_alpha(recipe):
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--cutmix", -1, check=False)
    assert_clean_error(proc, "invalid configuration: mixup and cutmix are Beta alphas and must be >= 0")


def test_augment_settings_are_checked_and_erase_joins_the_recipes(tmp_path, recipe, shared_data):
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({**TINY_RECIPE, "augment": {"tranlsate": 2}}))
    proc = run("train.py", "--dataset", "mnist", "--config", bad, check=False)
    assert_clean_error(proc, "invalid configuration: augment must be a mapping with keys among erase, hflip, "
                             "rotate, translate, zoom", "tranlsate")
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--erase", 2, check=False)
    assert_clean_error(proc, "augment.erase is a probability in [0, 1], got 2.0")
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--zoom", 1, check=False)
    assert_clean_error(proc, "augment.zoom is a maximum relative scale change in [0, 1), got 1.0")
    with_aug = tmp_path / "aug.yaml"
    with_aug.write_text(yaml.safe_dump({**TINY_RECIPE, "augment": {"translate": 1}}))
    out = tmp_path / "run"
    run("train.py", "--dataset", "mnist", "--config", with_aug, "--erase", 0.25, "--rotate", 10, "--zoom", 0.1,
        "--data-dir", shared_data, "--output", out, "--train-subset", 64, "--test-subset", 50, "--quiet")
    assert yaml.safe_load((out / "config.yaml").read_text())["augment"] == {"translate": 1, "erase": 0.25,
                                                                            "rotate": 10.0, "zoom": 0.1}


def test_model_args_from_the_command_line(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
        "--train-subset", 64, "--test-subset", 50, "--quiet", "--model-arg", "dim=8", "--model-arg",
        "mlstm_mode=chunkwise", "--drop-path", 0.1)
    model_args = yaml.safe_load((out / "config.yaml").read_text())["model_args"]
    assert model_args == {"dim": 8, "depth": 1, "patch_size": 7, "mlstm_mode": "chunkwise", "drop_path_rate": 0.1}
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--model-arg", "dim", check=False)
    assert_clean_error(proc, "--model-arg expects KEY=VALUE (e.g. dim=128), got 'dim'")
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--model-arg", "dims=8", check=False)
    assert_clean_error(proc, "cannot build model 'vil_tiny'", "dims")


def test_missing_data_offline(tmp_path):
    proc = run("train.py", "--dataset", "mnist", "--data-dir", tmp_path, "--no-download", "--output",
               tmp_path / "run", check=False)
    assert_clean_error(proc, "error: mnist: missing train-images-idx3-ubyte.gz", str(tmp_path))
    assert not (tmp_path / "run").exists()  # a run that cannot start leaves no empty run folder behind


def test_corrupt_dataset_file(tmp_path, recipe):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"\x1f\x8b\x08\x00 truncated")
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", tmp_path, "--no-download",
               "--output", tmp_path / "run", check=False)
    assert_clean_error(proc, "train-images-idx3-ubyte.gz: not a valid gzip file")


def test_weights_that_do_not_fit(tmp_path, shared_data):
    from vision_lstm import create_model
    from vision_lstm.checkpoint import save_weights
    weights = tmp_path / "cifar.safetensors"
    save_weights(create_model("vil_tiny", dim=16, depth=1, img_size=32, patch_size=8, num_classes=10), weights,
                 "vil_tiny")
    proc = run("evaluate.py", "--dataset", "mnist", "--weights", weights, "--data-dir", shared_data, check=False)
    assert_clean_error(proc, "trained for 3-channel images")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    proc = run("evaluate.py", "--dataset", "mnist", "--weights", tmp_path / "junk.safetensors", check=False)
    assert_clean_error(proc, "junk.safetensors is not a valid safetensors file")
    proc = run("predict.py", "--weights", weights, tmp_path / "missing.png", check=False)
    assert_clean_error(proc, "missing.png: no such file")
    (tmp_path / "fake.png").write_text("hello")
    proc = run("predict.py", "--weights", weights, tmp_path / "fake.png", check=False)
    assert_clean_error(proc, "fake.png: not a readable image")


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--train-subset", 512, "--test-subset", 100, "--lr", 1e30, "--warmup-epochs", 0, "--save-every", 1,
               "--quiet", check=False)
    assert_clean_error(proc, "non-finite", "training stopped", "last good checkpoint")
    state = torch.load(out / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_help_lists_flags():
    proc = run("train.py", "--help")
    for flag in ("--dataset", "--model", "--config", "--epochs", "--batch-size", "--lr", "--weight-decay", "--seed",
                 "--data-dir", "--output", "--resume", "--save-every", "--train-subset", "--precision", "--compile",
                 "--device", "--mixup", "--cutmix", "--drop-path", "--erase", "--rotate", "--zoom", "--ema", "--tta", "--tta-epochs", "--val-split",
                 "--grad-checkpointing"):
        assert flag in proc.stdout


def test_nan_policy_skip_keeps_going(tmp_path, recipe, shared_data):
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--output", out,
               "--train-subset", 256, "--test-subset", 100, "--lr", 1e30, "--warmup-epochs", 0,
               "--nan-policy", "skip", "--quiet")
    assert "step skipped" in proc.stdout
    header, row = (out / "metrics.csv").read_text().splitlines()
    assert header.endswith(",skipped_steps") and int(row.split(",")[-1]) >= 1
