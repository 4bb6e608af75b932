"""qmoe.torch: compressed experts inside PyTorch and transformers, against transformers itself and
against qmoe's C++ forward pass, on every golden fixture of tests/switch/fixtures.

torch and transformers come with scripts/test-python.sh (scripts/requirements-torch.txt), which
sets QMOE_REQUIRE_TORCH=1: then a missing torch fails these tests instead of skipping them.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import qmoe

if os.environ.get("QMOE_REQUIRE_TORCH") == "1":
    import torch  # noqa: E402  (must be installed: fail loudly)
    import transformers  # noqa: E402
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install qmoe[torch])")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qmoe.torch as qt  # noqa: E402
from transformers import SwitchTransformersForConditionalGeneration  # noqa: E402
from transformers.models.switch_transformers import modeling_switch_transformers as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "switch" / "fixtures"
NAMES = ["every_other_f32", "dropped_f32", "untied_f32", "all_sparse_bf16"]
PINNED = "5.25.0"  # scripts/requirements-torch.txt, tools/make_switch_fixtures.py


def rel(got, want):
    """max |got - want| / max |want|: the 'relative' of the goals."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def token_pairs(d):
    from safetensors.numpy import load_file

    t = load_file(str(d / "tokens.safetensors"))
    eo, do = t["encoder_offsets"], t["decoder_offsets"]
    return [(t["encoder_ids"][eo[i]:eo[i + 1]].astype(np.int64), t["decoder_targets"][do[i]:do[i + 1]].astype(np.int64))
            for i in range(len(eo) - 1)]


