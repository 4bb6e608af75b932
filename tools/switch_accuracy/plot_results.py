#!/usr/bin/env python3
"""The plot and the table of the accuracy experiment, from the results.json that
run_experiment.py writes:

    python3 tools/switch_accuracy/plot_results.py tools/switch_accuracy/results.json \\
        --png tools/switch_accuracy/accuracy.png --table tools/switch_accuracy/results.md

Loss: the mean over held-out splits of qmoe eval's mean cross-entropy per target byte. Error bars
and +-: the standard deviation over calibration seeds of that mean (methods without calibration
have none). "removed": the fraction of round to nearest's loss increase (at the same size) that a
method removes, 1 - (L - L_orig) / (L_rtn - L_orig), per seed and split, mean +- standard
deviation over the seed x split pairs. "better than qmoe@B by": the paired difference of the
loss from QMoE's recipe at the same size, per seed and split.
"""
import argparse
import json
import statistics as st

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def group(results):
    """{method: {seed or None: result}}"""
    out = {}
    for key, r in results.items():
        name, _, seed = key.partition("/seed")
        out.setdefault(name, {})[int(seed) if seed else None] = r
    return out


def sd(xs):
    return st.stdev(xs) if len(xs) > 1 else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--png", required=True)
    ap.add_argument("--table", required=True)
    args = ap.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    model = results.pop("model", {})
    g = group(results)
    orig = g["original"][None]["losses"]

    def summary(name):
        runs = g[name]
        per_seed = [st.mean(r["losses"]) for r in runs.values()]
        return {"bits": st.mean(r["bits"] for r in runs.values()),
                "min_bits": min(r.get("min_matrix_bits", r["bits"]) for r in runs.values()),
                "max_bits": max(r.get("max_matrix_bits", r["bits"]) for r in runs.values()),
                "zeros": st.mean(r.get("zero_fraction", 0) for r in runs.values()),
                "loss": st.mean(per_seed), "sd": sd(per_seed), "runs": runs}

    def removed(name, base):
        """Fractions of base's loss increase that name removes, per seed and split."""
        b = g[base][None]["losses"]
        return [1 - (x - o) / (y - o) for r in g[name].values() for x, y, o in zip(r["losses"], b, orig)]

    def diff(name, other):
        """Paired loss differences other - name, per seed and split."""
        return [y - x for s, r in g[name].items() for x, y in zip(r["losses"], g[other][s]["losses"])]

    targets = sorted({float(n.split("@")[1]) for n in g if n.startswith("rd@")})
    rows = ["| method | bits / expert weight (matrices) | zeros | eval loss | Δ vs original | "
            "removed of rtn@B's increase | removed of rtn's increase | better than qmoe@B by |",
            "|---|---|---|---|---|---|---|---|"]

    def row(name, base_same):
        s = summary(name)
        fr = removed(name, base_same) if base_same and name != base_same else None
        fr0 = removed(name, "rtn") if name not in ("rtn",) else None
        cells = [f"`{name}`", f"{s['bits']:.4f} ({s['min_bits']:.3f}–{s['max_bits']:.3f})",
                 f"{s['zeros']:.3f}", f"{s['loss']:.4f}" + (f" ± {s['sd']:.4f}" if s["sd"] else ""),
                 f"{s['loss'] - st.mean(orig):+.4f}",
                 f"{st.mean(fr):.1%} ± {sd(fr):.1%}" if fr else "—",
                 f"{st.mean(fr0):.1%} ± {sd(fr0):.1%}" if fr0 else "—"]
        at = name.partition("@")[2]
        if at and not name.startswith(("rtn@", "qmoe@")) and f"qmoe@{at}" in g:
            d = diff(name, f"qmoe@{at}")
            cells.append(f"{st.mean(d):+.4f} ± {sd(d):.4f} (min {min(d):+.4f}, {len(d)} pairs)")
        else:
            cells.append("")
        rows.append("| " + " | ".join(cells) + " |")

    rows.append(f"| `original` | 32 | — | {st.mean(orig):.4f} | — | — | — | |")
    main = ("rtn", "qmoe", "refit", "rd")
    for n in main + tuple(sorted(n for n in g if "@" not in n and n not in main + ("original",))):
        if n in g:
            row(n, None)
    for b in targets:
        for m in (f"{p}@{b}" for p in main):
            if m in g:
                row(m, f"rtn@{b}" if m != f"rtn@{b}" else None)
    for n in sorted(g):
        if "@" in n and n.split("@")[0] not in main:
            row(n, f"rtn@{n.split('@')[1]}")
    splits = "; ".join(f"{x:.4f}" for x in orig)
    rows.append("")
    rows.append(f"Original loss per held-out split: {splits}.")
    with open(args.table, "w") as f:
        f.write("\n".join(rows) + "\n")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(st.mean(orig), color="k", ls="--", lw=1, label=f"original (float32): {st.mean(orig):.3f}")
    styles = [("rtn", "round to nearest", "tab:gray", "s"), ("qmoe", "QMoE's recipe (GPTQ)", "tab:blue", "o"),
              ("refit", "qmoe --recipe refit", "tab:green", "^"), ("rd", "qmoe --recipe rd", "tab:red", "D")]
    for prefix, label, color, marker in styles:
        pts = [summary(f"{prefix}@{b}") for b in targets if f"{prefix}@{b}" in g]
        if not pts:
            continue
        ax.errorbar([p["bits"] for p in pts], [p["loss"] for p in pts], yerr=[p["sd"] for p in pts],
                    color=color, marker=marker, capsize=3, label=label + " at a target size")
        if prefix in g:
            p = summary(prefix)
            ax.errorbar([p["bits"]], [p["loss"]], yerr=[p["sd"]], color=color, marker=marker, mfc="white",
                        capsize=3, ls="none", label=label + ", its own size")
    ax.set_xlabel("bits per expert weight (codes, row offsets and levels)")
    ax.set_ylabel("held-out loss (nats per target byte)")
    params = model.get("parameters")
    title = "Ternary experts of a Switch model"
    if params:
        title += (f" ({params / 1e6:.1f}M parameters, {model['expert_parameters'] / params:.0%} in experts,"
                  f" {model['steps']} steps)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
