#!/usr/bin/env python3
"""Prints the table of scripts/gpu-check.sh from a bench_decoder_cuda JSON file.

    scripts/gpu_table.py BENCH.json [--peak-gbps GBPS]

BENCH.json is Google Benchmark's JSON output of bench_decoder_cuda (--benchmark_out=...,
--benchmark_out_format=json), ideally with --benchmark_repetitions=N: each time is then the median
of the N repetitions, and "spread" is (max - min) / median over them. Per expert shape and token
count: microseconds per call (GPU time, CUDA events), GB/s of the weights read (the compressed
bytes: codes, offsets and levels; 2 bytes per weight for dense bf16) and that rate as a percentage
of the GPU's peak DRAM bandwidth, for the fused qmoe-v1 and qmoe-v2 kernels, the decode-to-dense +
cuBLAS path and dense bf16 cuBLAS; then the grouped 128-expert layer. The peak bandwidth comes from
the run's context (gpu_peak_memory_GBps: 2 x memory clock x bus width), or from --peak-gbps.
Standard library only.
"""
import argparse
import json
import re
import statistics
import sys

TIME_SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}  # to microseconds

# bench_decoder_cuda's families, in table order: (name prefix, column title, has bandwidth columns)
SHAPE_FAMILIES = [
    ("qmoe_fused", "qmoe-v1 fused", True),
    ("qmoe_v2_fused", "qmoe-v2 fused", True),
    ("qmoe_dense_gemm", "v1 decode+cuBLAS", False),
    ("dense_bf16", "dense bf16 cuBLAS", True),
]
GROUPED_FAMILIES = [("grouped128/qmoe_fused", "qmoe-v1 fused"), ("grouped128/dense_bf16", "dense bf16")]


class Run:
    """The repetitions of one benchmark: median time (us) and rate (bytes/s), spread."""

    def __init__(self):
        self.times = []
        self.rates = []
        self.median_time = None
        self.median_rate = None

    def add(self, entry):
        us = entry["real_time"] * TIME_SCALE[entry.get("time_unit", "ns")]
        if entry.get("run_type") == "aggregate":
            if entry.get("aggregate_name") == "median":
                self.median_time = us
                self.median_rate = entry.get("bytes/s")
        elif "error_occurred" not in entry or not entry["error_occurred"]:
            self.times.append(us)
            self.rates.append(entry.get("bytes/s"))

    def time(self):
        return statistics.median(self.times) if self.times else self.median_time

    def rate(self):
        rates = [r for r in self.rates if r is not None]
        return statistics.median(rates) if rates else self.median_rate

    def spread(self):
        if len(self.times) < 2:
            return None
        return (max(self.times) - min(self.times)) / statistics.median(self.times)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"gpu_table: {path}: cannot read a benchmark JSON file: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        sys.exit(f"gpu_table: {path}: no 'benchmarks' list (not Google Benchmark JSON output)")
    runs = {}
    for entry in data["benchmarks"]:
        name = entry.get("run_name") or entry.get("name", "")
        name = re.sub(r"/(manual_time|real_time)$", "", name)
        runs.setdefault(name, Run()).add(entry)
    return data.get("context", {}), runs


