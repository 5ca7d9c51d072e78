"""Kill it at any moment and lose nothing; feed it bad bytes and only VilError comes out."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from helpers import cifar_batch_bytes, idx_bytes
from vision_lstm import VilError
from vision_lstm.checkpoint import atomic_write, load_checkpoint, load_weights, save_checkpoint
from vision_lstm.data import parse_cifar_batch, parse_idx

RESUME_RECIPE = {
    "model": "vil_tiny", "model_args": {"dim": 16, "depth": 1, "patch_size": 7, "drop_path_rate": 0.2},
    "epochs": 3, "batch_size": 16, "lr": 0.003, "warmup_epochs": 0.3, "ema": True, "ema_decay": 0.9,
    "mixup": 0.8, "cutmix": 1.0,  # random per step: resume must replay the same draws
    "save_every": 3, "train_subset": 320, "test_subset": 200, "threads": 1, "quiet": True,
}


def train_cmd(recipe, out, data, *extra):
    return [sys.executable, str(REPO / "train.py"), "--dataset", "mnist", "--config", str(recipe), "--data-dir",
            str(data), "--output", str(out), *map(str, extra)]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:
        return -1


def run_and_kill(cmd, ckpt: Path, steps: int, sig=signal.SIGKILL, timeout=120) -> int:
    """Start ``cmd``, wait until *it* has checkpointed ``steps`` steps past the checkpoint it started from (so its
    signal handlers are installed), send ``sig``; return the exit code."""
    start = max(checkpoint_step(ckpt), 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    after_step = start + steps
    deadline = time.time() + timeout
    while checkpoint_step(ckpt) < after_step:
        if proc.poll() is not None:
            raise AssertionError(f"finished before step {after_step}: {proc.stdout.read()} {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_exact_resume_after_kills(tmp_path, shared_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RESUME_RECIPE))
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(recipe, reference, shared_data), check=True, env=env(), cwd=REPO, capture_output=True)

    out = tmp_path / "killed"
    ckpt = out / "last.ckpt"
    # SIGKILL mid-epoch 1, again mid-epoch 2 (after resuming), then SIGTERM, which saves before exiting.
    assert run_and_kill(train_cmd(recipe, out, shared_data), ckpt, 6) == -signal.SIGKILL
    resume = train_cmd(recipe, out, shared_data, "--resume", "auto")
    assert run_and_kill(resume, ckpt, 15) == -signal.SIGKILL  # past the epoch boundary (20 steps per epoch)
    assert run_and_kill(resume, ckpt, 3, sig=signal.SIGTERM) == 128 + signal.SIGTERM
    final = subprocess.run(resume, check=True, env=env(), cwd=REPO, capture_output=True, text=True)
    assert "resume #3" in final.stdout
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (out / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicates


def test_outputs_are_world_readable(tmp_path):
    """Checkpoints and weights are meant to be shared: 0644, not the 0600 of a temporary file."""
    from vision_lstm import create_model
    from vision_lstm.checkpoint import save_weights
    old_umask = os.umask(0o022)
    try:
        save_checkpoint({"model": {}, "step": 0}, tmp_path / "last.ckpt")
        save_weights(create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=3),
                     tmp_path / "model.safetensors", "vil_tiny")
    finally:
        os.umask(old_umask)
    for name in ("last.ckpt", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert load_weights(tmp_path / "model.safetensors")[0].config.dim == 8


def test_checkpoint_write_killed_midway_keeps_previous(tmp_path):
    """A process killed while rewriting the checkpoint leaves the previous one loadable."""
    path = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from vision_lstm.checkpoint import save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        f"    save_checkpoint({{'model': {{'w': torch.full((2_000_000,), float(i))}}, 'step': i}}, {str(path)!r})\n"
    )
    for delay in (0.05, 0.13, 0.29):
        path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:  # the first write has completed
            time.sleep(0.01)
        time.sleep(delay)  # then kill it somewhere inside a later write
        proc.kill()
        proc.wait()
        state = load_checkpoint(path)
        assert torch.all(state["model"]["w"] == state["step"])


def test_failed_write_keeps_previous_and_cleans_up(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, disk_full)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_trainer_reports_disk_full(tmp_path, monkeypatch):
    from vision_lstm import engine
    from vision_lstm.config import TrainConfig

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    trainer = engine.Trainer(TrainConfig(output=str(tmp_path)))
    trainer.output, trainer.info = tmp_path, engine.DistInfo()
    trainer._state = lambda: {}
    monkeypatch.setattr(engine, "save_checkpoint", fail)
    with pytest.raises(VilError, match="could not write checkpoint .*No space left.*previous checkpoint"):
        trainer.save_checkpoint()


def test_training_updates_with_the_fused_adamw():
    # One kernel per parameter tensor for the whole AdamW update on the CPU (about ten PyTorch ops each otherwise,
    # 513 tensors in ViL-T); the same update as the loop of ops, to float rounding.
    from vision_lstm import engine
    from vision_lstm.config import TrainConfig
    from vision_lstm import create_model
    model = create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=10)
    assert engine.adamw(model, TrainConfig(), torch.device("cpu")).defaults["fused"] is True
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    for params, fused in ((weights, True), (copies, False)):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, fused=fused)
        for step in range(3):
            for p in params:
                p.grad = torch.cos(p.detach() * (step + 1))
            opt.step()
    for got, want in zip(weights, copies):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_resumed_optimizer_stays_fused():
    # A checkpoint from before the update was fused carries "fused": False in its param groups; loading it keeps
    # this run's fused update (and the checkpoint's moments).
    from vision_lstm import create_model, engine
    from vision_lstm.config import TrainConfig
    model = create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=10)
    old = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1e-3, fused=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    optimizer = engine.adamw(model, TrainConfig(), torch.device("cpu"))
    engine.load_optimizer_state(optimizer, old.state_dict())
    assert all(group["fused"] is True for group in optimizer.param_groups)
    first = next(model.parameters())
    assert torch.equal(optimizer.state[first]["exp_avg"], old.state[first]["exp_avg"])


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(VilError, match="corrupt or not a vision-lstm checkpoint"):
        load_checkpoint(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(VilError, match="not a vision-lstm training checkpoint"):
        load_checkpoint(bad)


def test_load_weights_from_a_training_checkpoint_takes_the_ema_weights(tmp_path):
    # evaluate.py / load_weights accept a run's last.ckpt: the weights a run evaluates (EMA if kept), with the
    # dataset's classes and normalisation in the metadata as a model.safetensors would have them.
    from vision_lstm import create_model
    model = create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=10)
    ema = create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=10)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "step": 7, "epoch": 1, "model_name": "vil_tiny",
             "model_config": model.config.to_dict(), "config": {"dataset": "cifar", "precision": "bf16"}}
    save_checkpoint(state, tmp_path / "last.ckpt")
    loaded, metadata = load_weights(tmp_path / "last.ckpt")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ema.state_dict()[name]), name
    assert not torch.equal(loaded.head.weight, model.head.weight)
    assert metadata["dataset"] == "cifar10" and metadata["precision"] == "bf16" and metadata["epochs_done"] == 1
    assert len(metadata["classes"]) == 10 and len(metadata["mean"]) == 3
    assert load_weights(tmp_path / "last.ckpt", mlstm_mode="chunkwise")[0].config.mlstm_mode == "chunkwise"
    save_checkpoint({**state, "ema": None}, tmp_path / "last.ckpt")  # no EMA: the trained weights
    assert torch.equal(load_weights(tmp_path / "last.ckpt")[0].head.weight, model.head.weight)
    save_checkpoint({"model": {}, "step": 0}, tmp_path / "last.ckpt")
    with pytest.raises(VilError, match="no usable model config"):
        load_weights(tmp_path / "last.ckpt")


# --- property-based: random and mutated bytes ------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_IDX = idx_bytes(torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4).numpy())
VALID_CIFAR = cifar_batch_bytes(torch.zeros(2, 3, 32, 32, dtype=torch.uint8).numpy(), [1, 2])


def mutated(valid: bytes):
    return st.tuples(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=8),
                     st.integers(0, len(valid))).map(lambda m: _apply(valid, *m))


def _apply(valid, edits, cut):
    data = bytearray(valid[:max(cut, 1)])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    return bytes(data)


@pytest.mark.parametrize("reader,valid", [(parse_idx, VALID_IDX), (parse_cifar_batch, VALID_CIFAR)],
                         ids=["idx", "cifar"])
def test_dataset_reader_fuzz(reader, valid):
    @FUZZ
    @given(st.one_of(st.binary(max_size=300), mutated(valid)))
    def check(data):
        try:
            reader(data, "fuzz")
        except VilError:
            pass

    check()


@pytest.fixture(scope="module")
def valid_weights(tmp_path_factory) -> bytes:
    from vision_lstm import create_model
    from vision_lstm.checkpoint import save_weights
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    save_weights(create_model("vil_tiny", dim=8, depth=1, img_size=8, patch_size=4, num_classes=3), path, "vil_tiny")
    return path.read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_weights_loader_fuzz(valid_weights, tmp_path, data):
    blob = data.draw(st.one_of(st.binary(max_size=300), mutated(valid_weights)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        load_weights(path)
    except VilError:
        pass
