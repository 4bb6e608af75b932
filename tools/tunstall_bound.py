#!/usr/bin/env python3
"""Bits per weight of the best variable-to-fixed code with 16-bit codewords over i.i.d. ternary
symbols: a Tunstall dictionary on symbol pairs (2^16 leaves, entries of at most MAX_PAIRS pairs),
against the order-0 entropy. This bounds what a qmoe-v2 dictionary with 16-bit codes could gain
over qmoe-v1 (QMoE's dictionary, at most 14 pairs per entry, 0.737 bits per weight at P(0) = 0.885
as measured by bench_codec).

    python3 tools/tunstall_bound.py [--p0 0.885 0.92 0.95] [--max-pairs 14 32]

Tunstall's tree expands the most probable leaf until 2^16 leaves exist; its expected entry length
is the sum of the probabilities of the internal nodes (root included), so no simulation is needed.
"""
import argparse
import heapq
import math


def tunstall_bits_per_weight(p0: float, max_pairs: int, leaves: int = 1 << 16) -> float:
    p1 = (1.0 - p0) / 2.0
    sym = [p0, p1, p1]
    pair = [sym[a] * sym[b] for a in range(3) for b in range(3)]
    heap = [(-1.0, 0)]  # (-probability, depth in pairs)
    count, expected_pairs = 1, 0.0
    while heap and count + 8 <= leaves:
        q, depth = heapq.heappop(heap)
        if depth >= max_pairs:
            continue  # a leaf that may not grow; it stays a codeword
        expected_pairs += -q
        count += 8
        for pp in pair:
            heapq.heappush(heap, (q * pp, depth + 1))
    return 16.0 / (2.0 * expected_pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p0", type=float, nargs="+", default=[0.885, 0.92, 0.95])
    ap.add_argument("--max-pairs", type=int, nargs="+", default=[14, 32])
    a = ap.parse_args()
    print("| P(0) | entropy | " + " | ".join(f"Tunstall, <= {m} pairs" for m in a.max_pairs) + " |")
    print("|---|---|" + "---|" * len(a.max_pairs))
    for p0 in a.p0:
        p1 = (1.0 - p0) / 2.0
        h = -(p0 * math.log2(p0) + 2 * p1 * math.log2(p1))
        cells = [f"{tunstall_bits_per_weight(p0, m):.4f}" for m in a.max_pairs]
        print(f"| {p0} | {h:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