def fmt(value, spec, width):
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def cells(run, peak, bandwidth):
    """'us GB/s %peak' cells of one run (or dashes), and its time."""
    t = run.time() if run else None
    out = [fmt(t, ".1f", 8)]
    if bandwidth:
        rate = run.rate() if run else None
        gbs = rate / 1e9 if rate is not None else None
        pct = 100.0 * gbs / peak if gbs is not None and peak else None
        out += [fmt(gbs, ".0f", 6), fmt(pct, ".1f", 5)]
    return " ".join(out), t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="bench_decoder_cuda --benchmark_out JSON")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="the GPU's peak DRAM bandwidth in GB/s (default: from the run's context)")
    args = ap.parse_args(argv)
    context, runs = load(args.json)
    peak = args.peak_gbps
    if peak is None and context.get("gpu_peak_memory_GBps"):
        peak = float(context["gpu_peak_memory_GBps"])
    gpu = context.get("gpu_name", "unknown GPU")
    cc = context.get("gpu_compute_capability")
    reps = max((len(r.times) for r in runs.values()), default=0)
    print(f"GPU: {gpu}" + (f" (compute capability {cc})" if cc else "") +
          (f", peak DRAM bandwidth {peak:.0f} GB/s" if peak else ", peak DRAM bandwidth unknown"))
    print(f"us: GPU time per call, median of {reps} repetition(s) (CUDA events, weights streamed "
          "from a 256 MB pool); GB/s: weights read (qmoe: compressed bytes; dense: bf16); "
          "%peak: of the peak DRAM bandwidth; spread: (max - min) / median of the fastest qmoe")
    print()

    shapes = []
    for name in runs:
        m = re.fullmatch(r"([a-z0-9_]+)/(\d+x\d+)/(\d+)", name)
        if m and (m.group(2), int(m.group(3))) not in shapes:
            shapes.append((m.group(2), int(m.group(3))))
    if not shapes and not any(n.startswith("grouped128/") for n in runs):
        sys.exit(f"gpu_table: {args.json}: no bench_decoder_cuda results in it")
    # (in the order of the file: bench_decoder_cuda registers the shapes by size)

    def column(title, bw):
        return max(len(title), 21 if bw else 8)

    cols = [(title, column(title, bw)) for _, title, bw in SHAPE_FAMILIES]
    head1 = f"{'shape (rows x cols)':<19} {'tokens':>6} | " + " | ".join(
        f"{t:^{w}}" for t, w in cols) + " | fastest qmoe"
    head2 = f"{'':<19} {'':>6} | " + " | ".join(
        (f"{'us':>8} {'GB/s':>6} {'%peak':>5}" if bw else f"{'us':>8}").rjust(w)
        for (_, w), (_, _, bw) in zip(cols, SHAPE_FAMILIES)) + " | vs bf16  spread"
    print(head1)
    print(head2)
    print("-" * len(head2))
    for dims, tokens in shapes:
        row = []
        times = {}
        for (family, _, bw), (_, w) in zip(SHAPE_FAMILIES, cols):
            text, t = cells(runs.get(f"{family}/{dims}/{tokens}"), peak, bw)
            row.append(text.rjust(w))
            times[family] = t
        qmoe = [(times[f], f) for f, _, _ in SHAPE_FAMILIES if f != "dense_bf16" and times[f]]
        best = min(qmoe) if qmoe else None
        speed = f"{times['dense_bf16'] / best[0]:6.2f}x" if best and times["dense_bf16"] else f"{'-':>7}"
        spread = runs[f"{best[1]}/{dims}/{tokens}"].spread() if best else None
        spread_text = f"{100 * spread:5.1f}%" if spread is not None else f"{'-':>6}"
        print(f"{dims:<19} {tokens:>6} | " + " | ".join(row) + f" | {speed}  {spread_text}")

    grouped = sorted({tuple(map(int, m.groups())) for n in runs
                      if (m := re.fullmatch(r"grouped128/[a-z0-9_]+/tokens:(\d+)/skewed:(\d+)", n))})
    if grouped:
        print()
        print("grouped MoE layer: 128 experts of 3072x768, top-1 routing (skewed: half the tokens "
              "to one expert); GB/s over the active experts' weights")
        gh1 = f"{'tokens':>6} {'skewed':>6} | " + " | ".join(
            f"{t:^21}" for _, t in GROUPED_FAMILIES) + " | qmoe vs bf16"
        print(gh1)
        print(f"{'':>6} {'':>6} | " + " | ".join(f"{'us':>8} {'GB/s':>6} {'%peak':>5}"
                                                 for _ in GROUPED_FAMILIES) + " |")
        print("-" * len(gh1))
        for tokens, skewed in grouped:
            row, times = [], []
            for family, _ in GROUPED_FAMILIES:
                text, t = cells(runs.get(f"{family}/tokens:{tokens}/skewed:{skewed}"), peak, True)
                row.append(text)
                times.append(t)
            speed = f"{times[1] / times[0]:6.2f}x" if all(times) else f"{'-':>7}"
            print(f"{tokens:>6} {('yes' if skewed else 'no'):>6} | " + " | ".join(row) + f" | {speed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
