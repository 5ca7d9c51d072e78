"""Which precision runs fast on this processor: bf16 autocast only where bf16 matrix arithmetic is native and its
products measure well ahead of fp32's."""
import pytest

from vision_lstm import runtime
from vision_lstm.config import TrainConfig
from vision_lstm.errors import VilError

# Flags lines as /proc/cpuinfo prints them (shortened), from the machines this project has run on.
AVX2_EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx avx2 bmi2\n"
ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: avx avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: avx2 avx512f avx512bw avx512vl\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd crc32 atomics bf16 i8mm sve\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd crc32 atomics\n"


@pytest.mark.parametrize("cpuinfo, expected", [(AVX2_EPYC, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True),
                                               (SKYLAKE, False), (ARM_BF16, True), (ARM_OLD, False),
                                               ("processor\t: 0\n", None)])
def test_bf16_in_cpuinfo(cpuinfo, expected):
    assert runtime.bf16_in_cpuinfo(cpuinfo) is expected


@pytest.mark.parametrize("native, rates, expected", [
    (False, None, "fp32"),            # emulated bf16: never measured (it would take seconds)
    (True, (139.0, 382.0), "bf16"),   # AMD Zen 4 (session 24): bf16 products 2.7x fp32's
    (True, (345.0, 198.0), "fp32"),   # Intel Xeon, AVX512-BF16 without AMX exposed (session 36): 0.57x
    (True, (100.0, 149.0), "fp32"),   # just under BF16_MIN_SPEEDUP
    (True, (100.0, 150.0), "bf16"),
])
def test_auto_is_bf16_only_where_native_and_faster(monkeypatch, native, rates, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": native)

    def measured():
        assert native, "bf16 products measured where they are emulated"
        return rates
    monkeypatch.setattr(runtime, "matmul_rates", measured)
    precision, note = runtime.resolve_precision("auto")
    assert precision == expected and note.startswith("precision auto: ")
    if native:  # the log says what was measured
        assert f"measured {rates[1]:.0f} against {rates[0]:.0f} GFLOP/s" in note
    assert runtime.resolve_precision("fp32") == ("fp32", "")
    forced, warning = runtime.resolve_precision("bf16")  # an explicit choice is kept, but not silently when slow
    assert forced == "bf16" and (warning.startswith("warning: ") != native) and (warning == "") == native


def test_matmul_rates_measures_both_dtypes():
    fp32, bf16 = runtime.matmul_rates.__wrapped__(size=64, repeats=1)  # small: bf16 may be emulated here
    assert fp32 > 0 and bf16 > 0


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        runtime.resolve_precision("fp16")
    with pytest.raises(VilError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(dataset="mnist", precision="fp16").validate()
    assert TrainConfig(dataset="mnist").precision == "auto"


def test_native_bf16_reads_this_machine():
    # The speed figures in results/ depend on it: on a CPU whose flags list none of the bf16 units it must say no.
    try:
        listed = runtime.bf16_in_cpuinfo(open("/proc/cpuinfo").read())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if listed is not None:
        assert runtime.native_bf16("cpu") is listed


def test_evaluation_precision_falls_back_to_fp32_where_bf16_is_emulated(monkeypatch, capsys):
    from vision_lstm import cli
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    assert cli._evaluation_precision(None, "bf16", "cpu") == "fp32"
    assert "evaluating in fp32 instead" in capsys.readouterr().err
    assert cli._evaluation_precision("bf16", "bf16", "cpu") == "bf16"  # asked for: kept, with the warning
    assert "has no bf16 matrix arithmetic" in capsys.readouterr().err
    assert cli._evaluation_precision(None, "fp32", "cpu") == "fp32"
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": True)
    assert cli._evaluation_precision(None, "bf16", "cpu") == "bf16" and capsys.readouterr().err == ""
    monkeypatch.setattr(runtime, "matmul_rates", lambda: (345.0, 198.0))  # native, but slower than fp32 here:
    assert cli._evaluation_precision(None, "bf16", "cpu") == "bf16"  # bf16 weights still reproduce their accuracy
    assert cli._evaluation_precision("auto", "fp32", "cpu") == "fp32"
    monkeypatch.setattr(runtime, "matmul_rates", lambda: (139.0, 382.0))
    assert cli._evaluation_precision("auto", "fp32", "cpu") == "bf16"


def test_cpu_details_name_what_sets_the_speed():
    # Benchmark reports record these: hosts that call themselves "AMD EPYC" differed 1.8x in bf16 matmul peak.
    from pathlib import Path
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here (not Linux)")
    details = runtime.cpu_details()
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(("flags", "Features")))
    assert set(details["extensions"]) <= set(flags)
    assert ("avx512_bf16" in details["extensions"]) == ("avx512_bf16" in flags)
    if "cpu family" in text:
        assert details["cpu_family"].isdigit() and details["model"].isdigit()
    if Path("/sys/devices/system/cpu/cpu0/cache/index0").is_dir():
        assert details.get("L1d", "").endswith("K")
