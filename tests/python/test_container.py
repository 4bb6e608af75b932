"""qmoe.save / qmoe.load, and what any safetensors reader sees in a container.

The stored layout checked here is the one format/SPEC.md specifies (sections 2.2-2.7; section 8
for reading with the safetensors package, which needs ml_dtypes imported for BF16): a compressed
matrix W is stored as
  W.qmoe_codes        U16  [num_codes]          (qmoe-v1, qmoe-v2, qmoe-v3)
  W.qmoe_row_offsets  I32  [rows + 1]           (qmoe-v1, qmoe-v2, qmoe-v3)
  W.qmoe_packed       U8   [rows, ceil(cols/5)] (qmoe-p5)
  W.qmoe_levels       BF16 [rows, 2]
plus the qmoe-v1 decode table "qmoe.dictionary.qmoe-v1" (I32 [65536, 2]) in every file holding
a qmoe-v1 matrix and each qmoe-v2 / qmoe-v3 dictionary "qmoe.dictionary.<codec>.<id>" (U32 [65536])
in every file holding a matrix that uses it; __metadata__ holds "format": "qmoe", "format_version":
"2", "qmoe.matrix.W": {"codec", "shape", "dtype"} (plus "dictionary": <id> for qmoe-v2 and qmoe-v3),
an xxh3 checksum "qmoe.xxh3.<tensor>" for every stored tensor and the header checksum
"qmoe.header.xxh3" (section 2.6). Dense tensors are stored unchanged.
"""

import gc
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import qmoe
from conftest import encode_rtn, sparse_weights

DENSE_DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.float16, ml_dtypes.bfloat16,
                np.uint32, np.int32, np.float32, np.uint64, np.int64, np.float64]
ST_NAMES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
            np.dtype(np.uint16): "U16", np.dtype(np.int16): "I16", np.dtype(np.float16): "F16",
            np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.uint32): "U32", np.dtype(np.int32): "I32",
            np.dtype(np.float32): "F32", np.dtype(np.uint64): "U64", np.dtype(np.int64): "I64",
            np.dtype(np.float64): "F64"}


def sample_tensors(rng):
    tensors = {}
    for i, dt in enumerate(DENSE_DTYPES):
        shape = [(), (5,), (3, 4), (2, 3, 2)][i % 4]
        tensors[f"dense.{np.dtype(dt).name}"] = (rng.standard_normal(shape) * 10).astype(dt)
    tensors["dense.empty"] = np.zeros((0, 3), np.float32)
    tensors["experts.0.wi"], _, _ = encode_rtn(sparse_weights(rng, 16, 40), "qmoe-v1")
    tensors["experts.1.wi"], _, _ = encode_rtn(sparse_weights(rng, 7, 33), "qmoe-v1")
    tensors["experts.2.wo"], _, _ = encode_rtn(sparse_weights(rng, 5, 21, zero_fraction=0.3), "qmoe-p5")
    tensors["experts.3.wo"], _, _ = encode_rtn(sparse_weights(rng, 6, 50), "qmoe-v2")
    tensors["experts.4.wo"], _, _ = encode_rtn(sparse_weights(rng, 7, 45), "qmoe-v3")  # odd height
    return tensors


def assert_same(loaded, original):
    assert sorted(loaded) == sorted(original)
    for name, want in original.items():
        got = loaded[name]
        if isinstance(want, qmoe.CompressedMatrix):
            assert isinstance(got, qmoe.CompressedMatrix)
            assert got.shape == want.shape and got.codec == want.codec
            assert got.original_dtype == want.original_dtype
            np.testing.assert_array_equal(got.levels, want.levels)
            assert got.dictionary_id == want.dictionary_id
            for attr in ("codes", "row_offsets", "packed", "dictionary"):
                a, b = getattr(got, attr), getattr(want, attr)
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(got.decode(), want.decode())
        else:
            assert isinstance(got, np.ndarray)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_save_load_round_trip(rng, tmp_path):
    tensors = sample_tensors(rng)
    path = tmp_path / "model.safetensors"
    files = qmoe.save(path, tensors, metadata={"source": "test", "note": "ünïcode"})
    assert [os.path.basename(f) for f in files] == ["model.safetensors"]
    loaded = qmoe.load(path)
    assert list(loaded) == sorted(tensors)
    assert_same(loaded, tensors)
    assert qmoe.load(str(path), verify_checksums=True).keys() == loaded.keys()
    meta = qmoe.load_metadata(path)
    assert meta["source"] == "test" and meta["note"] == "ünïcode"
    assert meta["format"] == "qmoe" and meta["format_version"] == "2"
    # A directory holding model.safetensors opens too.
    assert_same(qmoe.load(tmp_path), tensors)


