#!/usr/bin/env python3
"""Projects the wall time of compressing switch-c-2048 with `qmoe compress --calib-tokens` on one
machine (or, with --machines, on several under mpirun), from per-phase rates measured by
bench_compress on this kind of CPU.

    build/release/bench/bench_compress --benchmark_filter='DenseGemm|C2048Block' \
        --benchmark_out=c2048.json
    tools/c2048_budget.py c2048.json [--cores 64] [--machines 1] [--samples 10000] ...

The model (switch-c-2048's published config): 15 encoder + 15 decoder blocks, every block sparse
with 2,048 experts, d_model 2080, d_ff 6144, 30 heads of 64, vocabulary 32,128; 1.57 T expert
weights in 122,880 matrices, 3.2 TB of bf16 checkpoint.

The calibration set (QMoE's recipe): --samples C4 documents (10,000; QMoE's README uses 10,000
for switch-base-128), span-corrupted, each at most 512 encoder tokens after masking (its loader
keeps documents of at most 568 tokens); we assume every sample at that maximum, --encoder-length
512 and --decoder-length 114 (15% noise in spans of mean length 3: 77 target tokens plus one
sentinel per span, 26, plus the end marker), an upper bound of the work.

Work per phase (floating-point operations, the formulas the C++ code counts):
  forward   per block: 8 n d h (q, k, v, o) + 4 h sum(l^2) (scores, context) [+ cross-attention
            in the decoder: 4 n d h + 4 n_enc d h + 4 h sum(l l_enc)] + 2 n d E (router),
            h = heads x d_kv, for every block of both stacks
  outputs   per block: 4 n d d_ff, each token through its expert after compression (the
            compressed expert: dense-equivalent work, at the rate measured for it)
  hessians  per expert matrix: the upper 256 x 256 tiles of X^T X over its tokens
            (hessian_flops(dim, n)), plus ReLU(wi x) for wo: 2 n d d_ff; n = tokens / experts
  gptq      per expert matrix: gptq_flops(rows, cols, 128) (Cholesky n^3/3, in-block feedback,
            lazy block products)
  encode, write: per matrix, thread-seconds measured on the c-2048-shaped block
Time of a phase = work / (measured per-thread rate x cores x machines x efficiency); reading the
checkpoint = 3.2 TB / (--read-gbps x machines) (each process reads the non-expert weights and
the experts it owns), work files = 160 GB / (--write-gbps x machines), assembling the sharded
container (each machine reads back the work files of its shards and writes them) =
160 GB / (--read-gbps x machines) + 160 GB / (--write-gbps x machines), or with --single-file
(process 0 alone) 160 GB / --read-gbps + 160 GB / --write-gbps; with --machines > 1, the expert inputs and outputs each token sends to
its expert's owner: 2 x 4 d bytes per token per sparse block, at --network-gbps per machine.
"""
import argparse
import json
import math
import sys

# switch-c-2048
BLOCKS = 15
EXPERTS = 2048
D_MODEL = 2080
D_FF = 6144
HEADS = 30
D_KV = 64
CHECKPOINT_BYTES = 3.2e12
OUTPUT_BYTES = 160e9


def hessian_flops(dim, n, tile=256):
    """HessianAccumulator::add(): the upper tiles of the 256 x 256 tiling."""
    f = 0.0
    for i in range(0, dim, tile):
        for j in range(i, dim, tile):
            f += 2.0 * n * min(tile, dim - i) * min(tile, dim - j)
    return f


def gptq_flops(rows, cols, bs=128):
    """gptq_flops() of gptq/gptq.h."""
    f = cols ** 3 / 3.0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        b = i2 - i1
        f += rows * b * (b - 1) + 2.0 * rows * b * (cols - i2)
    return f


def block_flops(n, lens, decoder=False, n_enc=0, enc_lens=None):
    """block_forward_flops() of switch/forward.h, for sequences of lengths `lens`."""
    inner = HEADS * D_KV
    f = 8.0 * n * D_MODEL * inner + 4.0 * inner * sum(l * l for l in lens)
    if decoder:
        f += 4.0 * n * D_MODEL * inner + 4.0 * n_enc * D_MODEL * inner
        f += 4.0 * inner * sum(a * b for a, b in zip(lens, enc_lens))
    f += 2.0 * n * D_MODEL * EXPERTS  # the router; the experts are under "outputs"
    return f


