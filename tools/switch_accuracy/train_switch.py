#!/usr/bin/env python3
"""Trains the Switch Transformer of the accuracy experiment (tools/switch_accuracy/RESULTS.md) on the
CPU: an encoder-decoder whose feed-forward layers are all mixtures of experts, so that the experts
hold most of the parameters and carry the model.

Text: the .py files of a Python standard library (code, comments and docstrings; default: the
library of the interpreter running this script, without its test suites, idlelib and
site-packages), read in sorted path order. Every file goes to one of NUM_SPLITS held-out splits or to
the training text by the CRC-32 of its path relative to the library root. The SHA-256 of the text is
written to OUT/data.json, so that a rerun can tell whether it saw the same corpus.

Tokens: bytes (ids 3..258; 0 pad and decoder start, 1 eos, 2 unused); vocabulary 264. Pairs: prefix
language modelling of ENC + DEC byte windows: the encoder reads ENC bytes, the decoder predicts the
DEC bytes that follow.

Determinism: the batch of step s is drawn from numpy's PCG64 seeded with (seed, s); torch runs with
deterministic algorithms and a fixed thread count. Training is checkpointed every --save-every
steps (model, optimizer, step) in OUT/train.pt, and a rerun continues from there: a run interrupted
and continued gives the same model as one that was not (with the same thread count).

    python tools/switch_accuracy/train_switch.py --out ~/.cache/qmoe/switch_accuracy

Writes OUT/model (config.json + model.safetensors), OUT/calib{0,1,2}.safetensors (calibration pairs
from the training text, three seeds), OUT/eval{0..3}.safetensors (the held-out splits) in the qmoe
token-file format (format/TOKENS.md), and OUT/train.log.
"""
import argparse
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import time
import zlib

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

PAD, EOS, BYTE0, VOCAB = 0, 1, 3, 264
NUM_SPLITS = 4
SPLIT_MOD = 40  # files with crc32(path) % SPLIT_MOD == k < NUM_SPLITS form held-out split k
SKIP_DIRS = ("test", "tests", "site-packages", "idlelib", "__pycache__")
# Arguments that do not change the model (the token files' sizes neither).
EXTERNAL = ("out", "save_every", "export_to", "calib_pairs", "eval_pairs", "time_steps")


def corpus(root):
    """(training bytes, [held-out bytes per split]) and the SHA-256 of everything read."""
    train, held = [], [[] for _ in range(NUM_SPLITS)]
    sha = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, "rb") as fh:
                data = fh.read()
            if len(data) < 256:
                continue
            sha.update(rel.encode() + b"\0" + data)
            k = zlib.crc32(rel.encode()) % SPLIT_MOD
            (held[k] if k < NUM_SPLITS else train).append(data)
    join = lambda parts: np.frombuffer(b"\n\n".join(parts), dtype=np.uint8)
    return join(train), [join(h) for h in held], sha.hexdigest()


def make_pairs(text, n, rng, enc_len, dec_len):
    """n (encoder ids, decoder targets) pairs from random windows of text."""
    starts = rng.integers(0, len(text) - enc_len - dec_len, size=n)
    enc = np.stack([text[s:s + enc_len] for s in starts]).astype(np.int64) + BYTE0
    dec = np.stack([text[s + enc_len:s + enc_len + dec_len] for s in starts]).astype(np.int64) + BYTE0
    return enc, dec


def write_tokens(path, enc, dec):
    n = enc.shape[0]
    save_file({"encoder_ids": enc.reshape(-1).astype(np.int32),
               "encoder_offsets": (np.arange(n + 1) * enc.shape[1]).astype(np.int64),
               "decoder_targets": dec.reshape(-1).astype(np.int32),
               "decoder_offsets": (np.arange(n + 1) * dec.shape[1]).astype(np.int64)},
              path, metadata={"format": "qmoe-tokens", "version": "1"})


