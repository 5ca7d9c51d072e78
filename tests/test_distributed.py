"""torchrun: 2 CPU processes (gloo) give the same model as one process with the same global batch."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_cli import last_json, recipe, run  # noqa: F401 (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, extra=(), timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra, str(REPO / "train.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, recipe, shared_data):  # noqa: F811
    common = ["--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--train-subset", 256,
              "--test-subset", 200, "--batch-size", 32, "--threads", 1, "--quiet", "--seed", 3,
              # fp32: the comparison is about the gradient all-reduce, and bf16 autocast ("auto" on a CPU with bf16
              # arithmetic) rounds the two processes' differently summed gradients apart by more than 1e-4.
              "--precision", "fp32"]
    run("train.py", *common, "--output", tmp_path / "single")
    proc = torchrun(2, *common, "--output", tmp_path / "ddp")
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count('"dataset": "mnist"') == 1  # only rank 0 logs
    single = load_file(tmp_path / "single" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    assert single.keys() == ddp.keys()
    for key in single:
        assert torch.allclose(single[key], ddp[key], rtol=1e-4, atol=1e-5), key
    assert not list((tmp_path / "ddp").glob(".*.tmp"))


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes(tmp_path, recipe, shared_data):  # noqa: F811
    import signal
    import time

    out = tmp_path / "elastic"
    args = ["--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--train-subset", 512,
            "--test-subset", 200, "--batch-size", 32, "--epochs", 2, "--threads", 1, "--quiet", "--save-every", 2,
            "--output", out, "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    # Dynamic (c10d) rendezvous: each restart round gets fresh addresses (the static one can hand the restarted
    # workers the previous round's gloo ports).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "train.py"),
           *map(str, args)]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                             start_new_session=True)  # its own process group, so nothing outlives the test
    ckpt = out / "last.ckpt"
    deadline = time.time() + 180
    killed = None
    while killed is None and time.time() < deadline and agent.poll() is None:
        try:
            step = int(torch.load(ckpt, weights_only=True)["step"]) if ckpt.exists() else -1
        except Exception:
            step = -1
        if step >= 4:
            workers = [p for p in child_pids(agent.pid)
                       if "train.py" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
            if len(workers) == 2:
                killed = workers[1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    try:
        stdout, stderr = agent.communicate(timeout=300)
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert killed is not None, "never saw a checkpoint to kill after"
    assert agent.returncode == 0, stdout + stderr
    log = (out / "log.txt").read_text()
    assert "resumed from checkpoint at step" in log
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 32)
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_on_a_machine_without_the_data_download_it_once(tmp_path, recipe, shared_data):  # noqa: F811
    # Rank 0 downloads (here from a loopback mirror); rank 1 must wait for it rather than fail on missing files.
    from helpers import serve_directory
    served = tmp_path / "served"
    shutil.copytree(shared_data / "mnist", served)
    with serve_directory(served) as url:
        proc = torchrun(2, "--dataset", "mnist", "--config", recipe, "--data-dir", tmp_path / "data", "--train-subset",
                        128, "--test-subset", 100, "--batch-size", 32, "--threads", 1, "--quiet", "--output",
                        tmp_path / "run", env={"VIL_DATA_MIRROR": url})
    assert "2 process(es)" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(p.name for p in served.iterdir())
