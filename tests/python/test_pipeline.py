"""qmoe.compress_checkpoint on the small Switch Transformers fixture of the C++ tests."""

import json
import os
import pathlib

import numpy as np
import pytest

import qmoe

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "switch" / "fixtures" / "every_other_f32"


@pytest.fixture
def checkpoint():
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip(f"fixture checkpoint {FIXTURE} is not in this tree")
    return FIXTURE


def expert_names(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".mlp.experts.expert_" in k}


def test_round_to_nearest(checkpoint, tmp_path):
    out = tmp_path / "rtn.safetensors"
    seen = []
    summary = qmoe.compress_checkpoint(checkpoint, out, threads=2, progress=seen.append, check_disk=False)
    assert [os.path.basename(f) for f in summary["files"]] == ["rtn.safetensors"]
    experts = expert_names(checkpoint)
    assert summary["quantizer"] == "rtn"
    assert summary["expert_matrices"] == len(experts) > 0
    assert summary["v1_matrices"] + summary["p5_matrices"] == len(experts)
    assert summary["blocks"] and all(b["matrices"] > 0 for b in summary["blocks"])
    assert seen and seen[-1]["done"] == seen[-1]["total"] == len(experts)
    loaded = qmoe.load(out, verify_checksums=True)
    for name, w in experts.items():
        m = loaded[name]
        assert isinstance(m, qmoe.CompressedMatrix) and m.shape == w.shape
        s, l = qmoe.ternarize_rtn(w)
        np.testing.assert_array_equal(m.decode_symbols(), s)
        np.testing.assert_array_equal(m.levels, l)
    dense = [k for k, v in loaded.items() if isinstance(v, np.ndarray)]
    assert len(dense) == summary["passthrough_tensors"]
    assert qmoe.load_metadata(out)["quantizer"] == "rtn"


def test_forced_qmoe_v3(checkpoint, tmp_path):
    out = tmp_path / "v3.safetensors"
    summary = qmoe.compress_checkpoint(checkpoint, out, threads=2, codec="qmoe-v3", check_disk=False)
    experts = expert_names(checkpoint)
    assert summary["v3_matrices"] == summary["expert_matrices"] == len(experts) > 0
    assert summary["v1_matrices"] + summary["v2_matrices"] + summary["p5_matrices"] == 0
    assert json.loads(qmoe.load_metadata(out)["compress.options"])["codec"] == "qmoe-v3"
    loaded = qmoe.load(out, verify_checksums=True)
    for name, w in experts.items():
        m = loaded[name]
        assert m.codec == "qmoe-v3" and m.dictionary is not None
        s, l = qmoe.ternarize_rtn(w)
        np.testing.assert_array_equal(m.decode_symbols(), s)
        np.testing.assert_array_equal(m.levels, l)



def test_target_cpu_with_calibration(checkpoint, tmp_path):
    # target="cpu" through the block loop's calibrated path: the automatic codec is qmoe-g4, or
    # qmoe-p5 where that is smaller, matrix by matrix as encode() chooses; the container records
    # the target; the weights are those of the default target's run (the codec changes no symbol).
    tokens = checkpoint / "tokens.safetensors"
    cpu = tmp_path / "cpu.safetensors"
    anyt = tmp_path / "any.safetensors"
    s = qmoe.compress_checkpoint(checkpoint, cpu, calib_tokens=tokens, target="cpu", threads=2, check_disk=False)
    ref = qmoe.compress_checkpoint(checkpoint, anyt, calib_tokens=tokens, threads=2, check_disk=False)
    assert s["quantizer"] == ref["quantizer"] == "gptq"
    assert s["g4_matrices"] > 0
    assert s["g4_matrices"] + s["p5_matrices"] == s["expert_matrices"] == ref["expert_matrices"] > 0
    meta = qmoe.load_metadata(cpu)
    assert meta["qmoe.target"] == "cpu"
    assert json.loads(meta["compress.options"])["target"] == "cpu"
    assert "qmoe.target" not in qmoe.load_metadata(anyt)
    got, want = qmoe.load(cpu, verify_checksums=True), qmoe.load(anyt)
    for name, m in got.items():
        if not isinstance(m, qmoe.CompressedMatrix):
            continue
        w = want[name]
        np.testing.assert_array_equal(m.decode_symbols(), w.decode_symbols())
        np.testing.assert_array_equal(m.levels, w.levels)
        assert m.codec == qmoe.encode(w.decode_symbols(), w.levels, codec="auto", target="cpu").codec
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        qmoe.compress_checkpoint(checkpoint, tmp_path / "x.safetensors", target="tpu", check_disk=False)
    assert not (tmp_path / "x.safetensors").exists()

