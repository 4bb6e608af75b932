#!/usr/bin/env python3
"""Run a Switch-style MoE feed-forward layer from compressed experts.

A layer of E experts (each ReLU(x W_i^T) W_o^T, W_i: d_ff x d_model, W_o: d_model x d_ff) with a
top-1 router. Every expert matrix is ternarized (round to nearest) and encoded; the layer then
runs straight from the codes with two qmoe.grouped_matmul calls: the up projections of all active
experts into one hidden row per routed token, ReLU, then the down projections, scaled by the router
probability, back into each token's row. The script checks the result against the same layer in
numpy with the decoded (ternary) weights, and times both.

    python examples/moe_layer.py [--experts 8] [--d-model 768] [--d-ff 3072] [--tokens 64]
"""

import argparse
import time

import numpy as np

import qmoe


def compressed_layer(wi, wo, x, expert, prob):
    """y[t] = prob[t] * W_o[e] ReLU(W_i[e] x[t]) for e = expert[t], with grouped calls."""
    tokens = [np.flatnonzero(expert == e) for e in range(len(wi))]
    slots, start = [], 0
    for t in tokens:
        slots.append(np.arange(start, start + len(t)))
        start += len(t)
    hidden = qmoe.grouped_matmul(wi, x, tokens, out_rows=slots)  # (routed tokens, d_ff)
    np.maximum(hidden, 0.0, out=hidden)
    scales = [prob[t] for t in tokens]
    out = np.zeros((x.shape[0], wo[0].shape[0]), dtype=np.float32)
    return qmoe.grouped_matmul(wo, hidden, slots, out_rows=tokens, scales=scales, out=out)


def dense_layer(wi, wo, x, expert, prob):
    y = np.zeros((x.shape[0], wo[0].shape[0]), dtype=np.float32)
    for e in range(len(wi)):
        t = np.flatnonzero(expert == e)
        if len(t):
            y[t] = prob[t, None] * (np.maximum(x[t] @ wi[e].T, 0.0) @ wo[e].T)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)

    wi, wo, wi_dense, wo_dense = [], [], [], []
    for _ in range(a.experts):
        for shape, comp, dense in (((a.d_ff, a.d_model), wi, wi_dense), ((a.d_model, a.d_ff), wo, wo_dense)):
            w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            m = qmoe.encode(*qmoe.ternarize_rtn(w), codec="auto")
            comp.append(m)
            dense.append(m.decode())
    bits = np.mean([m.bits_per_weight for m in wi + wo])
    print(f"{a.experts} experts of {a.d_ff}x{a.d_model} + {a.d_model}x{a.d_ff}: {bits:.3f} bits per weight")

    x = rng.standard_normal((a.tokens, a.d_model)).astype(np.float32)
    logits = x @ rng.standard_normal((a.d_model, a.experts)).astype(np.float32)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expert = p.argmax(axis=1)
    prob = p[np.arange(a.tokens), expert].astype(np.float32)
    print(f"{a.tokens} tokens routed to {len(np.unique(expert))} experts")

    t0 = time.perf_counter()
    got = compressed_layer(wi, wo, x, expert, prob)
    t1 = time.perf_counter()
    want = dense_layer(wi_dense, wo_dense, x, expert, prob)
    t2 = time.perf_counter()
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    print(f"max relative difference to numpy on the decoded weights: {err:.2e}")
    print(f"qmoe grouped layer {1e3 * (t1 - t0):.2f} ms, numpy dense layer {1e3 * (t2 - t1):.2f} ms")


if __name__ == "__main__":
    main()