def expected(d):
    from safetensors import safe_open

    with safe_open(str(d / "expected.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def run_pairs(model, pairs):
    """Logits (concatenated) and mean loss over the targets, one pair at a time (as the fixtures)."""
    logits, nll, n = [], 0.0, 0
    with torch.no_grad():
        for enc, dec in pairs:
            out = model(input_ids=torch.from_numpy(enc)[None], labels=torch.from_numpy(dec)[None])
            logits.append(out.logits[0].float().numpy())
            nll += float(out.loss) * len(dec)
            n += len(dec)
    return np.concatenate(logits), nll / n


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """Round-to-nearest container of every fixture (qmoe-v1 / qmoe-p5 by size, as qmoe compress)."""
    out = {}
    tmp = tmp_path_factory.mktemp("containers")
    for name in NAMES:
        path = tmp / f"{name}.qmoe.safetensors"
        qmoe.compress_checkpoint(FIXTURES / name, path, threads=2, check_disk=False)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def g4_containers(tmp_path_factory):
    """Round-to-nearest containers made for the CPU with every expert in qmoe-g4."""
    out = {}
    tmp = tmp_path_factory.mktemp("g4")
    for name in ["every_other_f32", "all_sparse_bf16"]:
        path = tmp / f"{name}.g4.safetensors"
        s = qmoe.compress_checkpoint(FIXTURES / name, path, codec="qmoe-g4", target="cpu", threads=2,
                                     check_disk=False)
        assert s["g4_matrices"] == s["expert_matrices"] > 0
        out[name] = path
    return out

def decoded_reference(name, container):
    """transformers' own model of the fixture, float32, with every expert replaced by the decoded
    compressed matrix: the same weights the compressed model runs."""
    ref = SwitchTransformersForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
    tensors = qmoe.load(container)
    n = 0
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if isinstance(tensors.get(pname), qmoe.CompressedMatrix):
                p.copy_(torch.from_numpy(tensors[pname].decode()))
                n += 1
    assert n > 0
    return ref


def test_installed_transformers_is_the_pinned_one():
    assert transformers.__version__ == PINNED, "the fixtures were made with transformers " + PINNED


def test_import_qmoe_does_not_import_torch():
    code = "import sys, qmoe; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_safetensors_numpy_reads_a_container_after_import_qmoe(containers):
    # A fresh interpreter: only `import qmoe` may make bfloat16 known to numpy.
    code = ("import sys, qmoe\nfrom safetensors.numpy import load_file\n"
            "t = load_file(sys.argv[1])\n"
            "lv = [v for k, v in t.items() if k.endswith('.qmoe_levels')]\n"
            "assert lv and all(v.dtype.name == 'bfloat16' for v in lv)\nprint(len(t))")
    out = subprocess.run([sys.executable, "-c", code, str(containers["every_other_f32"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout) > 0


# ---- the transformers models of the fixtures ------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_transformers_reproduces_the_fixture(name):
    # The installed transformers computes what the fixture recorded (same version, same rules).
    d = FIXTURES / name
    want, meta = expected(d)
    assert meta["transformers"] == PINNED
    model = SwitchTransformersForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    assert model.config.expert_capacity == int(meta["expert_capacity"])
    logits, loss = run_pairs(model, token_pairs(d))
    assert rel(logits, want["logits"]) <= 1e-5
    assert abs(loss - float(want["loss"][0])) <= 2e-5 * float(want["loss"][0])


@pytest.mark.parametrize("name", NAMES)
def test_cxx_forward_equals_transformers(name):
    d = FIXTURES / name
    want, meta = expected(d)
    r = qmoe.switch_eval(d, d / "tokens.safetensors", expert_capacity=int(meta["expert_capacity"]), logits=True)
    assert rel(r["logits"], want["logits"]) <= 1e-5
    assert abs(r["loss"] - float(want["loss"][0])) <= 2e-5 * float(want["loss"][0])


# ---- compressed models ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_from_container_equals_transformers_and_the_cxx_forward(name, containers):
    d = FIXTURES / name
    _, meta = expected(d)
    capacity = int(meta["expert_capacity"])
    pairs = token_pairs(d)
    model = qt.from_container(containers[name], dtype=torch.float32)
    ref = decoded_reference(name, containers[name])
    got, got_loss = run_pairs(model, pairs)
    want, want_loss = run_pairs(ref, pairs)
    print(f"{name}: logits relative difference {rel(got, want):.2g}, loss {got_loss:.7f} vs {want_loss:.7f}")
    assert rel(got, want) <= 1e-5
    assert abs(got_loss - want_loss) <= 2e-5 * want_loss
    # The C++ forward pass on the same container, compressed experts through the same kernels.
    cxx = qmoe.switch_eval(containers[name], d / "tokens.safetensors", expert_capacity=capacity, logits=True)
    print(f"{name}: C++ forward logits relative difference {rel(cxx['logits'], want):.2g}, "
          f"loss {cxx['loss']:.7f}")
    assert rel(cxx["logits"], want) <= 1e-5
    assert rel(cxx["logits"], got) <= 1e-5
    assert abs(cxx["loss"] - want_loss) <= 2e-5 * want_loss


@pytest.mark.parametrize("name", ["every_other_f32", "all_sparse_bf16"])
def test_qmoe_g4_container_runs_in_transformers(name, g4_containers):
    # A container made for the CPU (qmoe-g4 experts): the model runs from its codes, as the C++
    # forward pass does; against transformers on the decoded weights it differs by the int8
    # rounding of the activations of experts that get one token (the qmoe-g4 single-token kernel,
    # decoder_cpu/README.md: about 1% of the output), not more.
    d = FIXTURES / name
    _, meta = expected(d)
    pairs = token_pairs(d)
    model = qt.from_container(g4_containers[name], dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, qt.CompressedSwitchExperts)]
    assert layers and all(l[f"expert_{e}"].wi.matrix.codec == l[f"expert_{e}"].wo.matrix.codec == "qmoe-g4"
                          for l in layers for e in range(l.num_experts))
    ref = decoded_reference(name, g4_containers[name])
    got, got_loss = run_pairs(model, pairs)
    want, want_loss = run_pairs(ref, pairs)
    assert rel(got, want) <= 3e-2
    assert abs(got_loss - want_loss) <= 1e-2 * want_loss
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    # (the C++ forward pass batches other pairs together: other experts get one token)
    cxx = qmoe.switch_eval(g4_containers[name], d / "tokens.safetensors",
                           expert_capacity=int(meta["expert_capacity"]), logits=True)
    assert rel(cxx["logits"], want) <= 3e-2
    # Generation, one token at a time (on the fixture the other generation tests use): the grouped
    # layer call and the per-expert loop agree.
    if name != "every_other_f32":
        return
    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 60, 7]])
    grouped = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert grouped.shape[1] > 2
    for l in layers:
        l.grouped = False
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), grouped)