def measured(path, threads):
    """Per-phase rates of BM_C2048Block and the GEMM rate at `threads` from a bench JSON."""
    with open(path) as f:
        data = json.load(f)
    block = gemm = None
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        if b["name"].startswith("BM_C2048Block/threads:%d" % threads):
            block = b
        if b["name"].startswith("BM_DenseGemm/threads:%d" % threads):
            gemm = b
    if block is None:
        sys.exit("%s: no BM_C2048Block/threads:%d result" % (path, threads))
    return block, gemm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", help="bench_compress --benchmark_out file")
    ap.add_argument("--threads", type=int, default=1,
                    help="which measured thread count gives the per-thread rates (default 1)")
    ap.add_argument("--cores", type=int, default=64, help="cores per machine (default 64)")
    ap.add_argument("--machines", type=int, default=1, help="machines under mpirun (default 1)")
    ap.add_argument("--efficiency", type=float, default=1.0,
                    help="parallel efficiency of the phases across cores and machines (default "
                         "1.0: the measured per-thread rate on every core)")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--encoder-length", type=int, default=512)
    ap.add_argument("--decoder-length", type=int, default=114)
    ap.add_argument("--read-gbps", type=float, default=2.0,
                    help="checkpoint read rate per machine, GB/s (default 2: one NVMe)")
    ap.add_argument("--write-gbps", type=float, default=1.0, help="write rate per machine, GB/s")
    ap.add_argument("--single-file", action="store_true",
                    help="one container file, written by process 0 alone (default: sharded, "
                         "each machine writing its shards)")
    ap.add_argument("--network-gbps", type=float, default=25.0,
                    help="network bandwidth per machine, GB/s (with --machines > 1)")
    a = ap.parse_args()

    block, gemm = measured(a.bench_json, a.threads)
    threads = a.threads
    # Rates per thread: the benchmark's phase GFLOP/s over its thread count.
    rate = {p: block.get(p + "_GFLOP/s", 0.0) * 1e9 / threads
            for p in ("forward", "hessians", "gptq", "outputs")}
    if not rate["outputs"]:
        sys.exit("%s: no outputs_GFLOP/s (a bench_compress from before the outputs phase)"
                 % a.bench_json)
    per_matrix = {p: block[p + "_s"] * threads / block["matrices"] for p in ("encode", "write", "load")}

    n_enc = a.samples * a.encoder_length
    n_dec = a.samples * a.decoder_length
    enc_lens = [a.encoder_length] * a.samples
    dec_lens = [a.decoder_length] * a.samples
    work = {
        "forward": BLOCKS * block_flops(n_enc, enc_lens)
        + BLOCKS * block_flops(n_dec, dec_lens, True, n_enc, enc_lens),
        "hessians": 0.0,
        "gptq": BLOCKS * 2 * EXPERTS * (gptq_flops(D_FF, D_MODEL) + gptq_flops(D_MODEL, D_FF)),
        # Every token through its (compressed) expert, dense-equivalent work.
        "outputs": BLOCKS * 4.0 * (n_enc + n_dec) * D_MODEL * D_FF,
    }
    for n in (n_enc, n_dec):
        per = n / EXPERTS
        work["hessians"] += BLOCKS * EXPERTS * (
            hessian_flops(D_MODEL, per) + hessian_flops(D_FF, per) + 2.0 * per * D_MODEL * D_FF)
    workers = a.cores * a.machines * a.efficiency
    matrices = BLOCKS * 2 * EXPERTS * 2
    rows = []
    total = 0.0
    for p in ("forward", "hessians", "gptq", "outputs"):
        t = work[p] / (rate[p] * workers)
        rows.append((p, work[p], rate[p] * 1e-9, t))
        total += t
    for p in ("load", "encode", "write"):
        t = per_matrix[p] * matrices / workers
        rows.append((p, 0.0, 0.0, t))
        total += t
    read = CHECKPOINT_BYTES / (a.read_gbps * 1e9 * a.machines)
    # Work files: each process writes the matrices it owns. The container: sharded, shard k is
    # written by process k mod R, which reads back the work files it holds; a single file is
    # written by process 0 alone, on one machine whatever the machine count.
    work_files = OUTPUT_BYTES / (a.write_gbps * 1e9 * a.machines)
    writers = 1 if a.single_file else a.machines
    assemble = OUTPUT_BYTES / (a.read_gbps * 1e9 * writers) + OUTPUT_BYTES / (a.write_gbps * 1e9 * writers)
    rows.append(("read 3.2 TB", 0.0, 0.0, read))
    rows.append(("work files", 0.0, 0.0, work_files))
    rows.append(("assemble", 0.0, 0.0, assemble))
    total += read + work_files + assemble
    if a.machines > 1:
        # Each token's expert input goes to the expert's owner and its output comes back, at every
        # sparse block; (R - 1) / R of the tokens cross the network. Per machine: its share.
        exch = 2 * 4 * D_MODEL * (n_enc + n_dec) * BLOCKS * (a.machines - 1) / a.machines
        t = exch / a.machines / (a.network_gbps * 1e9)
        rows.append(("exchange", exch, 0.0, t))
        total += t

    gemm_rate = gemm["gemm_GFLOP/s"] if gemm else float("nan")
    print("switch-c-2048: %d + %d blocks x %d experts, %d x %d; calibration %d samples of %d + %d "
          "tokens (%.2f M + %.2f M tokens, %.0f per expert per encoder block)"
          % (BLOCKS, BLOCKS, EXPERTS, D_MODEL, D_FF, a.samples, a.encoder_length,
             a.decoder_length, n_enc / 1e6, n_dec / 1e6, n_enc / EXPERTS))
    print("measured (%s, %d thread%s): forward %.1f, Hessians %.1f, GPTQ %.1f, expert outputs %.1f"
          " (dense-equivalent) GFLOP/s per thread; dense GEMM %.1f GFLOP/s per thread"
          % (a.bench_json, threads, "" if threads == 1 else "s", rate["forward"] * 1e-9,
             rate["hessians"] * 1e-9, rate["gptq"] * 1e-9, rate["outputs"] * 1e-9,
             gemm_rate / threads))
    print("machine: %d x %d cores, efficiency %.2f, read %.1f GB/s, write %.1f GB/s%s"
          % (a.machines, a.cores, a.efficiency, a.read_gbps, a.write_gbps,
             ", network %.0f GB/s" % a.network_gbps if a.machines > 1 else ""))
    print("%-12s %14s %16s %12s" % ("phase", "work (PFLOP)", "GFLOP/s/thread", "hours"))
    for name, w, r, t in rows:
        print("%-12s %14s %16s %12.2f" % (name, "%.2f" % (w * 1e-15) if w and name != "exchange"
                                          else ("%.1f TB" % (w * 1e-12) if name == "exchange" else ""),
                                          "%.1f" % r if r else "", t / 3600))
    print("%-12s %14.2f %16s %12.2f" % ("total", sum(w for n, w, _, _ in rows if n != "exchange")
                                        * 1e-15, "", total / 3600))


if __name__ == "__main__":
    main()
