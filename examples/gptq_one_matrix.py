#!/usr/bin/env python3
"""Compress one matrix with GPTQ and print its error.

A linear layer y = W x (W: rows x cols) sees calibration inputs X (tokens x cols) with correlated
features, as real activations have. The script accumulates the Hessian H = (2/n) X^T X, runs
GPTQ on QMoE's ternary grid, encodes the result, and compares it with round-to-nearest: relative
output error ||X W^T - X Q^T|| / ||X W^T|| on held-out inputs (computed with the compressed
matrix's own kernel, straight from the codes), bits per weight, and the share of zeros.

    python examples/gptq_one_matrix.py [--rows 768] [--cols 3072] [--tokens 4096]
"""

import argparse
import time

import numpy as np

import qmoe


class Activations:
    """Inputs with a few dominant directions plus noise; every draw shares the directions."""

    def __init__(self, rng, cols, rank):
        self.rng = rng
        self.basis = rng.standard_normal((rank, cols)) / np.sqrt(rank)

    def draw(self, tokens):
        z = self.rng.standard_normal((tokens, self.basis.shape[0]))
        noise = self.rng.standard_normal((tokens, self.basis.shape[1]))
        return (z @ self.basis + 0.1 * noise).astype(np.float32)


def relative_error(m, w, x):
    want = x @ w.T
    got = m.matmul(x)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    # Expert-like weights: small values with a few large ones, so most round to zero.
    w = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    w += (rng.random(w.shape) < 0.05) * np.sign(w) * 0.08
    source = Activations(rng, args.cols, args.rank)
    x = source.draw(args.tokens)
    held_out = source.draw(1024)  # not used for calibration

    t0 = time.perf_counter()
    acc = qmoe.HessianAccumulator(args.cols)
    for start in range(0, args.tokens, 1024):  # as a forward hook would see batches
        acc.add(x[start:start + 1024])
    h = acc.hessian()
    t1 = time.perf_counter()

    symbols, levels = qmoe.ternarize_rtn(w)
    rtn = qmoe.encode(symbols, levels, codec="auto")
    t2 = time.perf_counter()
    gptq, stats = qmoe.compress_matrix(w, h, with_stats=True)
    t3 = time.perf_counter()

    print(f"matrix {args.rows} x {args.cols}, {acc.count} calibration tokens "
          f"(Hessian in {t1 - t0:.2f} s)")
    print(f"{'method':<8} {'codec':<8} {'bits/w':>7} {'zeros':>7} {'rel. output error':>18} {'time':>8}")
    print(f"{'RTN':<8} {rtn.codec:<8} {rtn.bits_per_weight:>7.3f} {float((symbols == 0).mean()):>7.1%} "
          f"{relative_error(rtn, w, held_out):>18.4f} {t2 - t1:>7.2f}s")
    print(f"{'GPTQ':<8} {gptq.codec:<8} {gptq.bits_per_weight:>7.3f} {stats['zero_fraction']:>7.1%} "
          f"{relative_error(gptq, w, held_out):>18.4f} {t3 - t2:>7.2f}s")
    print(f"GPTQ status {stats['status']}; layer loss {stats['loss']:.4g}, output loss {stats['output_loss']:.4g}")


if __name__ == "__main__":
    main()