def test_loaded_tensors_are_read_only_views_that_keep_the_file_mapped(rng, tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = sample_tensors(rng)
    qmoe.save(path, tensors)
    loaded = qmoe.load(path)
    dense = loaded["dense.float32"]
    matrix = loaded["experts.0.wi"]
    assert not dense.flags.writeable
    with pytest.raises(ValueError):
        dense[...] = 0
    del loaded
    gc.collect()
    np.testing.assert_array_equal(dense, tensors["dense.float32"])
    x = np.ones(matrix.cols, np.float32)
    np.testing.assert_array_equal(matrix.matvec(x), tensors["experts.0.wi"].matvec(x))


def test_bfloat16_as_raw_bits(rng, tmp_path):
    path = tmp_path / "b.safetensors"
    h = rng.standard_normal(6).astype(ml_dtypes.bfloat16)
    qmoe.save(path, {"h": h})
    raw = qmoe.load(path, raw_bf16=True)["h"]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, h.view(np.uint16))
    assert qmoe.load(path)["h"].dtype == ml_dtypes.bfloat16


def test_sharded_round_trip(rng, tmp_path):
    tensors = sample_tensors(rng)
    for i in range(4):
        tensors[f"big.{i}"] = rng.standard_normal((64, 64)).astype(np.float32)
    out = tmp_path / "sharded"
    files = qmoe.save(out, tensors, shard_size=20000, metadata={"k": "v"})
    names = sorted(os.path.basename(f) for f in files)
    assert "model.safetensors.index.json" in names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1
    assert all(n.startswith("model-") and "-of-" in n for n in shards)
    assert_same(qmoe.load(out), tensors)
    assert_same(qmoe.load(out / "model.safetensors.index.json", verify_checksums=True), tensors)
    assert qmoe.load_metadata(out)["k"] == "v"


def expected_stored(tensors):
    """name -> (safetensors dtype, shape) of every stored tensor, per the layout above."""
    want = {}
    for name, t in tensors.items():
        if isinstance(t, qmoe.CompressedMatrix):
            rows, cols = t.shape
            if t.codec in ("qmoe-v1", "qmoe-v2", "qmoe-v3"):
                want[name + ".qmoe_codes"] = ("U16", [t.codes.size])
                want[name + ".qmoe_row_offsets"] = ("I32", [rows + 1])
                if t.codec in ("qmoe-v2", "qmoe-v3"):
                    want[f"qmoe.dictionary.{t.codec}." + t.dictionary_id] = ("U32", [65536])
            else:
                want[name + ".qmoe_packed"] = ("U8", [rows, (cols + 4) // 5])
            want[name + ".qmoe_levels"] = ("BF16", [rows, 2])
        else:
            want[name] = (ST_NAMES[t.dtype], list(t.shape))
    if any(isinstance(t, qmoe.CompressedMatrix) and t.codec == "qmoe-v1" for t in tensors.values()):
        want["qmoe.dictionary.qmoe-v1"] = ("I32", [65536, 2])
    return want


def header_checksum_from_spec(path):
    """The header checksum of format/SPEC.md 2.6, computed from the text of the spec alone."""
    import struct

    import xxhash

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    out = bytearray()

    def string(s):
        b = s.encode("utf-8")
        out.extend(struct.pack("<Q", len(b)) + b)

    for k in sorted(meta, key=lambda k: k.encode("utf-8")):
        if k != "qmoe.header.xxh3":
            out.append(1)
            string(k)
            string(meta[k])
    for name in sorted(header, key=lambda k: k.encode("utf-8")):
        e = header[name]
        out.append(2)
        string(name)
        string(e["dtype"])
        out.extend(struct.pack("<Q", len(e["shape"])))
        out.extend(struct.pack(f"<{len(e['shape'])}Q", *e["shape"]))
        out.extend(struct.pack("<QQ", *e["data_offsets"]))
    return xxhash.xxh3_64_hexdigest(bytes(out))


def st_dtype_name(arr):
    return ST_NAMES[arr.dtype]


def test_safetensors_package_reads_every_tensor(rng, tmp_path):
    tensors = sample_tensors(rng)
    path = tmp_path / "model.safetensors"
    qmoe.save(path, tensors, metadata={"source": "test"})
    want = expected_stored(tensors)
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(want)
        stored = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for name, (dtype, shape) in want.items():
        assert st_dtype_name(stored[name]) == dtype, name
        assert list(stored[name].shape) == shape, name
    # The bytes are those the CompressedMatrix exposes.
    for name, t in tensors.items():
        if isinstance(t, qmoe.CompressedMatrix):
            np.testing.assert_array_equal(stored[name + ".qmoe_levels"].view(np.uint16), t.levels)
            if t.codec in ("qmoe-v1", "qmoe-v2", "qmoe-v3"):
                np.testing.assert_array_equal(stored[name + ".qmoe_codes"], t.codes)
                np.testing.assert_array_equal(stored[name + ".qmoe_row_offsets"], t.row_offsets)
                if t.codec in ("qmoe-v2", "qmoe-v3"):
                    d = stored[f"qmoe.dictionary.{t.codec}." + t.dictionary_id]
                    np.testing.assert_array_equal(d, t.dictionary)
            else:
                np.testing.assert_array_equal(stored[name + ".qmoe_packed"].reshape(-1), t.packed)
        else:
            np.testing.assert_array_equal(stored[name], t)
    assert meta["format"] == "qmoe" and meta["format_version"] == "2" and meta["source"] == "test"
    assert meta["qmoe.header.xxh3"] == header_checksum_from_spec(path)
    for name, t in tensors.items():
        if isinstance(t, qmoe.CompressedMatrix):
            decl = json.loads(meta["qmoe.matrix." + name])
            want_decl = {"codec": t.codec, "shape": list(t.shape), "dtype": t.original_dtype}
            if t.codec in ("qmoe-v2", "qmoe-v3"):
                want_decl["dictionary"] = t.dictionary_id
            assert decl == want_decl
    for name in want:
        assert len(meta["qmoe.xxh3." + name]) == 16


def test_safetensors_package_reads_every_shard(rng, tmp_path):
    tensors = sample_tensors(rng)
    out = tmp_path / "sharded"
    files = qmoe.save(out, tensors, shard_size=4096)
    want = expected_stored(tensors)
    seen = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                seen.setdefault(k, st.get_tensor(k))
    assert sorted(seen) == sorted(want)
    for name, (dtype, shape) in want.items():
        assert st_dtype_name(seen[name]) == dtype and list(seen[name].shape) == shape, name
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["format"] == "qmoe"
    for f in files:
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), framework="numpy") as st:
                assert st.metadata()["qmoe.header.xxh3"] == header_checksum_from_spec(f)
    assert set(index["weight_map"]) <= set(want)


