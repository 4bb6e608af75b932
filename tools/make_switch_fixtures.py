#!/usr/bin/env python3
"""Builds the golden fixtures of tests/switch/: small SwitchTransformers models with random weights,
saved in the Hugging Face hub layout, with the outputs of transformers' own forward pass.

Needs torch and transformers (pinned below, as in scripts/requirements-torch.txt); the C++ test
suite reads only the files written here, the Python tests (tests/python/test_torch.py) also run
transformers on them.

    pip install -r scripts/requirements-torch.txt safetensors numpy
    python tools/make_switch_fixtures.py [--out tests/switch/fixtures]

Per model directory <name>/:
  config.json, model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
  tokens.safetensors     the inputs, in the qmoe token-file format (format/TOKENS.md)
  expected.safetensors   what transformers computed, concatenated over the pairs in file order:
      encoder.block.{i}   [enc_tokens, d_model]  output of encoder block i
      encoder.final       [enc_tokens, d_model]  after the encoder's final layer norm
      decoder.block.{i}   [dec_tokens, d_model]  output of decoder block i
      logits              [dec_tokens, vocab]
      loss                [1]                    mean cross-entropy of the targets (no router losses)
    metadata: transformers / torch versions, expert_capacity used.

Each pair is run on its own (batch of one), so that sequences of different lengths need no padding
and the expert capacity applies per sequence, as in transformers.

Tokens over expert capacity (transformers 5, SwitchTransformersTop1Router): a token's priority for
its expert is its position in the sequence (cumulative count of earlier tokens routed to the same
expert); tokens past `expert_capacity` are dropped: their feed-forward output is zero, so the block
passes them on through the residual alone (as the original Switch Transformer does). The fixtures
`dropped_f32` and `all_sparse_bf16` use a small capacity so that this path is exercised.

Untied embeddings (`tie_word_embeddings: false`): transformers 5 keeps `shared`,
`encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` as four separate matrices, saves all of
them, and the encoder and decoder embed their tokens with their own. The fixtures `untied_f32` and
`all_sparse_bf16` are untied, with four different random matrices.
"""
import argparse
import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

PINNED_TRANSFORMERS = "5.25.0"


def build(cfg_kwargs, seed, weight_std):
    torch.manual_seed(seed)
    config = SwitchTransformersConfig(**cfg_kwargs)
    model = SwitchTransformersForConditionalGeneration(config)
    # Larger-than-default random weights, so that routing and attention are far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            elif "router" in name:
                p.copy_(torch.randn_like(p) * 1.0 / p.shape[1] ** 0.5 * 3.0)
            else:
                fan_in = p.shape[1] if p.dim() == 2 else 1
                embedding = name in ("shared.weight", "lm_head.weight") or name.endswith("embed_tokens.weight")
                scale = 1.0 if embedding else weight_std / fan_in ** 0.5
                p.copy_(torch.randn_like(p) * scale)
    model.eval()
    return model


def token_pairs(vocab, lengths, seed):
    g = np.random.default_rng(seed)
    pairs = []
    for el, dl in lengths:
        enc = g.integers(1, vocab, size=el).astype(np.int32)
        dec = g.integers(1, vocab, size=dl).astype(np.int32)
        pairs.append((enc, dec))
    return pairs


def write_tokens(path, pairs):
    enc = np.concatenate([p[0] for p in pairs]).astype(np.int32)
    dec = np.concatenate([p[1] for p in pairs]).astype(np.int32)
    eoff = np.cumsum([0] + [len(p[0]) for p in pairs]).astype(np.int64)
    doff = np.cumsum([0] + [len(p[1]) for p in pairs]).astype(np.int64)
    save_file({"encoder_ids": enc, "encoder_offsets": eoff, "decoder_targets": dec, "decoder_offsets": doff},
              path, metadata={"format": "qmoe-tokens", "version": "1"})


