#!/usr/bin/env python3
"""`qmoe eval` against transformers on PyTorch: the same teacher-forced evaluation of the same
checkpoint and token pairs, on the same number of threads, in one run.

    python bench/eval_vs_transformers.py CHECKPOINT_DIR TOKENS.safetensors --qmoe build/release/cli/qmoe \
        [--threads 2] [--batch 8] [--repeat 3]

Both sides: batches of `--batch` pairs, every expert keeps every token (qmoe eval's default
capacity 0; transformers' expert_capacity is raised above any batch's token count), loss = the mean
cross-entropy of the non-ignored target tokens. transformers pads each batch (attention masks for
the encoder, -100 labels for the decoder); qmoe runs ragged batches without padding. Times are wall
seconds of the whole evaluation (model loading excluded), the median of `--repeat` runs of each,
alternating. Needs torch and transformers (pip install torch transformers); the test suite does not.
"""
import argparse
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file


def load_pairs(path):
    t = load_file(path)
    enc, eo = t["encoder_ids"], t["encoder_offsets"]
    dec, do = t["decoder_targets"], t["decoder_offsets"]
    return [(enc[eo[i]:eo[i + 1]], dec[do[i]:do[i + 1]]) for i in range(len(eo) - 1)]


def transformers_eval(model, pairs, batch, torch):
    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(pairs), batch):
            chunk = pairs[b:b + batch]
            le = max(len(e) for e, _ in chunk)
            ld = max(len(d) for _, d in chunk)
            ids = torch.zeros((len(chunk), le), dtype=torch.long)
            mask = torch.zeros((len(chunk), le), dtype=torch.long)
            labels = torch.full((len(chunk), ld), -100, dtype=torch.long)
            for i, (e, d) in enumerate(chunk):
                ids[i, :len(e)] = torch.from_numpy(e.astype(np.int64))
                mask[i, :len(e)] = 1
                labels[i, :len(d)] = torch.from_numpy(d.astype(np.int64))
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            logits = out.logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum").item()
            count += int((labels != -100).sum())
    return nll / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("tokens")
    ap.add_argument("--qmoe", required=True, help="the qmoe binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    import torch
    import transformers
    torch.set_num_threads(a.threads)
    pairs = load_pairs(a.tokens)
    config = transformers.AutoConfig.from_pretrained(a.checkpoint)
    config.expert_capacity = 1 << 20  # every token kept, as qmoe eval's default
    config.router_jitter_noise = 0.0
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        a.checkpoint, config=config, torch_dtype=torch.float32)
    model.eval()

    tf_times, q_times = [], []
    tf_loss = q_loss = None
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        tf_loss = transformers_eval(model, pairs, a.batch, torch)
        tf_times.append(time.perf_counter() - t0)
        r = subprocess.run([a.qmoe, "eval", a.checkpoint, "--tokens", a.tokens, "--threads",
                            str(a.threads), "--batch", str(a.batch)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("qmoe eval failed:\n" + r.stderr)
        q_loss = float(re.search(r"^loss\s+([0-9.eE+-]+)", r.stdout, re.M).group(1))
        q_times.append(float(re.search(r"tokens/s, ([0-9.]+) s,", r.stdout).group(1)))

    tokens = sum(len(e) + len(d) for e, d in pairs)
    tf, q = statistics.median(tf_times), statistics.median(q_times)
    print(f"checkpoint {a.checkpoint}; {len(pairs)} pairs, {tokens} tokens; batch {a.batch}; "
          f"{a.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'':14} {'loss':>14} {'seconds':>9} {'tokens/s':>10}   (median of {a.repeat})")
    print(f"{'transformers':14} {tf_loss:14.8f} {tf:9.2f} {tokens / tf:10.0f}")
    print(f"{'qmoe eval':14} {q_loss:14.8f} {q:9.2f} {tokens / q:10.0f}")
    print(f"relative loss difference {abs(q_loss - tf_loss) / abs(tf_loss):.2e}; "
          f"qmoe eval takes {q / tf:.2f}x transformers' time")


if __name__ == "__main__":
    main()