def compress_with_hessians(*args, **kwargs):
    """compress_checkpoint with a Hessian file; skips (with the library's reason) while the
    library is built without the Hessian file reader of the pipeline."""
    try:
        return qmoe.compress_checkpoint(*args, **kwargs)
    except RuntimeError as e:
        if "not available in this build" in str(e):
            pytest.skip(f"pipeline without Hessian files: {e}")
        raise


def test_gptq_with_hessians_from_python(checkpoint, tmp_path):
    rng = np.random.default_rng(5)
    experts = expert_names(checkpoint)
    accs = {}
    for name, w in experts.items():
        acc = qmoe.HessianAccumulator(w.shape[1])
        acc.add(rng.standard_normal((64, w.shape[1])).astype(np.float32))
        accs[name[: -len(".weight")]] = acc  # format/HESSIANS.md: named without ".weight"
    hfile = tmp_path / "hessians.safetensors"
    qmoe.save_hessians(hfile, accs)
    out = tmp_path / "gptq"
    summary = compress_with_hessians(checkpoint, out, hessians=hfile, shard_size=100000, check_disk=False)
    assert summary["quantizer"] == "gptq" and summary["fallback_matrices"] == 0
    assert len(summary["files"]) > 1
    loaded = qmoe.load(out)
    meta = qmoe.load_metadata(out)
    assert meta["quantizer"] == "gptq"
    name = sorted(experts)[0]
    want = qmoe.compress_matrix(experts[name], accs[name[: -len(".weight")]].hessian(), codec=loaded[name].codec)
    np.testing.assert_array_equal(loaded[name].decode_symbols(), want.decode_symbols())
    assert json.loads(meta["compress.options"])


def test_default_refit_follows_the_cli(checkpoint, tmp_path):
    # refit unset: the default recipe of `qmoe compress` (gptq.h, default_refit()): one round for
    # GPTQ at a target size, none without a target or for round to nearest; an explicit value wins.
    rng = np.random.default_rng(6)
    accs = {}
    for name, w in expert_names(checkpoint).items():
        acc = qmoe.HessianAccumulator(w.shape[1])
        acc.add(rng.standard_normal((64, w.shape[1])).astype(np.float32))
        accs[name[: -len(".weight")]] = acc
    hfile = tmp_path / "hessians.safetensors"
    qmoe.save_hessians(hfile, accs)

    def compress(name, **kwargs):
        out = tmp_path / f"{name}.safetensors"
        summary = compress_with_hessians(checkpoint, out, check_disk=False, codec="qmoe-v1", **kwargs)
        options = json.loads(qmoe.load_metadata(out)["compress.options"])
        # (QMoE's ternary options are not recorded: no "ternary" key means refit 0)
        return summary, options.get("ternary", {"refit": 0})["refit"]

    plain, refit = compress("gptq", hessians=hfile)
    assert refit == 0
    # A size the fixture's small matrices reach (as in test_rate_control).
    rate = dict(target_bits=round(plain["bits_per_expert_weight"] + 0.05, 3), rate_scope="all",
                rate_knob="penalty", levels="fit", rate_tolerance=0.02)
    assert compress("gptq_target", hessians=hfile, **rate)[1] == 1
    assert compress("gptq_target_named", hessians=hfile, refit=0, **rate)[1] == 0
    assert compress("rtn_target", **rate)[1] == 0


