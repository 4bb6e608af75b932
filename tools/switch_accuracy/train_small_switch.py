#!/usr/bin/env python3
"""Trains a small Switch Transformer on the CPU for a few minutes, for the accuracy experiment of
tools/switch_accuracy/run_experiment.sh (original vs round-to-nearest vs GPTQ ternary experts).

Text: the docstrings of the Python standard library of the running interpreter (English prose that
every machine with Python has offline). Tokens: bytes (ids 3..258; 0 pad, 1 eos, 2 unused) and 32
sentinels (259..290); vocabulary 320. Pairs: T5 span corruption of 64-byte windows (--window) (15% noise,
mean span 3): encoder input = text with each span replaced by a sentinel; decoder targets = each
sentinel followed by its span, then eos.

    pip install torch transformers==4.46.3 numpy safetensors
    python tools/switch_accuracy/train_small_switch.py --out /tmp/qmoe_small_switch --minutes 5

Writes OUT/model (config.json + model.safetensors), OUT/calib.safetensors (calibration pairs, from
the training text) and OUT/eval.safetensors (held-out pairs), both in the qmoe token-file format.
"""
import argparse
import ast
import os
import random
import sys
import sysconfig
import time

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

PAD, EOS, BYTE0, SENT0, NUM_SENT, VOCAB = 0, 1, 3, 259, 32, 320


def corpus():
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d and len(d) > 80:
                        docs.append(" ".join(d.split()))
    return docs


def span_corrupt(window, rng):
    n = len(window)
    n_noise = max(1, round(n * 0.15))
    n_spans = max(1, min(NUM_SENT, round(n_noise / 3)))
    starts = sorted(rng.sample(range(n - 3), n_spans))
    enc, dec, pos, s = [], [], 0, 0
    for st in starts:
        if st < pos:
            continue
        ln = rng.randint(1, 5)
        enc += [BYTE0 + b for b in window[pos:st]] + [SENT0 + s]
        dec += [SENT0 + s] + [BYTE0 + b for b in window[st:st + ln]]
        pos, s = st + ln, s + 1
    enc += [BYTE0 + b for b in window[pos:]] + [EOS]
    dec += [EOS]
    return enc, dec


def make_pairs(text, n, rng, length=128):
    pairs = []
    for _ in range(n):
        i = rng.randrange(0, len(text) - length)
        pairs.append(span_corrupt(text[i:i + length], rng))
    return pairs


def write_tokens(path, pairs):
    enc = np.concatenate([np.array(p[0], np.int32) for p in pairs])
    dec = np.concatenate([np.array(p[1], np.int32) for p in pairs])
    eoff = np.cumsum([0] + [len(p[0]) for p in pairs]).astype(np.int64)
    doff = np.cumsum([0] + [len(p[1]) for p in pairs]).astype(np.int64)
    save_file({"encoder_ids": enc, "encoder_offsets": eoff, "decoder_targets": dec, "decoder_offsets": doff},
              path, metadata={"format": "qmoe-tokens", "version": "1"})


def batch_tensors(pairs):
    le = max(len(p[0]) for p in pairs)
    ld = max(len(p[1]) for p in pairs)
    ids = torch.full((len(pairs), le), PAD, dtype=torch.long)
    mask = torch.zeros((len(pairs), le), dtype=torch.long)
    labels = torch.full((len(pairs), ld), -100, dtype=torch.long)
    for i, (e, d) in enumerate(pairs):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
        labels[i, :len(d)] = torch.tensor(d)
    return ids, mask, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--window", type=int, default=64, help="bytes per training/eval window")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    docs = corpus()
    rng.shuffle(docs)
    n_eval = len(docs) // 20
    eval_text = " ".join(docs[:n_eval]).encode("utf-8")
    train_text = " ".join(docs[n_eval:]).encode("utf-8")
    print(f"corpus: {len(train_text)} training bytes, {len(eval_text)} held-out bytes", flush=True)

    config = SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=4 * args.d_model, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=64,
        dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
        eos_token_id=EOS, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    model = SwitchTransformersForConditionalGeneration(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    t0, step = time.time(), 0
    while time.time() - t0 < args.minutes * 60:
        ids, mask, labels = batch_tensors(make_pairs(train_text, args.batch, rng, args.window))
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {out.loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "model"), safe_serialization=True)
    gen = os.path.join(args.out, "model", "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    write_tokens(os.path.join(args.out, "calib.safetensors"), make_pairs(train_text, 128, random.Random(1), args.window))
    write_tokens(os.path.join(args.out, "eval.safetensors"), make_pairs(eval_text, 256, random.Random(2), args.window))
    print(f"trained {step} steps; wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