def balance_loss(logits_list, num_experts):
    """Switch's load-balancing loss (mean over layers) and router z-loss from router logits."""
    aux, z = 0.0, 0.0
    for lg in logits_list:
        lg = lg.reshape(-1, num_experts).float()
        p = torch.softmax(lg, dim=-1)
        f = torch.nn.functional.one_hot(p.argmax(-1), num_experts).float().mean(0)
        aux = aux + num_experts * (f * p.mean(0)).sum()
        z = z + (torch.logsumexp(lg, dim=-1) ** 2).mean()
    return aux / len(logits_list), z / len(logits_list)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/qmoe/switch_accuracy"))
    ap.add_argument("--corpus-root", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--enc-len", type=int, default=96)
    ap.add_argument("--dec-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-kv", type=int, default=32, help="attention width per head")
    ap.add_argument("--layers", type=int, default=2, help="blocks per stack, every one sparse")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.03)
    ap.add_argument("--z-coef", type=float, default=0.001)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--calib-pairs", type=int, default=256)
    ap.add_argument("--eval-pairs", type=int, default=512)
    ap.add_argument("--time-steps", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--export-to", help="write the checkpoint's model and token files here, no training")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.save({"warm-up": torch.zeros(1)}, io.BytesIO())  # imports what checkpoints need, now
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    train_text, held, sha = corpus(args.corpus_root)
    print(f"corpus {args.corpus_root}: {len(train_text)} training bytes, held-out splits "
          f"{[len(h) for h in held]} bytes, sha256 {sha}", flush=True)

    config = SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
        num_heads=args.heads, num_layers=args.layers, num_decoder_layers=args.layers,
        num_sparse_encoder_layers=args.layers, num_sparse_decoder_layers=args.layers,
        num_experts=args.experts, expert_capacity=args.enc_len + args.dec_len, dropout_rate=0.0,
        router_jitter_noise=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
        relative_attention_num_buckets=32, relative_attention_max_distance=128)
    model = SwitchTransformersForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {n_params} parameters, {n_expert} in experts ({100 * n_expert / n_params:.1f}%)", flush=True)
    router_logits = []
    for mod in model.modules():
        if isinstance(mod, SwitchTransformersTop1Router):
            mod.register_forward_hook(lambda m, i, o: router_logits.append(o[2]))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    ckpt = os.path.join(args.out, "train.pt")
    step, seconds = 0, 0.0
    if os.path.exists(ckpt) and not args.time_steps:
        state = torch.load(ckpt, weights_only=False)
        same = lambda d: {k: v for k, v in d.items() if k not in EXTERNAL}
        if same(state["args"]) != same(vars(args)):
            sys.exit(f"{ckpt} was made with other arguments: {state['args']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = state["step"], state["seconds"]
        print(f"continuing from step {step} ({seconds:.0f} s of training so far)", flush=True)

    if args.export_to:
        args.out = args.export_to
        os.makedirs(args.out, exist_ok=True)
        args.steps = step
    log = open(os.path.join(args.out, "train.log"), "a")
    model.train()
    t_start, cpu_start, ema = time.time(), time.process_time(), None
    last = step
    while step < args.steps:
        rng = np.random.Generator(np.random.PCG64([args.seed, step]))
        enc, dec = make_pairs(train_text, args.batch, rng, args.enc_len, args.dec_len)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        router_logits.clear()
        out = model(input_ids=torch.from_numpy(enc), labels=torch.from_numpy(dec))
        aux, z = balance_loss(router_logits, args.experts)
        loss = out.loss + args.aux_coef * aux + args.z_coef * z
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ce = out.loss.item()
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        if args.time_steps and step - last >= args.time_steps:
            print(f"{args.time_steps} steps in {time.time() - t_start:.1f} s wall, "
                  f"{time.process_time() - cpu_start:.1f} s CPU", flush=True)
            return 0
        if step % 25 == 0:
            msg = (f"step {step} loss {ce:.4f} ema {ema:.4f} aux {aux.item():.3f} "
                   f"({seconds + time.time() - t_start:.0f} s)")
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            tmp = ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "seconds": seconds + time.time() - t_start,
                        "args": {k: v for k, v in vars(args).items() if k not in EXTERNAL}}, tmp)
            os.replace(tmp, ckpt)
    seconds += time.time() - t_start

    model.eval()
    mdir = os.path.join(args.out, "model")
    os.makedirs(mdir, exist_ok=True)
    model.save_pretrained(mdir, safe_serialization=True)
    gen = os.path.join(mdir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    for k in range(3):
        rng = np.random.Generator(np.random.PCG64([args.seed, 1_000_000 + k]))
        write_tokens(os.path.join(args.out, f"calib{k}.safetensors"),
                     *make_pairs(train_text, args.calib_pairs, rng, args.enc_len, args.dec_len))
    for k in range(NUM_SPLITS):
        rng = np.random.Generator(np.random.PCG64([args.seed, 2_000_000 + k]))
        write_tokens(os.path.join(args.out, f"eval{k}.safetensors"),
                     *make_pairs(held[k], args.eval_pairs, rng, args.enc_len, args.dec_len))
    with open(os.path.join(args.out, "data.json"), "w") as fh:
        json.dump({"corpus_root": args.corpus_root, "corpus_sha256": sha, "train_bytes": int(len(train_text)),
                   "heldout_bytes": [int(len(h)) for h in held], "steps": step, "train_seconds": seconds,
                   "threads": args.threads, "parameters": n_params, "expert_parameters": n_expert,
                   "torch": torch.__version__, "python": sys.version.split()[0]}, fh, indent=1)
    print(f"trained {step} steps in {seconds:.0f} s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