def test_rate_control(checkpoint, tmp_path):
    # qmoe-v1 throughout: on the fixture's 32-wide rows the automatic codec picks qmoe-p5 for some
    # matrices, whose size does not depend on the zeros.
    plain = qmoe.compress_checkpoint(checkpoint, tmp_path / "rtn.safetensors", check_disk=False,
                                     codec="qmoe-v1")
    out = tmp_path / "rate.safetensors"
    for delta in (0.05, -0.1):
        target = round(plain["bits_per_expert_weight"] + delta, 3)
        summary = qmoe.compress_checkpoint(checkpoint, out, check_disk=False, target_bits=target,
                                           rate_scope="all", rate_knob="penalty", levels="fit",
                                           refit=2, codec="qmoe-v1")
        assert summary["bits_per_expert_weight"] == pytest.approx(target, abs=0.002)
    options = json.loads(qmoe.load_metadata(out)["compress.options"])
    assert options["rate"]["target_bits"] == target and options["rate"]["scope"] == "all"
    assert options["ternary"] == {"levels": "fit", "zero_threshold": 0.5, "zero_penalty": 0.0, "refit": 2}
    assert "rate" not in json.loads(qmoe.load_metadata(tmp_path / "rtn.safetensors")["compress.options"])
    with pytest.raises(ValueError):
        qmoe.compress_checkpoint(checkpoint, tmp_path / "bad.safetensors", check_disk=False,
                                 target_bits=1.0, rate_scope="everything")


def test_errors(checkpoint, tmp_path):
    with pytest.raises(qmoe.FormatError, match="no such checkpoint"):
        qmoe.compress_checkpoint(tmp_path / "missing", tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="unknown codec"):
        qmoe.compress_checkpoint(checkpoint, tmp_path / "o.safetensors", codec="x")

    class Stop(Exception):
        pass

    calls = []

    def stop(p):
        calls.append(p)
        raise Stop()

    # The exception stops the run: it is raised, the callback is not called again, nothing is
    # written to the output, and a resumed run produces the same bytes as an uninterrupted one.
    ref = tmp_path / "ref.safetensors"
    qmoe.compress_checkpoint(checkpoint, ref, threads=2, check_disk=False)
    stopped = tmp_path / "stopped.safetensors"
    with pytest.raises(Stop):
        qmoe.compress_checkpoint(checkpoint, stopped, threads=2, progress=stop, check_disk=False)
    assert len(calls) == 1
    assert not stopped.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]
    qmoe.compress_checkpoint(checkpoint, stopped, threads=2, resume=True, check_disk=False)
    assert stopped.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "stopped.safetensors.qmoe-work").exists()

def test_missing_hessian_file(checkpoint, tmp_path):
    with pytest.raises(qmoe.FormatError, match="none.safetensors"):
        compress_with_hessians(checkpoint, tmp_path / "o.safetensors", hessians=tmp_path / "none.safetensors")


def test_calibrated_gptq(checkpoint, tmp_path):
    """compress_checkpoint with the fixture's token pairs as calibration: GPTQ on Hessians from the
    block loop, the same bytes for 1 and 2 threads, and the loop's phases in the summary."""
    out1, out2 = tmp_path / "c1.safetensors", tmp_path / "c2.safetensors"
    seen = []
    s1 = qmoe.compress_checkpoint(checkpoint, out1, calib_tokens=checkpoint / "tokens.safetensors",
                                  threads=1, progress=seen.append, check_disk=False)
    s2 = qmoe.compress_checkpoint(checkpoint, out2, calib_tokens=checkpoint / "tokens.safetensors",
                                  threads=2, check_disk=False)
    assert s1["quantizer"] == s2["quantizer"] == "gptq"
    assert out1.read_bytes() == out2.read_bytes()
    assert s1["calibration_pairs"] == 3 and s1["calibration_tokens"] > 0
    phases = s1["phases"]
    assert set(phases) == {"load", "forward", "hessians", "gptq", "encode", "write", "outputs"}
    assert phases["forward"]["flops"] > 0 and phases["hessians"]["flops"] > 0
    assert phases["gptq"]["flops"] > 0 and phases["outputs"]["flops"] > 0
    assert {p["step"] for p in seen} >= {"forward", "experts"}
    options = json.loads(qmoe.load_metadata(out1)["compress.options"])
    assert options["hessians"].startswith("calibration tokens.safetensors (3 pairs, sequential)")
    with pytest.raises(ValueError):
        qmoe.compress_checkpoint(checkpoint, tmp_path / "x.safetensors",
                                 calib_tokens=checkpoint / "tokens.safetensors",
                                 hessians=checkpoint / "tokens.safetensors", check_disk=False)
