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

With --torch (needs torch) the same calls also go through qmoe.torch: "torch f32" is a
CompressedLinear on a float32 CPU tensor (the module's forward, the zero-copy hand-over of the
tensor's memory, the output wrapped as a tensor), "torch bf16" the same on a bfloat16 tensor (plus
the widening to float32 in C++ and the cast of the output back to bfloat16); its overhead column
is the torch path's minimum minus the C++ kernel's. "layer" rows time one whole Switch expert
layer call at one token (CompressedSwitchExperts: 8 experts of wi_3072x768 + wo_768x3072, one of
them active) against the two C++ kernel calls it makes (wi's + wo's minima, the C++ benchmark's
pool also of 8 experts).

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
    ap.add_argument("--torch", action="store_true", help="also time the qmoe.torch path (needs torch)")
    args = ap.parse_args()
    torch_rows = []
    if args.torch:
        import torch

        import qmoe.torch as qt

        torch.set_num_threads(max(1, args.threads))

    rows, cols = SHAPES[args.shape]
    print(f"# qmoe {qmoe.__version__}; shape {args.shape}, {args.experts} experts, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    pool = expert_pool(rows, cols, args.experts)
    print(f"# pool: {pool[0].bits_per_weight:.3f} bits per weight (qmoe-v1)")
    if args.torch:
        tpool = [qt.CompressedLinear(m, threads=args.threads) for m in pool]
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
        c_med = c_min = None
        if have_cxx:
            c_med, c_min = cxx_time(args.bench, args.shape, n, args.threads, args.repetitions, args.experts)
            print(f"{label:<34} {c_med:>9.1f} {c_min:>9.1f} {py_med:>9.1f} {py_min:>9.1f} {py_min - c_min:>9.1f}")
        else:
            print(f"{label:<34} {'-':>9} {'-':>9} {py_med:>9.1f} {py_min:>9.1f} {'-':>9}")
        if args.torch:
            for dt in (torch.float32, torch.bfloat16):
                xt = torch.from_numpy(np.asarray(x)).to(dt)
                t_med, t_min = time_calls(lambda lin, v: lin(v), tpool, xt, args.calls, args.repetitions)
                tl = f"torch {'f32' if dt == torch.float32 else 'bf16'} {args.shape} tokens:{n}"
                over = f"{t_min - c_min:>9.1f}" if c_min is not None else f"{'-':>9}"
                cm = f"{c_med:>9.1f} {c_min:>9.1f}" if c_min is not None else f"{'-':>9} {'-':>9}"
                print(f"{tl:<34} {cm} {t_med:>9.1f} {t_min:>9.1f} {over}")

    if args.torch:
        # One Switch expert layer at one token: 8 experts, one active (as in generation).
        wi_pool = expert_pool(*SHAPES["wi_3072x768"], 8, seed=11)
        wo_pool = expert_pool(*SHAPES["wo_768x3072"], 8, seed=12)
        layers = [qt.CompressedSwitchExperts(wi_pool, wo_pool, threads=args.threads)]
        x1 = torch.from_numpy(rng.standard_normal((1, 768)).astype(np.float32))
        sel = torch.zeros((1, 1, 8), dtype=torch.int64)
        sel[0, 0, 3] = 1
        w = torch.full((1, 1), 0.7)
        l_med, l_min = time_calls(lambda layer, v: layer(v, sel, w), layers, x1, args.calls, args.repetitions)
        c = None
        if have_cxx:
            # A pool of 8 experts on both sides (the layer's 8 stay in cache as the C++ pool's do).
            wi_c = cxx_time(args.bench, "wi_3072x768", 1, args.threads, args.repetitions, 8)
            wo_c = cxx_time(args.bench, "wo_768x3072", 1, args.threads, args.repetitions, 8)
            c = (wi_c[0] + wo_c[0], wi_c[1] + wo_c[1])
        cm = f"{c[0]:>9.1f} {c[1]:>9.1f}" if c else f"{'-':>9} {'-':>9}"
        over = f"{l_min - c[1]:>9.1f}" if c else f"{'-':>9}"
        print(f"{'layer torch f32 8 experts tokens:1':<34} {cm} {l_med:>9.1f} {l_min:>9.1f} {over}")

    # Fixed cost: a 1 x 2 matrix, where the kernel itself takes a few nanoseconds.
    fixed_calls = 50 * args.calls
    tiny = qmoe.encode(np.array([[2, 1]], np.uint8), np.array([[0xBF80, 0x3F80]], np.uint16))
    xt = np.ones(2, np.float32)
    med, mn = time_calls(lambda m, v: m.matvec(v, threads=1), [tiny], xt, fixed_calls, args.repetitions)
    print(f"{'matvec 1x2 (fixed cost of a call)':<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
    if args.torch:
        # The same fixed costs through qmoe.torch, where the kernels do almost nothing: what the
        # torch path adds to a kernel call, free of the kernel's own run-to-run noise: a 2 x 768
        # matrix on one token of 768 features (numpy: matmul of a (1, 768) array).
        two = expert_pool(2, 768, 1, seed=13)
        x1 = rng.standard_normal((1, 768)).astype(np.float32)
        med, mn = time_calls(lambda m, v: m.matmul(v, threads=1), two, x1, fixed_calls, args.repetitions)
        print(f"{'matmul 2x768 tokens:1 (fixed cost)':<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
        lin = [qt.CompressedLinear(two[0], threads=1)]
        for dt in (torch.float32, torch.bfloat16):
            xt = torch.from_numpy(x1).to(dt)
            med, mn = time_calls(lambda l, v: l(v), lin, xt, fixed_calls, args.repetitions)
            tl = f"torch {'f32' if dt == torch.float32 else 'bf16'} 2x768 tokens:1 (fixed)"
            print(f"{tl:<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
        # A layer of 8 experts of d_model = d_ff = 2 (both kernels almost free), one token on
        # expert 5: through qmoe.CompressedExperts on numpy arrays, then through qmoe.torch.
        small = qt.CompressedSwitchExperts(expert_pool(2, 2, 8, seed=14), expert_pool(2, 2, 8, seed=15), threads=1)
        x2 = rng.standard_normal((1, 2)).astype(np.float32)
        sel = torch.zeros((1, 1, 8), dtype=torch.int64)
        sel[0, 0, 5] = 1
        w = torch.full((1, 1), 0.7)
        med, mn = time_calls(lambda l, v: l.forward(v, sel.numpy(), w.numpy(), threads=1), [small.layer], x2, fixed_calls,
                             args.repetitions)
        print(f"{'layer numpy 8x(2x2) (fixed cost)':<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
        for dt in (torch.float32, torch.bfloat16):
            xt = torch.from_numpy(x2).to(dt)
            wt = w.to(dt)
            med, mn = time_calls(lambda l, v: l(v, sel, wt), [small], xt, fixed_calls, args.repetitions)
            tl = f"layer torch {'f32' if dt == torch.float32 else 'bf16'} 8x(2x2) (fixed)"
            print(f"{tl:<34} {'-':>9} {'-':>9} {med:>9.2f} {mn:>9.2f} {'-':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
