#!/usr/bin/env python3
"""Generate with a compressed Switch Transformers model inside transformers (qmoe.torch).

Loads a qmoe container as a transformers SwitchTransformersForConditionalGeneration whose experts
run from their codes (qmoe.torch.from_container: no expert is ever decoded to a dense matrix),
generates from token ids, or from text when a tokenizer is available locally, and prints the
tokens per second and the peak memory of the process.

    python examples/torch_generate.py --container model.qmoe.safetensors --ids 13,8,2 --max-new-tokens 20
    python examples/torch_generate.py --checkpoint CKPT_DIR           # compress it first (round to nearest)
    python examples/torch_generate.py --container C --text "..." --tokenizer TOKENIZER_DIR
    python examples/torch_generate.py --dense CKPT_DIR                # the dense model, to compare memory

Peak memory is the process's peak resident set (getrusage), printed with the runtime's own
resident set (after the imports and one generate() of a toy model with the same config class,
which loads the rest of torch's and transformers' code) and the model's own bytes (the parameters
that are not experts plus the compressed experts), so that the model's share can be read off. Run
each model in its own process to compare peaks. Needs torch and transformers (pip install qmoe[torch]); without
them the script says so and exits successfully.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import qmoe

try:
    import torch
    import transformers  # noqa: F401
except ImportError:
    torch = None


def rss_mb(peak=False):
    """Current (from /proc) or peak (getrusage) resident set of this process, in MiB."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def model_bytes(model):
    """(bytes of the parameters, bytes of the compressed experts) of a model."""
    import qmoe.torch as qt

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = 0
    for m in model.modules():
        if isinstance(m, qt.CompressedLinear):
            experts += m.matrix.nbytes
    return params, experts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--container", help="qmoe container of a Switch model (qmoe compress)")
    src.add_argument("--checkpoint", help="Switch checkpoint directory: compress it (round to nearest) first")
    src.add_argument("--dense", help="Switch checkpoint directory: the dense model through transformers, for comparison")
    ap.add_argument("--ids", default="13,8,2,21,5,34,3,55", help="comma-separated prompt token ids")
    ap.add_argument("--text", help="prompt text (needs --tokenizer)")
    ap.add_argument("--tokenizer", help="local tokenizer directory (e.g. a t5 tokenizer)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--min-new-tokens", type=int, default=0, help="generate at least this many (ignore EOS before)")
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch and qmoe threads (0: default)")
    args = ap.parse_args()

    if torch is None:
        print("PyTorch or transformers is not installed; skipping this example (pip install qmoe[torch]).")
        return 0
    import qmoe.torch as qt

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # The runtime's own memory: the imports and one generate() of a toy model (transformers and
    # torch load more of their code on first use).
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    toy = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=2, num_decoder_layers=2,
        num_experts=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()
    toy.generate(torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=False)
    del toy
    rss_runtime = rss_mb()
    tmp = None
    t0 = time.perf_counter()
    if args.dense:
        model = SwitchTransformersForConditionalGeneration.from_pretrained(args.dense).eval()
        kind = f"dense checkpoint {args.dense}"
    else:
        path = args.container
        if args.checkpoint:
            tmp = tempfile.TemporaryDirectory()
            path = os.path.join(tmp.name, "model.qmoe.safetensors")
            s = qmoe.compress_checkpoint(args.checkpoint, path, threads=args.threads, check_disk=False)
            print(f"compressed {args.checkpoint}: {s['expert_matrices']} expert matrices, "
                  f"{s['bits_per_expert_weight']:.3f} bits per expert weight")
        model = qt.from_container(path, threads=args.threads)
        kind = f"qmoe container {path}"
    load_s = time.perf_counter() - t0
    params, experts = model_bytes(model)
    layers = sum(isinstance(m, qt.CompressedSwitchExperts) for m in model.modules())
    print(f"model: {kind}; loaded in {load_s:.2f} s")
    print(f"weights: {params / 2**20:.1f} MiB of parameters (not experts, for a compressed model) + "
          f"{experts / 2**20:.1f} MiB of compressed experts in {layers} sparse layers")

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        except (OSError, ValueError) as e:
            print(f"no tokenizer at {args.tokenizer} ({e.__class__.__name__}); using token ids")
    if args.text and tokenizer is not None:
        ids = tokenizer(args.text, return_tensors="pt").input_ids
    else:
        if args.text:
            print("--text needs a local tokenizer (--tokenizer DIR); using --ids instead")
        ids = torch.tensor([[int(t) for t in args.ids.split(",")]], dtype=torch.int64)
    vocab = model.config.vocab_size
    if int(ids.max()) >= vocab:
        raise SystemExit(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}")

    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         num_beams=args.num_beams, do_sample=False)
    gen_s = time.perf_counter() - t0
    new = out.shape[1] - 1  # the decoder starts from decoder_start_token_id
    print(f"prompt: {ids.shape[1]} tokens; generated {new} tokens in {gen_s:.3f} s: "
          f"{new / gen_s if gen_s > 0 else 0.0:.1f} tokens/s")
    print("output ids: " + ",".join(str(int(t)) for t in out[0]))
    if tokenizer is not None:
        print("output text: " + tokenizer.decode(out[0], skip_special_tokens=True))
    peak = rss_mb(peak=True)
    model_mb = (params + experts) / 2**20
    print(f"peak RSS: {peak:.1f} MiB; runtime (imports + a toy generate()): {rss_runtime:.1f} MiB; "
          f"model + generation: {peak - rss_runtime:.1f} MiB = {(peak - rss_runtime) / model_mb:.2f} x the "
          f"model's {model_mb:.1f} MiB (parameters + compressed experts)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
