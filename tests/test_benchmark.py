"""benchmarks/throughput.py end to end on a tiny setting: it measures, and writes the JSON and markdown it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def test_throughput_benchmark_writes_json_and_table(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--configs", "recipe_mnist",
           "--paths", "fast,reference,checkpointed", "--precisions", "fp32", "--modes", "train,infer", "--batch", "8",
           "--seconds", "0.05", "--seqlens", "64", "--output", str(tmp_path), "--tag", "smoke"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["matmul_peak"]["gflops_fp32"] > 0 and report["matmul_peak"]["gflops_bf16"] > 0
    from vision_lstm.runtime import device_name
    assert report["machine"]["cpu"] == device_name("cpu")  # figures from different CPUs must not be confused
    rows = report["models"]
    assert {(r["path"], r["mode"]) for r in rows} == {(p, m) for p in ("fast", "reference", "checkpointed")
                                                     for m in ("train", "infer")}
    for r in rows:
        assert r["malloc"] == "kept" and r["malloc_setting"] == "on"  # our paths as users get them
        assert r["img_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["first_step_s"] > 0
        assert 0 < r["mfu"] < 1 and r["mfu_bf16_peak"] > 0  # mfu: of the faster peak (bf16 may be emulated)
    assert {r["form"] for r in report["seqlen"]} == {"parallel", "chunkwise", "recurrent", "streaming"}
    assert all("time_ms" in r for r in report["seqlen"])
    table = (tmp_path / "smoke.md").read_text()
    assert "| recipe_mnist | fast | fp32 | train |" in table and "## Sequence length" in table
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the code a figure came from is recorded (a checkout without git says so instead)
        assert report["code"].startswith(head.stdout.strip()) and f"Code: {report['code']}" in table


def test_throughput_rounds_report_the_median_round(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--configs", "recipe_mnist", "--paths",
           "fast,reference", "--precisions", "fp32", "--modes", "infer", "--batch", "4", "--seconds", "0.02",
           "--rounds", "3", "--skip-seqlen", "--output", str(tmp_path), "--tag", "rounds"]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    # interleaved: round 2 runs the measurements in reverse order
    order = [(line.split(":", 1)[0], json.loads(line.split(": ", 1)[1])["path"])
             for line in proc.stdout.splitlines() if line.strip().startswith("round ")]
    assert [p for _, p in order] == ["fast", "reference", "reference", "fast", "fast", "reference"]
    report = json.loads((tmp_path / "rounds.json").read_text())
    assert report["rounds"] == 3
    for row in report["models"]:
        rounds = row["img_per_s_rounds"]
        assert len(rounds) == 3 and row["img_per_s"] == sorted(rounds)[1]
    table = (tmp_path / "rounds.md").read_text()
    assert "median of 3 interleaved rounds" in table
    assert f"{report['models'][0]['img_per_s']:.1f} ({' / '.join(f'{x:.1f}' for x in report['models'][0]['img_per_s_rounds'])})" in table


def test_median_round_ranks_a_failed_round_slowest():
    import importlib.util
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rounds = [{"img_per_s": 3.0, "peak_rss_mb": 30}, {"error": "killed"}, {"img_per_s": 1.0, "peak_rss_mb": 10}]
    assert bench.median_round(rounds) == {"img_per_s": 1.0, "peak_rss_mb": 10}  # sorted: error, 1.0, 3.0
    assert bench.median_round(rounds[:1]) == rounds[0]
    assert bench.median_round([{"img_per_s": 2.0}, {"img_per_s": 5.0}]) == {"img_per_s": 2.0}  # lower middle


def test_recipe_names_resolve_inside_groups():
    # Recipes that share a model are measured once under a joined name; each recipe's own name still selects it.
    import importlib.util
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.CONFIGS["recipe_a+b-c"] = ("vil_tiny", {}, (1, 28, 28))
    assert bench.resolve_config("recipe_b-c") == "recipe_a+b-c" and bench.resolve_config("recipe_a") == "recipe_a+b-c"
    assert bench.resolve_config("vil_tiny_cifar") == "vil_tiny_cifar"
    try:
        bench.resolve_config("recipe_b")
    except SystemExit as e:
        assert "unknown config 'recipe_b'" in str(e)
    else:
        raise AssertionError("an unknown name must fail")


@pytest.mark.parametrize("option, asked, reported, want, row", [
    ("--malloc", "malloc", "malloc_setting", {("kept", "on"), ("default", "off (VIL_MALLOC=default)")},
     "| recipe_mnist | fast | fp32 | infer | default |"),
    ("--omp-wait", "omp_wait", "omp_wait_policy", {("default", "default"), ("active", "ACTIVE")},
     "| recipe_mnist | fast | fp32 | infer | kept | active |"),
])
def test_both_settings_measure_each_path_under_each(tmp_path, option, asked, reported, want, row):
    # --malloc both: glibc kept / default; --omp-wait both: OpenMP's wait policy default / ACTIVE, given to each worker
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--configs", "recipe_mnist", "--paths", "fast",
           "--precisions", "fp32", "--modes", "infer", "--batch", "8", "--seconds", "0.05", "--skip-seqlen",
           option, "both", "--output", str(tmp_path), "--tag", "both"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "both.json").read_text())["models"]
    assert {(r[asked], r[reported]) for r in rows} == want  # what each worker was given, and what it ran with
    assert row in (tmp_path / "both.md").read_text()


def test_kernels_path_times_an_mlstm_kernels_kernel(tmp_path):
    # The kernels path (meant for the Triton kernels on a GPU) runs here with the plain-PyTorch chunkwise kernel.
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--configs", "recipe_mnist", "--paths",
           "kernels", "--kernel", "chunkwise--native_autograd", "--precisions", "fp32", "--modes", "train,infer",
           "--batch", "8", "--seconds", "0.05", "--skip-seqlen", "--output", str(tmp_path), "--tag", "kernels"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["device"] == "cpu" and len(report["models"]) == 2
    for r in report["models"]:
        assert r["kernel"] == "chunkwise--native_autograd" and r["img_per_s"] > 0, r
    bad = subprocess.run(cmd[:-2] + ["--tag", "bad", "--kernel", "chunkwise--nope"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 0  # one failed measurement is a row with its error, not a crash
    rows = json.loads((tmp_path / "bad.json").read_text())["models"]
    assert all("no kernel 'chunkwise--nope'" in r["error"] for r in rows)


def test_floor_benchmark_records_the_products_of_a_training_step(tmp_path):
    # Tiny model (MNIST recipe), batch 8: every product of one bf16-autocast step is recorded as the kernels see it.
    cmd = [sys.executable, str(REPO / "benchmarks" / "floor.py"), "--config", "recipe_mnist", "--batch", "8",
           "--seconds", "0.02", "--steps", "2", "--output", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "floor.json").read_text())
    rows = report["rows"]
    # The cell's T x T products (49 tokens, 4 heads x batch 8, head dim 32): the scores in fp32 (1 per layer), the
    # other five (1 forward, 4 backward) in bf16; 6 layers. The projections in bf16. Where the fused bf16 kernels
    # run (AVX512-BF16), none of them is a PyTorch product (the whole forward and the whole backward are one kernel
    # each).
    from vision_lstm import fused
    cell = [r for r in rows if r["op"] == "bmm" and 49 in r["shapes"][0] and r["shapes"][0][0] == 8 * 4]
    assert sum(r["count"] for r in cell if r["dtype"] == "float32") == (0 if fused.has_bf16_scores() else 6)
    assert sum(r["count"] for r in cell if r["dtype"] == "bfloat16") == (0 if fused.has_bf16_scores() else 5 * 6)
    assert any(r["op"] in ("mm", "addmm") and r["dtype"] == "bfloat16" for r in rows)
    assert abs(report["floor_ms"] - sum(r["ms"] for r in rows)) < 1e-6 and report["step_ms"] > 0
    assert "Floor:" in (tmp_path / "floor.md").read_text()
    from vision_lstm.runtime import device_name
    assert report["cpu"] == device_name("cpu") and f"CPU {device_name('cpu')}" in (tmp_path / "floor.md").read_text()


def test_op_count_counts_the_fused_path_and_the_plain_one(tmp_path):
    out = tmp_path / "ops.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "op_count.py"), "--output", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    rows = {line.split("|")[1].strip(): [int(c) for c in line.split("|")[2:6]]
            for line in out.read_text().splitlines() if line.startswith("| fast") or line.startswith("| reference")}
    assert set(rows) == {"fast", "reference"}
    for counts in rows.values():
        assert all(c > 100 for c in counts)
        assert counts[0] > counts[2] and counts[1] > counts[3]  # a training step does more than inference


def test_ab_times_the_tree_against_a_revision(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "ab.py"), "--ref", "HEAD", "--what", "cell,recipe_mnist",
           "--rounds", "1", "--seconds", "0", "--out-dir", str(tmp_path), "--tag", "t"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "ab-t.json").read_text())
    assert [r["what"] for r in report["results"]] == ["cell", "recipe_mnist"]
    from vision_lstm.runtime import resolve_precision  # default --precision auto: bf16 only where it is native
    assert report["precision"] == resolve_precision("auto")[0]  # and measurably faster than fp32
    for r in report["results"]:
        assert len(r["tree"]) == len(r["ref"]) == 1 and min(r["tree"] + r["ref"]) > 0
        # each side timed its own copy of the library (throughput.py, which the model side imports, puts the tree's
        # src/ first on sys.path: the ref side once timed the tree that way)
        assert Path(r["libraries"]["tree"]).is_relative_to(REPO / "src")
        assert not Path(r["libraries"]["ref"]).is_relative_to(REPO / "src")
        # a speedup is ref/tree for times (the cell, ms) and tree/ref for rates (img/s)
        want = [b / a if r["what"] == "cell" else a / b for a, b in zip(r["tree"], r["ref"])]
        assert r["speedup_per_round"] == want
    assert "| recipe_mnist | img/s (training step) |" in (tmp_path / "ab-t.md").read_text()
    bad = subprocess.run(cmd[:3] + ["no-such-revision"] + cmd[4:], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "is not a commit" in bad.stderr
    infer = cmd[:-4] + ["--what", "recipe_mnist", "--mode", "infer", "--out-dir", str(tmp_path), "--tag", "i"]
    subprocess.run(infer, check=True, capture_output=True, text=True, timeout=600)
    assert json.loads((tmp_path / "ab-i.json").read_text())["mode"] == "infer"
    assert "| recipe_mnist | img/s (inference) |" in (tmp_path / "ab-i.md").read_text()


def test_ab_interleaves_steps_of_both_sides(tmp_path):
    # --interleave steps: both sides as step servers taking turns, each on its own library; the pairs' speedups
    # (ref's step time / tree's) are kept and summarised, and a round's value is its side's median step
    cmd = [sys.executable, str(REPO / "benchmarks" / "ab.py"), "--ref", "HEAD", "--what", "cell,recipe_mnist",
           "--precision", "fp32", "--interleave", "steps", "--rounds", "2", "--pairs", "3", "--out-dir", str(tmp_path),
           "--tag", "s"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "ab-s.json").read_text())
    assert [r["what"] for r in report["results"]] == ["cell", "recipe_mnist"]
    for r in report["results"]:
        assert len(r["tree"]) == len(r["ref"]) == 2 and len(r["pair_speedups"]) == 6
        assert min(r["tree"] + r["ref"] + r["pair_speedups"]) > 0
        assert Path(r["libraries"]["tree"]).is_relative_to(REPO / "src")
        assert not Path(r["libraries"]["ref"]).is_relative_to(REPO / "src")
        low, high = r["pair_quartiles"]
        assert low <= r["pair_median"] <= high
    text = (tmp_path / "ab-s.md").read_text()
    assert "step servers" in text and "median speedup of the 6 pairs" in text