@pytest.mark.parametrize("name", ["every_other_f32", "all_sparse_bf16"])
def test_no_expert_is_decoded(name, containers):
    model = qt.from_container(containers[name])
    tensors = model.qmoe_tensors
    experts = [k for k, v in tensors.items() if isinstance(v, qmoe.CompressedMatrix)]
    params = dict(model.named_parameters())
    assert not any(".experts." in k for k in params), "an expert has dense parameters"
    dense = sum(int(np.prod(v.shape)) for k, v in tensors.items() if not isinstance(v, qmoe.CompressedMatrix))
    assert sum(p.numel() for p in params.values()) <= dense
    layers = [m for m in model.modules() if isinstance(m, qt.CompressedSwitchExperts)]
    assert sum(2 * l.num_experts for l in layers) == len(experts)
    # Every parameter is a view of the container's memory (no copy) when no dtype is asked for.
    for k, p in params.items():
        src = tensors["shared.weight" if k.endswith("embed_tokens.weight") and k not in tensors else
                      ("shared.weight" if k == "lm_head.weight" and k not in tensors else k)]
        assert p.data_ptr() == src.__array_interface__["data"][0], k


def test_sparse_blocks_come_from_the_tensor_names(containers):
    # A config that miscounts the sparse blocks (as switch-c-2048's does): the container's tensor
    # names decide, as in the C++ loader.
    name = "every_other_f32"
    cfg = json.loads(qmoe.load_metadata(containers[name])["config.json"])
    cfg["num_sparse_encoder_layers"] = 0
    cfg["num_sparse_decoder_layers"] = 4
    model = qt.from_container(containers[name], config=cfg)
    assert [b.layer[-1].is_sparse for b in model.encoder.block] == [False, True, False, True]
    assert [b.layer[-1].is_sparse for b in model.decoder.block] == [False, True, False, True]
    got, _ = run_pairs(model, token_pairs(FIXTURES / name))
    want, _ = run_pairs(qt.from_container(containers[name]), token_pairs(FIXTURES / name))
    np.testing.assert_array_equal(got, want)


def test_generate_equals_transformers_on_decoded_weights(containers):
    model = qt.from_container(containers["every_other_f32"])
    ref = decoded_reference("every_other_f32", containers["every_other_f32"])
    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 60, 7]])
    got = model.generate(ids, max_new_tokens=12, do_sample=False)
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.shape[1] > 2
    assert torch.equal(got, want)


def test_bf16_model_runs_in_bf16(containers):
    # The bf16 container's model keeps its stored dtype; its logits are those of transformers'
    # bf16 model on the decoded weights up to bf16 rounding of the activations.
    name = "all_sparse_bf16"
    model = qt.from_container(containers[name])
    assert model.shared.weight.dtype == torch.bfloat16
    ref = decoded_reference(name, containers[name]).to(torch.bfloat16)
    got, _ = run_pairs(model, token_pairs(FIXTURES / name))
    want, _ = run_pairs(ref, token_pairs(FIXTURES / name))
    assert rel(got, want) <= 0.05
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_replace_experts_in_a_loaded_model_equals_from_container(containers):
    name = "untied_f32"
    model = SwitchTransformersForConditionalGeneration.from_pretrained(FIXTURES / name).eval()
    qt.replace_experts(model, containers[name])
    assert not any(".experts." in k for k, _ in model.named_parameters())
    pairs = token_pairs(FIXTURES / name)
    a, _ = run_pairs(model, pairs)
    b, _ = run_pairs(qt.from_container(containers[name]), pairs)
    # Same weights and kernels; torch's own GEMMs may sum in another order on the mapped
    # (differently aligned) parameters.
    assert rel(a, b) <= 1e-6


def test_replace_experts_errors(containers, tmp_path):
    model = SwitchTransformersForConditionalGeneration.from_pretrained(FIXTURES / "every_other_f32").eval()
    with pytest.raises(ValueError, match="no compressed experts|match no sparse layer"):
        qt.replace_experts(model, containers["all_sparse_bf16"])
    tensors = dict(qmoe.load(containers["every_other_f32"]))
    del tensors["encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"]
    with pytest.raises(ValueError, match="expert_2.wo.weight"):
        qt.replace_experts(model, tensors)
    with pytest.raises(qmoe.FormatError):
        qt.from_container(tmp_path / "missing.safetensors")


# ---- the modules ----------------------------------------------------------------------------

