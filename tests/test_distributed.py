"""torchrun: 2 CPU processes (gloo) give the same model as one process with the same global batch."""
import os
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


def torchrun(nproc, *args, extra=(), timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *extra, str(REPO / "train.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, recipe, shared_data):  # noqa: F811
    common = ["--dataset", "mnist", "--config", recipe, "--data-dir", shared_data, "--train-subset", 256,
              "--test-subset", 200, "--batch-size", 32, "--threads", 1, "--quiet", "--seed", 3]
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
