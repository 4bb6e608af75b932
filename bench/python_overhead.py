#!/usr/bin/env python3
"""Per-call overhead of CompressedMatrix.matvec / .matmul from Python against the C++ benchmark.

Runs the same configuration both ways and prints microseconds per call:
  C++     bench_decoder_cpu's "qmoe/<shape>/tokens:<n>/threads:<t>" (Google Benchmark, median of
          --repetitions, real time), calling qmoe::cpu::matmul directly;
  Python  the same shape, token count and threads through the qmoe module, on a pool of experts
          built the way the C++ benchmark builds its pool (i.i.d. symbols with P(0) = 0.885,
          qmoe-v1, QMOE_BENCH_EXPERTS experts, the next expert every call so that weights come
          from DRAM), median over the same number of repetitions;
and the fixed cost of one call on a 1 x 2 matrix, where the kernel does almost nothing.

    python bench/python_overhead.py --bench build/release/bench/bench_decoder_cpu

Build the C++ benchmark with the Release build (cmake --build build/release --target
bench_decoder_cpu); without it only the Python figures are printed. Both sides use the same
OpenMP thread count (--threads); on a loaded machine run it a few times and compare minima.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import qmoe

SHAPES = {"wi_3072x768": (3072, 768), "wo_768x3072": (768, 3072), "big_4096x14336": (4096, 14336)}
P_ZERO = 0.885  # the sparsity the C++ benchmark draws its symbols with


def expert_pool(rows, cols, experts, seed=7):
    rng = np.random.default_rng(seed)
    pool = []
    p_side = (1.0 - P_ZERO) / 2
    for _ in range(experts):
        symbols = rng.choice(np.array([0, 1, 2], np.uint8), size=(rows, cols), p=[P_ZERO, p_side, p_side])
        lo = -rng.uniform(0.01, 0.1, rows).astype(np.float32)
        hi = rng.uniform(0.01, 0.1, rows).astype(np.float32)
        levels = np.stack([lo, hi], axis=1).view(np.uint32)
        levels = (levels >> 16).astype(np.uint16)  # bf16 bit patterns (truncated: any value will do)
        pool.append(qmoe.encode(symbols, levels, codec="qmoe-v1"))
    return pool


def time_calls(call, pool, x, calls, repetitions):
    """Median over repetitions of the mean time per call, in microseconds."""
    for i in range(min(len(pool), calls)):  # warm-up: page in every expert once
        call(pool[i], x)
    per_call = []
    for _ in range(repetitions):
        t0 = time.perf_counter_ns()
        for i in range(calls):
            call(pool[i % len(pool)], x)
        per_call.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(per_call), min(per_call)


def cxx_time(bench, shape, tokens, threads, repetitions, experts):
    """(median, min) over repetitions of bench_decoder_cpu's real time per call, microseconds."""
    name = f"qmoe/{shape}/tokens:{tokens}/threads:{threads}"
    env = dict(os.environ, QMOE_BENCH_EXPERTS=str(experts), OMP_NUM_THREADS=str(threads))
    # The benchmark prints its own table on stdout; the JSON goes to a file.
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "bench.json"
        subprocess.run(
            [str(bench), f"--benchmark_filter=^{name}(/real_time)?$", f"--benchmark_repetitions={repetitions}",
             f"--benchmark_out={out}", "--benchmark_out_format=json"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        runs = json.loads(out.read_text())["benchmarks"]
    times = []
    for r in runs:
        if r.get("run_type") == "iteration":
            assert r["time_unit"] == "us", r["time_unit"]
            times.append(r["real_time"])
    if not times:
        raise RuntimeError(f"{bench}: no run of {name} (does the benchmark list it?)")
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=pathlib.Path,
                    default=pathlib.Path(__file__).resolve().parents[1] / "build/release/bench/bench_decoder_cpu",
                    help="bench_decoder_cpu binary (default: build/release/bench/bench_decoder_cpu)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="wi_3072x768")
    ap.add_argument("--tokens", default="1,8", help="comma-separated token counts (1 = matvec)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of both sides")
    ap.add_argument("--calls", type=int, default=400, help="calls per repetition (Python)")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--experts", type=int, default=int(os.environ.get("QMOE_BENCH_EXPERTS", "64")))
    args = ap.parse_args()

    rows, cols = SHAPES[args.shape]
    print(f"# qmoe {qmoe.__version__}; shape {args.shape}, {args.experts} experts, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    pool = expert_pool(rows, cols, args.experts)
    print(f"# pool: {pool[0].bits_per_weight:.3f} bits per weight (qmoe-v1)")
    have_cxx = args.bench.is_file()
    if not have_cxx:
        print(f"# C++ benchmark {args.bench} not found: only the Python side is measured")

    rng = np.random.default_rng(1)
    print("# microseconds per call: median and minimum over the repetitions; the overhead compares minima,")
    print("# which are the least disturbed by other processes")
    print(f"{'call':<34} {'C++ med':>9} {'C++ min':>9} {'Py med':>9} {'Py min':>9} {'overhead':>9}")
    for n in [int(t) for t in args.tokens.split(",")]:
        if n == 1:
            x = rng.standard_normal(cols).astype(np.float32)

            def call(m, v):
                return m.matvec(v, threads=args.threads)
        else:
            x = rng.standard_normal((n, cols)).astype(np.float32)

            def call(m, v):
                return m.matmul(v, threads=args.threads)
        py_med, py_min = time_calls(call, pool, x, args.calls, args.repetitions)
        label = f"{'matvec' if n == 1 else 'matmul'} {args.shape} tokens:{n}"
        if have_cxx:
            c_med, c_min = cxx_time(args.bench, args.shape, n, args.threads, args.repetitions, args.experts)
            print(f"{label:<34} {c_med:>9.1f} {c_min:>9.1f} {py_med:>9.1f} {py_min:>9.1f} {py_min - c_min:>9.1f}")
        else:
            print(f"{label:<34} {'-':>9} {'-':>9} {py_med:>9.1f} {py_min:>9.1f} {'-':>9}")

    # Fixed cost: a 1 x 2 matrix, where the kernel itself takes a few nanoseconds.
    tiny = qmoe.encode(np.array([[2, 1]], np.uint8), np.array([[0xBF80, 0x3F80]], np.uint16))
    xt = np.ones(2, np.float32)
    med, mn = time_calls(lambda m, v: m.matvec(v, threads=1), [tiny], xt, 20000, args.repetitions)
    print(f"{'matvec 1x2 (fixed cost of a call)':<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
