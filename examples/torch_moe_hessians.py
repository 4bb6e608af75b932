#!/usr/bin/env python3
"""Collect Hessians from a small PyTorch MoE with forward hooks, then compress its experts.

A toy Switch-style MoE layer (a router and top-1 routed experts, each wi: d_model -> d_ff, ReLU,
wo: d_ff -> d_model) runs on calibration batches. A forward hook on every expert Linear feeds
the inputs that expert actually received into a qmoe.HessianAccumulator (capped per expert as
QMoE does). Each expert weight is then compressed with GPTQ from its Hessian (round-to-nearest
for an expert that saw no token), the result is saved as a qmoe container together with the
Hessian file, and the layer is re-run with the compressed experts (qmoe's CPU kernels) to
compare its output with the original.

    python examples/torch_moe_hessians.py [--out moe.safetensors]

Needs PyTorch (pip install torch); without it the script says so and exits successfully.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

import qmoe

try:
    import torch
    from torch import nn
except ImportError:
    torch = None


def build_model(d_model, d_ff, experts):
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.wi = nn.Linear(d_model, d_ff, bias=False)
            self.wo = nn.Linear(d_ff, d_model, bias=False)

        def forward(self, x):
            return self.wo(torch.relu(self.wi(x)))

    class SwitchMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(d_model, experts, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(experts))

        def route(self, x):
            probs = torch.softmax(self.router(x), dim=-1)
            p, idx = probs.max(dim=-1)
            return p, idx

        def forward(self, x):  # x: (tokens, d_model)
            p, idx = self.route(x)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                sel = idx == e
                if sel.any():
                    out[sel] = p[sel].unsqueeze(-1) * expert(x[sel])
            return out

    return SwitchMoE()


def calibration_batches(batches, tokens, d_model, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, d_model, generator=g)
    for _ in range(batches):
        z = torch.randn(tokens, 16, generator=g)
        yield z @ basis / 4 + 0.1 * torch.randn(tokens, d_model, generator=g)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per calibration batch")
    ap.add_argument("--out", default=None, help="container to write (default: a temporary directory)")
    args = ap.parse_args()

    if torch is None:
        print("PyTorch is not installed; skipping this example (pip install torch to run it).")
        return 0

    torch.manual_seed(0)
    model = build_model(args.d_model, args.d_ff, args.experts).eval()

    # One accumulator per expert Linear, capped like QMoE: 4x the tokens an expert gets on average.
    cap = qmoe.expert_token_cap(args.batches * args.tokens, args.experts)
    accs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".experts." in f".{name}":
            acc = qmoe.HessianAccumulator(module.in_features, token_cap=cap)
            accs[name] = acc  # Hessian files name an accumulator after its weight, without ".weight"

            def hook(mod, inputs, output, acc=acc):
                x = inputs[0].detach()
                # float32 on the CPU as numpy: a view, not a copy, when it already is.
                acc.add(x.reshape(-1, x.shape[-1]).float().cpu().numpy())

            handles.append(module.register_forward_hook(hook))

    with torch.no_grad():
        for batch in calibration_batches(args.batches, args.tokens, args.d_model, seed=1):
            model(batch)
    for h in handles:
        h.remove()

    compressed, rtn = {}, {}
    print(f"{'tensor':<22} {'tokens':>7} {'method':>7} {'codec':>8} {'bits/w':>7}")
    for name, module in model.named_modules():
        if name not in accs:
            continue
        acc = accs[name]
        w = module.weight.detach().float().numpy()  # (out, in): y = W x
        m, stats = qmoe.compress_matrix(w, acc.hessian(), with_stats=True)
        compressed[name + ".weight"] = m
        rtn[name + ".weight"] = qmoe.compress_matrix(w)  # no Hessian: round to nearest, for comparison
        method = "GPTQ" if stats["status"] == "ok" else "RTN"
        print(f"{name + '.weight':<22} {acc.count:>7} {method:>7} {m.codec:>8} {m.bits_per_weight:>7.3f}")

    out_dir = None
    if args.out is None:
        out_dir = tempfile.TemporaryDirectory()
        out = os.path.join(out_dir.name, "moe.safetensors")
    else:
        out = args.out
    tensors = dict(compressed)
    tensors["router.weight"] = model.router.weight.detach().numpy()
    qmoe.save(out, tensors, metadata={"source": "examples/torch_moe_hessians.py"})
    qmoe.save_hessians(out + ".hessians", accs)
    loaded = qmoe.load(out)
    print(f"saved {out} ({os.path.getsize(out)} bytes) and {out}.hessians")

    # The layer again, with every expert run from its codes by qmoe's kernels.
    test = next(calibration_batches(1, 512, args.d_model, seed=2))
    with torch.no_grad():
        want = model(test).numpy()
        p, idx = model.route(test)
    x, p, idx = test.numpy(), p.numpy(), idx.numpy()

    def layer(weights):
        y = np.zeros_like(x)
        for e in range(args.experts):
            sel = idx == e
            if sel.any():
                hidden = np.maximum(weights[f"experts.{e}.wi.weight"].matmul(np.ascontiguousarray(x[sel])), 0)
                y[sel] = p[sel][:, None] * weights[f"experts.{e}.wo.weight"].matmul(hidden)
        return y

    for label, weights in [("GPTQ (loaded back)", loaded), ("round to nearest", rtn)]:
        err = np.linalg.norm(layer(weights) - want) / np.linalg.norm(want)
        print(f"MoE layer output with {label} experts: relative error {err:.4f}")
    if out_dir is not None:
        out_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
