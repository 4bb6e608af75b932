#!/usr/bin/env python3
"""The accuracy experiment of tools/switch_accuracy/RESULTS.md, end to end:

    python3 tools/switch_accuracy/run_experiment.py --qmoe build/release/cli/qmoe \\
        --train-python ~/.cache/qmoe/train-venv/bin/python

1. trains the model (train_switch.py, with --train-python) unless WORK/model exists;
2. compresses its experts with every method, calibration seed and target size (`qmoe compress`,
   one container each, WORK/runs/) and reads each container's size (`qmoe inspect --json`);
3. evaluates the original model and every container on the held-out splits (`qmoe eval`);
4. writes WORK/results.json, the table of RESULTS.md (OUT/results.md) and the plot
   (OUT/accuracy.png, with plot_results.py), OUT being this folder by default.

Every run's result is kept in WORK/results/ and not redone, so an interrupted experiment continues
where it stopped. Methods (all on the expert matrices only; capacity unlimited, as in training):
  rtn        QMoE's round to nearest (levels min/max of the row, nearest level), its own size
             (codec auto: the smaller of qmoe-v1 and qmoe-p5, as QMoE)
  rtn@B      the same rounding rule with its zero threshold raised until the mean size is B
  qmoe       QMoE's recipe: GPTQ (percdamp 0.1, blocks of 128, no act-order) on the levels
             min/max fixed before it, sequential calibration, its own size (codec auto)
  qmoe@B     QMoE's recipe with its zero threshold raised until the mean size is B
  refit, refit@B
             qmoe --recipe refit: QMoE's recipe, then one more round of GPTQ after a closed-form
             refit of each row's two levels (the better round kept), at its own size / at B
  rd@B       qmoe --recipe rd: fitted levels, 4 rounds of GPTQ + level refit, act-order, zeros
             chosen by the rate-distortion penalty, which is searched until the mean size is B
  (--ablation adds 4 rounds of GPTQ + level refit (refit4) at its own size, and at the first
  target the steps from qmoe@B to rd@B: refit4, + fitted levels; the penalty as the knob,
  + 4 refit rounds, + fitted levels.)
Sizes are bits per expert weight with codes, row offsets and levels counted (--rate-scope all:
the mean over the expert matrices is B; each matrix spends the same bits on codes). At a target
size every method uses --codec (qmoe-v2 by default: qmoe-v1's codewords cover at most 28 symbols,
so a 256-wide row cannot go below 0.875 bits per weight in qmoe-v1); the qmoe-v2 dictionaries
(256 KiB each, shared by the matrices of similar sparsity, as qmoe-v1's one dictionary is) are
not in bits per expert weight, and results.json records their number.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def sh(cmd, log):
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + r.stdout + "\n")
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}")
    return r.stdout, time.time() - t0


def methods(targets, ablation, codec):
    """(name, flags needing calibration?, extra flags) of every compression."""
    out = [("rtn", False, ["--rtn"]), ("qmoe", True, []), ("refit", True, ["--recipe", "refit"])]
    if ablation:
        out.append(("refit4", True, ["--refit", "4"]))
    for b in targets:
        rate = ["--target-bits", str(b), "--rate-scope", "all", "--codec", codec]
        out.append((f"rtn@{b}", False, ["--rtn"] + rate))
        # (QMoE's recipe named: the default recipe of GPTQ at a size is refit)
        out.append((f"qmoe@{b}", True, ["--recipe", "qmoe"] + rate))
        out.append((f"refit@{b}", True, ["--recipe", "refit"] + rate))
        out.append((f"rd@{b}", True, ["--recipe", "rd"] + rate))
    if ablation:
        b = targets[0]
        rate = ["--recipe", "qmoe", "--target-bits", str(b), "--rate-scope", "all", "--codec", codec]
        out.append((f"refit4@{b}", True, rate + ["--refit", "4"]))
        out.append((f"refit4+fit@{b}", True, rate + ["--refit", "4", "--levels", "fit"]))
        out.append((f"penalty@{b}", True, rate + ["--rate-knob", "penalty"]))
        out.append((f"penalty+refit4@{b}", True, rate + ["--rate-knob", "penalty", "--refit", "4"]))
        out.append((f"penalty+refit4+fit@{b}", True,
                    rate + ["--rate-knob", "penalty", "--refit", "4", "--levels", "fit"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qmoe", default="build/release/cli/qmoe")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/qmoe/switch_accuracy"))
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--train-python", default=os.environ.get("PYTHON", sys.executable),
                    help="interpreter with torch and transformers, to train the model")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="training steps when the model is trained here (train_switch.py --steps; "
                         "default: its own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration sets")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3], help="held-out splits")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.7, 0.6],
                    help="sizes in bits per expert weight; the ablation runs at the first")
    ap.add_argument("--codec", default="qmoe-v2", help="codec of the runs at a target size")
    ap.add_argument("--ablation", action="store_true")
    args = ap.parse_args()
    work = args.work
    model = os.path.join(work, "model")
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    os.makedirs(os.path.join(work, "results"), exist_ok=True)
    log = os.path.join(work, "experiment.log")
    if not os.path.exists(os.path.join(model, "config.json")):
        steps = [] if args.train_steps is None else ["--steps", str(args.train_steps)]
        sh([args.train_python, os.path.join(HERE, "train_switch.py"), "--out", work] + steps, log)
    threads = ["--threads", str(args.threads)]

    def evaluate(path):
        losses = []
        for k in args.splits:
            out, _ = sh([args.qmoe, "eval", path, "--tokens", os.path.join(work, f"eval{k}.safetensors")]
                        + threads, log)
            losses.append(float(re.search(r"^loss\s+([0-9.]+)", out, re.M).group(1)))
        return losses

    def cached(name, fn):
        path = os.path.join(work, "results", name.replace("/", "_") + ".json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        r = fn()
        with open(path + ".tmp", "w") as f:
            json.dump(r, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"{name}: {r.get('bits', 32):.4f} bits, losses {[round(x, 4) for x in r['losses']]}",
              flush=True)
        return r

    results = {"original": cached("original", lambda: {"bits": 32.0, "losses": evaluate(model)})}
    for name, calib, flags in methods(args.targets, args.ablation, args.codec):
        for seed in (args.seeds if calib else [None]):
            key = name if seed is None else f"{name}/seed{seed}"

            def run(flags=flags, seed=seed, key=key):
                out = os.path.join(work, "runs", key.replace("/", "_") + ".qmoe")
                cal = ["--calib-tokens", os.path.join(work, f"calib{seed}.safetensors")] if seed is not None else []
                _, secs = sh([args.qmoe, "compress", model, "-o", out] + cal + flags + threads, log)
                info = json.loads(sh([args.qmoe, "inspect", out, "--json"], log)[0])
                bits = [t["bits_per_weight"] for t in info["tensors"] if "bits_per_weight" in t]
                zeros = [b["zero_fraction"] for b in info["blocks"] if "zero_fraction" in b]
                tot = info["totals"]
                r = {"bits": tot["bits_per_expert_weight"], "min_matrix_bits": min(bits),
                     "v2_dictionaries": tot["qmoe_v2_dictionaries"],
                     "bits_with_dictionaries": tot["bits_per_weight"],
                     "max_matrix_bits": max(bits), "zero_fraction": statistics.mean(zeros),
                     "compress_seconds": secs, "flags": cal + flags, "losses": evaluate(out)}
                os.remove(out)
                return r

            results[key] = cached(key, run)

    with open(os.path.join(work, "data.json")) as f:
        results["model"] = json.load(f)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    subprocess.run([sys.executable, os.path.join(HERE, "plot_results.py"), os.path.join(args.out, "results.json"),
                    "--png", os.path.join(args.out, "accuracy.png"), "--table", os.path.join(args.out, "results.md")],
                   check=True)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