def test_compressed_linear_matches_the_kernels_without_copying(rng):
    w = rng.standard_normal((48, 40)).astype(np.float32)
    m = qmoe.compress_matrix(w, codec="qmoe-v2")
    lin = qt.CompressedLinear(m)
    x = torch.from_numpy(rng.standard_normal((3, 5, 40)).astype(np.float32))
    y = lin(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    np.testing.assert_array_equal(y.reshape(15, 48).numpy(), m.matmul(x.reshape(15, 40).numpy()))
    # The kernels read the tensor's own memory.
    arr, bf16 = qt._numpy_view(x.reshape(15, 40))
    assert arr.__array_interface__["data"][0] == x.data_ptr() and not bf16
    xb = x.to(torch.bfloat16)
    arr, bf16 = qt._numpy_view(xb.reshape(15, 40))
    assert arr.__array_interface__["data"][0] == xb.data_ptr() and bf16
    yb = lin(xb)
    assert yb.dtype == torch.bfloat16
    np.testing.assert_array_equal(yb.float().reshape(15, 48).numpy(),
                                  torch.from_numpy(m.matmul(xb.float().reshape(15, 40).numpy())).to(torch.bfloat16).float().numpy())
    # A non-contiguous input, one token, no token.
    xt = torch.from_numpy(rng.standard_normal((40, 7)).astype(np.float32)).t()
    np.testing.assert_array_equal(lin(xt).numpy(), m.matmul(np.ascontiguousarray(xt.numpy())))
    np.testing.assert_array_equal(lin(x[0, 0]).numpy(), m.matvec(x[0, 0].numpy()))
    assert lin(torch.zeros((0, 40))).shape == (0, 48)
    with pytest.raises(TypeError, match="float64"):
        lin(x.double())
    with pytest.raises(ValueError, match="40"):
        lin(torch.zeros((2, 41)))


def test_compressed_linear_runs_qmoe_g4(rng):
    # The CPU codec inside a module: batches and single tokens, float32 and bf16 activations.
    w = rng.standard_normal((48, 40)).astype(np.float32)
    m = qmoe.compress_matrix(w, codec="qmoe-g4")
    assert m.codec == "qmoe-g4"
    lin = qt.CompressedLinear(m)
    dense = m.decode()
    x = torch.from_numpy(rng.standard_normal((3, 5, 40)).astype(np.float32))
    np.testing.assert_array_equal(lin(x).reshape(15, 48).numpy(), m.matmul(x.reshape(15, 40).numpy()))
    assert rel(lin(x).reshape(15, 48).numpy(), x.reshape(15, 40).numpy() @ dense.T) <= 1e-5
    # One token: the int8 kernel where the CPU has it, within half a quantization step per weight.
    one = x[0, 0]
    np.testing.assert_array_equal(lin(one).numpy(), m.matmul(one.numpy()[None])[0])
    exact = one.numpy().astype(np.float64) @ dense.T.astype(np.float64)
    bound = np.abs(dense).sum(1) * np.abs(one.numpy()).max() / 254 + 1e-5 * np.abs(exact) + 1e-6
    assert np.all(np.abs(lin(one).numpy() - exact) <= bound)
    yb = lin(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert rel(yb.float().reshape(15, 48).numpy(), x.reshape(15, 40).numpy() @ dense.T) <= 2e-2

def test_compressed_switch_experts_equals_transformers_experts(rng):
    cfg = transformers.SwitchTransformersConfig(d_model=32, d_ff=80, num_experts=5, expert_capacity=4)
    dense = st.SwitchTransformersExperts(cfg).eval()
    wi, wo = [], []
    with torch.no_grad():
        for e in range(5):
            ex = dense[f"expert_{e}"]
            wi.append(qmoe.compress_matrix(ex.wi.weight.numpy()))
            wo.append(qmoe.compress_matrix(ex.wo.weight.numpy()))
            ex.wi.weight.copy_(torch.from_numpy(wi[-1].decode()))
            ex.wo.weight.copy_(torch.from_numpy(wo[-1].decode()))
    comp = qt.CompressedSwitchExperts(wi, wo)
    n = 29
    x = torch.from_numpy(rng.standard_normal((n, 32)).astype(np.float32))
    idx = torch.from_numpy(rng.integers(0, 5, n))
    mask = torch.nn.functional.one_hot(idx, 5)
    mask[::4] = 0  # dropped tokens: no expert, output zero
    sel = mask.view(n, 1, 5)
    w = torch.from_numpy(rng.uniform(0.2, 1.0, (n, 1)).astype(np.float32))
    with torch.no_grad():
        want = dense(x, sel, w)
    got = comp(x, sel, w)
    assert rel(got.numpy(), want.numpy()) <= 1e-5
    assert torch.all(got[::4] == 0)
    # The per-expert loop (CUDA's path, and the one hooks see) gives the same.
    comp.grouped = False
    assert rel(comp(x, sel, w).numpy(), want.numpy()) <= 1e-5
    comp.grouped = True
    # bf16 activations: bf16 out, within bf16 rounding.
    gotb = comp(x.to(torch.bfloat16), sel, w.to(torch.bfloat16))
    assert gotb.dtype == torch.bfloat16
    assert rel(gotb.float().numpy(), want.numpy()) <= 2e-2
    with pytest.raises(ValueError, match="more than one expert"):
        bad = mask.clone()
        bad[1] = 1
        comp(x, bad.view(n, 1, 5), w)


# ---- calibration --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch_pairs", [("every_other_f32", 1), ("every_other_f32", 3), ("all_sparse_bf16", 2)])
def test_collect_hessians_equals_the_cxx_calibration(name, batch_pairs, tmp_path):
    d = FIXTURES / name
    pairs = token_pairs(d)
    # Exclude a few ids that occur, as sentinels would be.
    excluded = sorted({int(pairs[0][0][0]), int(pairs[1][0][1]), int(pairs[0][1][2])})
    model = SwitchTransformersForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    capacity = model.config.expert_capacity
    path = tmp_path / "h.hessians"
    got = qt.collect_hessians(model, qt.token_batches(d / "tokens.safetensors", batch_pairs), path,
                              excluded_ids=excluded, token_cap_multiplier=1.5)
    assert model.encoder.block[1].layer[1].mlp.router.expert_capacity == capacity  # restored
    want = qmoe.calibration_hessians(d, d / "tokens.safetensors", excluded_ids=excluded, token_cap_multiplier=1.5)
    assert sorted(got) == sorted(want)
    capped = 0
    for k in want:
        assert got[k].count == want[k].count, k
        assert got[k].dropped == want[k].dropped, k
        capped += want[k].dropped
        if want[k].count:
            assert rel(got[k].sum(), want[k].sum()) <= 1e-5, k
    assert sum(a.count for a in want.values()) > 0
    assert capped > 0, "the token cap should bind on these small fixtures"
    loaded = qmoe.load_hessians(path)
    assert sorted(loaded) == sorted(got)
    # qmoe compress --hessians reads the file: GPTQ for every expert that saw tokens.
    summary = qmoe.compress_checkpoint(d, tmp_path / "gptq.safetensors", hessians=path, check_disk=False)
    assert summary["quantizer"] != "rtn"
    assert summary["expert_matrices"] == len(got)


def test_collect_hessians_without_cap_and_with_the_sentinels(tmp_path):
    d = FIXTURES / "dropped_f32"
    model = SwitchTransformersForConditionalGeneration.from_pretrained(d).eval()
    batches = qt.token_batches(d / "tokens.safetensors", 8)
    got = qt.collect_hessians(model, batches, token_cap_multiplier=0, excluded_ids=qt.t5_sentinel_ids())
    want = qmoe.calibration_hessians(d, d / "tokens.safetensors", token_cap_multiplier=0)
    for k in want:
        assert got[k].count == want[k].count and got[k].dropped == 0, k
    # With the fixture's own capacity some tokens are dropped: fewer tokens count.
    capped = qt.collect_hessians(model, batches, token_cap_multiplier=0, expert_capacity=model.config.expert_capacity)
    assert sum(a.count for a in capped.values()) < sum(a.count for a in got.values())
    assert qt.t5_sentinel_ids(2) == [32098, 32099]


# ---- CUDA ----------------------------------------------------------------------------------

def _cuda_or_skip():
    if not qmoe.built_with_cuda:
        pytest.skip("qmoe was built without the CUDA kernels (no nvcc when it was installed)")
    if qmoe.cuda_device_count() == 0 or not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_tensors_run_through_the_cuda_kernels(rng, dtype):
    _cuda_or_skip()
    dt = getattr(torch, dtype)
    m = qmoe.compress_matrix(rng.standard_normal((96, 64)).astype(np.float32), codec="qmoe-v1")
    lin = qt.CompressedLinear(m)
    x = torch.from_numpy(rng.standard_normal((5, 64)).astype(np.float32))
    want = m.matmul(x.to(dt).float().numpy())
    got = lin(x.to(dt).cuda())
    assert got.is_cuda and got.dtype == dt
    assert rel(got.float().cpu().numpy(), want) <= (1e-5 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("codec", ["auto", "qmoe-g4"])
def test_cuda_model_generates_like_the_cpu_one(containers, g4_containers, codec):
    # (a qmoe-g4 container's experts are converted to qmoe-v2 on upload)
    _cuda_or_skip()
    model = qt.from_container((containers if codec == "auto" else g4_containers)["every_other_f32"])
    ids = torch.tensor([[5, 17, 33, 2, 40]])
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    got = model.to("cuda").generate(ids.cuda(), max_new_tokens=8, do_sample=False)
    assert torch.equal(got.cpu(), want)
