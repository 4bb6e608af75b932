"""The scripts in examples/ and bench/python_overhead.py run and print what they promise."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_gptq_one_matrix_prints_the_error_of_both_methods():
    out = run("examples/gptq_one_matrix.py", "--rows", "64", "--cols", "256", "--tokens", "2048", "--rank", "16")
    errors = {}
    for method in ("RTN", "GPTQ"):
        line = next(l for l in out.splitlines() if l.startswith(method + " "))
        errors[method] = float(line.split()[4])
    assert 0 < errors["GPTQ"] < errors["RTN"], out
    assert "GPTQ status ok" in out


def test_torch_moe_hessians_without_torch_says_so():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed: the script's message for a missing PyTorch cannot be observed")
    out = run("examples/torch_moe_hessians.py", "--batches", "4", "--tokens", "128")
    assert "PyTorch is not installed" in out


def test_torch_moe_hessians_gptq_beats_rtn():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (it is not a dependency of qmoe)")
    out = run("examples/torch_moe_hessians.py", "--batches", "4", "--tokens", "128")
    gptq = re.search(r"GPTQ \(loaded back\) experts: relative error ([0-9.]+)", out)
    rtn = re.search(r"round to nearest experts: relative error ([0-9.]+)", out)
    assert gptq and rtn, out
    assert float(gptq.group(1)) < float(rtn.group(1)), out


def test_moe_layer_matches_numpy():
    out = run("examples/moe_layer.py", "--experts", "4", "--d-model", "96", "--d-ff", "160", "--tokens", "40")
    diff = re.search(r"max relative difference to numpy on the decoded weights: ([0-9.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-5, out
    assert re.search(r"4 experts of 160x96 \+ 96x160: [0-9.]+ bits per weight", out), out


def test_python_overhead_bench_runs():
    out = run("bench/python_overhead.py", "--experts", "2", "--calls", "20", "--repetitions", "2",
              "--tokens", "1,3", "--bench", str(ROOT / "no-such-binary"))
    assert re.search(r"matvec wi_3072x768 tokens:1 .* [0-9.]+", out), out
    assert "matmul wi_3072x768 tokens:3" in out
    assert "fixed cost of a call" in out


def test_python_overhead_bench_times_the_torch_path():
    if importlib.util.find_spec("torch") is None:
        return  # the --torch rows need torch; the plain rows are tested above
    out = run("bench/python_overhead.py", "--experts", "2", "--calls", "20", "--repetitions", "2",
              "--tokens", "1", "--torch", "--bench", str(ROOT / "no-such-binary"))
    for row in ("torch f32 wi_3072x768 tokens:1", "torch bf16 wi_3072x768 tokens:1",
                "layer torch f32 8 experts tokens:1", "torch f32 2x768 tokens:1 (fixed)",
                "layer numpy 8x(2x2) (fixed cost)", "layer torch bf16 8x(2x2) (fixed)"):
        assert re.search(re.escape(row) + r" .* [0-9.]+", out), row + "\n" + out


def test_codecs_and_entropy_ranks_the_codecs():
    out = run("examples/codecs_and_entropy.py", "--rows", "96", "--cols", "3072")
    rows = [l.split() for l in out.splitlines() if re.match(r"^\s*0\.\d+ ", l)]
    assert len(rows) == 4, out
    for p0, h, v1, v2, v3, p5 in (map(float, r) for r in rows):
        assert h * 0.98 < v2 < v1 < p5, out
        assert h * 0.98 < v3 < v1, out
    assert "decode to the same weights: True" in out, out


def torch_and_transformers_installed():
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def test_torch_generate_without_torch_says_so():
    if torch_and_transformers_installed():
        pytest.skip("PyTorch and transformers are installed: the script's message for them missing cannot be observed")
    fixture = ROOT / "tests" / "switch" / "fixtures" / "every_other_f32"
    out = run("examples/torch_generate.py", "--checkpoint", str(fixture))
    assert "PyTorch or transformers is not installed" in out


def test_torch_generate_from_a_container(tmp_path):
    if not torch_and_transformers_installed():
        pytest.skip("PyTorch or transformers is not installed (pip install qmoe[torch])")
    fixture = ROOT / "tests" / "switch" / "fixtures" / "every_other_f32"
    container = tmp_path / "c.safetensors"
    import qmoe

    qmoe.compress_checkpoint(fixture, container, check_disk=False)
    out = run("examples/torch_generate.py", "--container", str(container), "--ids", "5,17,33,2",
              "--max-new-tokens", "6", "--min-new-tokens", "6", "--text", "hello", "--tokenizer",
              str(tmp_path / "no-tokenizer"))
    assert "using --ids instead" in out, out
    m = re.search(r"generated (\d+) tokens in [0-9.]+ s: ([0-9.]+) tokens/s", out)
    assert m and int(m.group(1)) == 6 and float(m.group(2)) > 0, out
    ids = re.search(r"^output ids: ([0-9,]+)$", out, re.M)
    assert ids and len(ids.group(1).split(",")) == 7, out
    assert re.search(r"peak RSS: [0-9.]+ MiB; runtime .*: [0-9.]+ MiB; model \+ generation", out), out
    assert re.search(r"in 4 sparse layers", out), out
    # The same ids through the dense model of the fixture (its experts differ: only the format).
    out = run("examples/torch_generate.py", "--dense", str(fixture), "--ids", "5,17,33,2", "--max-new-tokens", "3")
    assert "model: dense checkpoint" in out and "0 sparse layers" in out, out