def test_checksums_catch_corruption(rng, tmp_path):
    path = tmp_path / "c.safetensors"
    qmoe.save(path, {"x": np.arange(1000, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # inside the last tensor's data
    path.write_bytes(bytes(data))
    assert qmoe.load(path)["x"].shape == (1000,)  # structure is intact
    with pytest.raises(qmoe.FormatError, match="checksum"):
        qmoe.load(path, verify_checksums=True)


def test_qmoe_v3_next_to_qmoe_v2(rng, tmp_path):
    # Fitted to the same zero fraction, a qmoe-v2 and a qmoe-v3 matrix still share nothing: each
    # codec's dictionary is stored under its own name, once per file.
    s, l = qmoe.ternarize_rtn(sparse_weights(rng, 9, 300))
    tensors = {"v2": qmoe.encode(s, l, codec="qmoe-v2", fitted_p0=57 / 64),
               "v3": qmoe.encode(s, l, codec="qmoe-v3", fitted_p0=57 / 64, original_dtype="BF16"),
               "v3b": qmoe.encode(s[:4], l[:4], codec="qmoe-v3", fitted_p0=57 / 64)}
    assert tensors["v3"].dictionary_id == "11ccb88076bd615f"  # format/SPEC.md section 4.4.2
    assert tensors["v2"].dictionary_id != tensors["v3"].dictionary_id
    path = tmp_path / "v3.safetensors"
    qmoe.save(path, tensors)
    loaded = qmoe.load(path, verify_checksums=True)
    assert_same(loaded, tensors)
    assert loaded["v3"].codec == "qmoe-v3" and loaded["v3"].original_dtype == "BF16"
    np.testing.assert_array_equal(loaded["v3"].decode_symbols(), s)
    np.testing.assert_array_equal(loaded["v3"].dictionary, qmoe.v3_dictionary(57 / 64)[0])
    with safe_open(str(path), framework="numpy") as f:
        dictionaries = sorted(k for k in f.keys() if k.startswith("qmoe.dictionary."))
    assert dictionaries == ["qmoe.dictionary.qmoe-v2." + tensors["v2"].dictionary_id,
                            "qmoe.dictionary.qmoe-v3.11ccb88076bd615f"]