def run(model, pairs):
    cfg = model.config
    n_enc = cfg.num_layers
    n_dec = cfg.num_decoder_layers
    store = {}

    def hook(key):
        def f(_module, _inp, out):
            store.setdefault(key, []).append(out[0][0].detach().float().numpy().copy())
        return f

    hooks = [model.encoder.block[i].register_forward_hook(hook(f"encoder.block.{i}")) for i in range(n_enc)]
    hooks += [model.decoder.block[i].register_forward_hook(hook(f"decoder.block.{i}")) for i in range(n_dec)]
    logits, enc_final, nll_sum, n_tok = [], [], 0.0, 0
    with torch.no_grad():
        for enc, dec in pairs:
            out = model(input_ids=torch.tensor(enc[None].astype(np.int64)),
                        labels=torch.tensor(dec[None].astype(np.int64)),
                        output_router_logits=False, return_dict=True)
            logits.append(out.logits[0].float().numpy().copy())
            enc_final.append(out.encoder_last_hidden_state[0].float().numpy().copy())
            nll_sum += float(out.loss) * len(dec)
            n_tok += len(dec)
    for h in hooks:
        h.remove()
    result = {k: np.concatenate(v).astype(np.float32) for k, v in store.items()}
    result["encoder.final"] = np.concatenate(enc_final).astype(np.float32)
    result["logits"] = np.concatenate(logits).astype(np.float32)
    result["loss"] = np.array([nll_sum / n_tok], dtype=np.float32)
    return result


def make(out_dir, name, cfg_kwargs, seed, lengths, dtype=torch.float32, max_shard_size=None, weight_std=1.0):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model = build(cfg_kwargs, seed, weight_std)
    if dtype != torch.float32:
        # The reference runs in float32 on the weights as stored (rounded to bf16).
        model = model.to(dtype)
        model.save_pretrained(d, safe_serialization=True, max_shard_size=max_shard_size or "10GB")
        model = model.to(torch.float32)
    else:
        model.save_pretrained(d, safe_serialization=True, max_shard_size=max_shard_size or "10GB")
    if os.path.exists(os.path.join(d, "generation_config.json")):
        os.remove(os.path.join(d, "generation_config.json"))
    pairs = token_pairs(cfg_kwargs["vocab_size"], lengths, seed + 1)
    write_tokens(os.path.join(d, "tokens.safetensors"), pairs)
    expected = run(model, pairs)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "expert_capacity": str(model.config.expert_capacity)}
    save_file(expected, os.path.join(d, "expected.safetensors"), metadata=meta)
    print(name, "loss", float(expected["loss"][0]), "files", sorted(os.listdir(d)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "switch", "fixtures"))
    args = ap.parse_args()
    if transformers.__version__ != PINNED_TRANSFORMERS:
        raise SystemExit(f"transformers {PINNED_TRANSFORMERS} required, found {transformers.__version__}")
    torch.set_num_threads(1)
    lengths = [(23, 9), (5, 17), (40, 1)]
    common = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=16,
                  relative_attention_max_distance=24, dropout_rate=0.0, router_jitter_noise=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    # switch-base layout: every other block sparse (blocks 1, 3), tied embeddings, fp32, one file.
    base = dict(common, d_ff=64, num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64)
    make(args.out, "every_other_f32", base, seed=1, lengths=lengths)
    # The same layout with a capacity small enough that tokens are dropped (tied, fp32).
    make(args.out, "dropped_f32", dict(base, expert_capacity=3), seed=3, lengths=lengths)
    # Untied: separate encoder and decoder embeddings and lm_head (fp32, nothing dropped).
    make(args.out, "untied_f32", dict(base, tie_word_embeddings=False), seed=4, lengths=lengths)
    # c-2048 layout: every block sparse, untied, bf16, sharded with an index, a capacity small
    # enough that tokens are dropped.
    make(args.out, "all_sparse_bf16",
         dict(common, d_ff=48, num_layers=2, num_decoder_layers=3, num_sparse_encoder_layers=2,
              num_sparse_decoder_layers=3, num_experts=8, expert_capacity=4, tie_word_embeddings=False),
         seed=2, lengths=lengths, dtype=torch.bfloat16, max_shard_size="60KB")


if __name__ == "__main__":
    main()
