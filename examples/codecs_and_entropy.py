#!/usr/bin/env python3
"""Bits per weight of qmoe's codecs against the entropy of the symbols, and qmoe-v2 in a container.

For i.i.d. ternary matrices at several sparsities, the script encodes the same symbols as
qmoe-v1 (QMoE's dictionary), qmoe-v2 (a dictionary fitted to the matrix), qmoe-v3 (the same
with rows coded in pairs; CPU only) and qmoe-p5 (base-3 packing), and prints the bits per weight of the codes next to the order-0 entropy. Then it
transcodes a qmoe-v1 matrix to qmoe-v2, saves both in containers, and checks that the two give
the same products.

    python examples/codecs_and_entropy.py [--rows 768] [--cols 3072]
"""

import argparse
import os
import tempfile

import numpy as np

import qmoe


def entropy(p0):
    p1 = (1 - p0) / 2
    return -(p0 * np.log2(p0) + 2 * p1 * np.log2(p1))


def ternary(rng, rows, cols, p0):
    u = rng.random((rows, cols))
    symbols = np.where(u < p0, 0, np.where(u < p0 + (1 - p0) / 2, 1, 2)).astype(np.uint8)
    levels = np.tile(np.array([0xBD4C, 0x3D4C], np.uint16), (rows, 1))  # (-0.05, +0.05) in bf16
    return symbols, levels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=3072)
    a = ap.parse_args()
    rng = np.random.default_rng(0)

    codecs = ("qmoe-v1", "qmoe-v2", "qmoe-v3", "qmoe-p5")
    print(f"{'P(0)':>6} {'entropy':>8} " + " ".join(f"{c:>8}" for c in codecs) +
          "   (bits per weight of the codes)")
    for p0 in (0.80, 0.885, 0.92, 0.95):
        s, l = ternary(rng, a.rows, a.cols, p0)
        bits = [qmoe.encode(s, l, codec=c).code_bits_per_weight for c in codecs]
        print(f"{p0:6.3f} {entropy(p0):8.4f} " + " ".join(f"{b:8.4f}" for b in bits))

    s, l = ternary(rng, a.rows, a.cols, 0.885)
    v1 = qmoe.encode(s, l, codec="qmoe-v1")
    v2 = qmoe.transcode(v1, codec="qmoe-v2")
    x = rng.standard_normal(a.cols).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, m in (("qmoe-v1", v1), ("qmoe-v2", v2)):
            path = os.path.join(tmp, name + ".safetensors")
            qmoe.save(path, {"w": m})
            sizes[name] = os.path.getsize(path)
            loaded = qmoe.load(path)["w"]
            assert np.array_equal(loaded.matvec(x), m.matvec(x))
        print(f"one {a.rows}x{a.cols} matrix at P(0) = 0.885: qmoe-v1 file {sizes['qmoe-v1']} bytes, "
              f"qmoe-v2 file {sizes['qmoe-v2']} bytes (its dictionary, {qmoe.v2_dictionary(57 / 64)[0].nbytes} "
              "bytes, is shared by all matrices of a file)")
    same = np.array_equal(v1.decode(), v2.decode())
    diff = float(np.max(np.abs(v1.matvec(x) - v2.matvec(x))))
    print(f"qmoe-v1 and qmoe-v2 decode to the same weights: {same}; matvec max difference {diff:.3g}")


if __name__ == "__main__":
    main()
