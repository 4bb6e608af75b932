#include "qmoe/switch/forward.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include <omp.h>

#include "qmoe/core/gemm.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/format/error.h"

namespace qmoe::sw {

namespace {

// Rows per work item of row-wise loops; fixed so results do not depend on the thread count.
constexpr int64_t kRowChunk = 32;

template <class Fn>
void parallel_rows(int64_t n, Fn&& fn) {
  const int64_t chunks = (n + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for schedule(static) if (chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < chunks; ++c) fn(c * kRowChunk, std::min(n, (c + 1) * kRowChunk));
}

RowMatrix project(const Linear& w, const RowMatrix& x) {
  RowMatrix y(x.rows(), w.out);
  linear_forward(w.map(), x.data(), x.rows(), y.data());
  return y;
}

// Multi-head attention of one stack layer on layer-normed queries xq and keys/values source xkv.
// `bias_table` null: no position bias. `causal`: query q sees keys 0..q only. Products through
// core's gemm (one chain of fused multiply-adds per entry): a sequence's result does not depend on
// the other sequences of the batch.
void attention(const SwitchModel& m, const Attention& a, const RowMatrix& xq, const SeqOffsets& qs,
               const RowMatrix& xkv, const SeqOffsets& ks, const FloatTensor* bias_table,
               bool bidirectional, bool causal, RowMatrix& h) {
  const int64_t H = m.config.num_heads, D = m.config.d_kv, inner = H * D;
  const RowMatrix Q = project(a.q, xq);
  const RowMatrix K = project(a.k, xkv);
  const RowMatrix V = project(a.v, xkv);
  RowMatrix ctx(xq.rows(), inner);
  const int64_t S = qs.num_seqs();
#pragma omp parallel for schedule(dynamic, 1) if (S * H > 1 && !omp_in_parallel())
  for (int64_t item = 0; item < S * H; ++item) {
    const int64_t s = item / H, hd = item % H;
    const int64_t q0 = qs.offsets[static_cast<size_t>(s)],
                  lq = qs.offsets[static_cast<size_t>(s) + 1] - q0;
    const int64_t k0 = ks.offsets[static_cast<size_t>(s)],
                  lk = ks.offsets[static_cast<size_t>(s) + 1] - k0;
    if (lq == 0) continue;
    thread_local std::vector<float> scores;
    thread_local std::vector<int32_t> bucket;  // by relative position k - q + lq - 1
    scores.resize(static_cast<size_t>(lq * lk));
    float* sc = scores.data();
    // scores = Q_h K_h^T
    gemm(lq, lk, D, Q.data() + q0 * inner + hd * D, inner, 1, K.data() + k0 * inner + hd * D, 1,
         inner, sc, lk, 1);
    if (bias_table) {
      bucket.resize(static_cast<size_t>(lq + lk - 1));
      for (int64_t r = 0; r < lq + lk - 1; ++r)
        bucket[static_cast<size_t>(r)] = static_cast<int32_t>(relative_position_bucket(
            r - (lq - 1), bidirectional, m.config.relative_attention_num_buckets,
            m.config.relative_attention_max_distance));
      const float* bias = bias_table->data;
      for (int64_t q = 0; q < lq; ++q) {
        const int32_t* bq = bucket.data() + (lq - 1 - q);  // bq[k] = bucket of k - q
        float* row = sc + q * lk;
        for (int64_t k = 0; k < lk; ++k) row[k] += bias[bq[k] * H + hd];
      }
    }
    for (int64_t q = 0; q < lq; ++q) {
      const int64_t kn = causal ? std::min(lk, q + 1) : lk;
      Eigen::Map<Eigen::ArrayXf> row(sc + q * lk, kn);
      const float mx = row.maxCoeff();
      row = (row - mx).exp();
      const float inv = 1.0f / row.sum();
      row *= inv;
      std::fill(sc + q * lk + kn, sc + (q + 1) * lk, 0.0f);
    }
    // ctx_h = P V_h
    gemm(lq, D, lk, sc, lk, 1, V.data() + k0 * inner + hd * D, inner, 1,
         ctx.data() + q0 * inner + hd * D, inner, 1);
  }
  const RowMatrix out = project(a.o, ctx);
  h += out;
}

}  // namespace

// ---- building blocks ----------------------------------------------------------------------------

void rms_norm(const RowMatrix& x, const FloatTensor& w, double eps, RowMatrix& out) {
  out.resize(x.rows(), x.cols());
  const int64_t d = x.cols();
  const float feps = static_cast<float>(eps);
  parallel_rows(x.rows(), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += x(r, i) * x(r, i);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + feps);
      for (int64_t i = 0; i < d; ++i) out(r, i) = w.data[i] * (x(r, i) * inv);
    }
  });
}

int64_t relative_position_bucket(int64_t relative_position, bool bidirectional, int64_t num_buckets,
                                 int64_t max_distance) {
  int64_t bucket = 0;
  int64_t n = num_buckets;
  int64_t rp = relative_position;
  if (bidirectional) {
    n /= 2;
    if (rp > 0) bucket += n;
    rp = rp < 0 ? -rp : rp;
  } else {
    rp = rp < 0 ? -rp : 0;  // only the past; future positions share bucket 0
  }
  const int64_t max_exact = n / 2;
  if (rp < max_exact) return bucket + rp;
  // Logarithmic buckets up to max_distance, computed in float32 like the reference.
  const float ratio = std::log(static_cast<float>(rp) / static_cast<float>(max_exact)) /
                      static_cast<float>(std::log(static_cast<double>(max_distance) /
                                                  static_cast<double>(max_exact)));
  const int64_t large = max_exact + static_cast<int64_t>(ratio * static_cast<float>(n - max_exact));
  return bucket + std::min(large, n - 1);
}

RowMatrix embed(const SwitchModel& m, Stack s, std::span<const int32_t> ids) {
  const int64_t d = m.config.d_model;
  const float* table = m.embedding(s).data;
  RowMatrix h(static_cast<int64_t>(ids.size()), d);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= m.config.vocab_size)
      throw InvalidArgument("token id " + std::to_string(id) + " outside the vocabulary [0, " +
                            std::to_string(m.config.vocab_size) + ")");
    std::copy_n(table + static_cast<int64_t>(id) * d, d, h.row(static_cast<int64_t>(i)).data());
  }
  return h;
}

void self_attention_layer(const SwitchModel& m, Stack s, int64_t b, const SeqOffsets& seqs,
                          RowMatrix& h) {
  const auto& blocks = m.blocks(s);
  const Block& blk = blocks[static_cast<size_t>(b)];
  RowMatrix x;
  rms_norm(h, blk.self_ln, m.config.layer_norm_epsilon, x);
  const bool enc = s == Stack::kEncoder;
  attention(m, blk.self_attn, x, seqs, x, seqs, &blocks[0].self_attn.relative_bias, enc, !enc, h);
}

void cross_attention_layer(const SwitchModel& m, int64_t b, const SeqOffsets& dec_seqs,
                           const RowMatrix& enc_out, const SeqOffsets& enc_seqs, RowMatrix& h) {
  const Block& blk = m.decoder[static_cast<size_t>(b)];
  RowMatrix x;
  rms_norm(h, blk.cross_ln, m.config.layer_norm_epsilon, x);
  attention(m, blk.cross_attn, x, dec_seqs, enc_out, enc_seqs, nullptr, false, false, h);
}

Routing route(const FeedForward& ff, const RowMatrix& x, const SeqOffsets& seqs,
              const ForwardOptions& opt) {
  const int64_t n = x.rows(), E = ff.router.out;
  RowMatrix logits(n, E);
  linear_forward(ff.router.map(), x.data(), n, logits.data());
  Routing r;
  r.expert.resize(static_cast<size_t>(n));
  r.prob.resize(static_cast<size_t>(n));
  r.dropped.assign(static_cast<size_t>(n), 0);
  parallel_rows(n, [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) {
      float mx = logits(t, 0);
      int32_t arg = 0;
      for (int64_t e = 1; e < E; ++e)
        if (logits(t, e) > mx) mx = logits(t, e), arg = static_cast<int32_t>(e);
      float sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(logits(t, e) - mx);
      r.expert[static_cast<size_t>(t)] = arg;
      r.prob[static_cast<size_t>(t)] = 1.0f / sum;  // exp(max - max) / sum
    }
  });
  r.tokens_of.assign(static_cast<size_t>(E), {});
  std::vector<int64_t> count(static_cast<size_t>(E));
  for (int64_t s = 0; s < seqs.num_seqs(); ++s) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t t = seqs.offsets[static_cast<size_t>(s)];
         t < seqs.offsets[static_cast<size_t>(s) + 1]; ++t) {
      const auto e = static_cast<size_t>(r.expert[static_cast<size_t>(t)]);
      if (opt.expert_capacity > 0 && ++count[e] > opt.expert_capacity) {
        r.dropped[static_cast<size_t>(t)] = 1;
        continue;
      }
      r.tokens_of[e].push_back(t);
    }
  }
  return r;
}

namespace {

// When every active expert is compressed and the CPU kernels are built: the layer's up
// projections as one grouped call (hidden rows in expert order), ReLU, then the down projections
// as a second grouped call writing each token's row of y. Each expert sees the same tokens in the
// same order as a per-expert call, so the results are bit-identical to the loop in
// feed_forward_apply. Returns false (nothing written) otherwise.
bool grouped_experts_apply(const RowMatrix& x, const Routing& routing,
                           std::span<const std::shared_ptr<const ExpertMlp>> experts,
                           RowMatrix& y) {
  std::vector<const CompressedExpert*> comp(experts.size(), nullptr);
  int64_t assignments = 0, d_ff = -1;
  for (size_t e = 0; e < experts.size(); ++e) {
    if (routing.tokens_of[e].empty()) continue;
    comp[e] = dynamic_cast<const CompressedExpert*>(experts[e].get());
    if (comp[e] == nullptr) return false;
    if (d_ff >= 0 && comp[e]->d_ff() != d_ff) return false;
    d_ff = comp[e]->d_ff();
    assignments += static_cast<int64_t>(routing.tokens_of[e].size());
  }
  if (assignments == 0) return true;
  const int64_t n = x.rows(), d = x.cols();
  std::vector<std::vector<int32_t>> tokens(experts.size()), slots(experts.size());
  std::vector<cpu::ExpertBatch> up, down;
  int32_t next = 0;
  for (size_t e = 0; e < experts.size(); ++e) {
    if (comp[e] == nullptr) continue;
    for (int64_t t : routing.tokens_of[e]) {
      tokens[e].push_back(static_cast<int32_t>(t));
      slots[e].push_back(next++);
    }
    up.push_back({comp[e]->wi(), tokens[e], slots[e], {}});
    down.push_back({comp[e]->wo(), slots[e], tokens[e], {}});
  }
  RowMatrix hidden(assignments, d_ff);
  cpu::grouped_matmul(up, x.data(), n, d, hidden.data(), assignments, d_ff);
  float* hp = hidden.data();
  for (int64_t i = 0; i < assignments * d_ff; ++i) hp[i] = std::max(hp[i], 0.0f);  // as forward()
  cpu::grouped_matmul(down, hidden.data(), assignments, d_ff, y.data(), n, d);
  return true;
}

}  // namespace

void feed_forward_apply(const FeedForward& ff, const RowMatrix& x, const Routing* routing,
                        RowMatrix& h, std::span<const std::shared_ptr<const ExpertMlp>> experts) {
  const int64_t n = x.rows(), d = x.cols();
  if (!ff.sparse) {
    RowMatrix hid(n, ff.wi.out), y(n, d);
    linear_forward(ff.wi.map(), x.data(), n, hid.data(), /*relu=*/true);
    linear_forward(ff.wo.map(), hid.data(), n, y.data());
    h += y;
    return;
  }
  if (!routing) throw InvalidArgument("feed_forward_apply: a sparse layer needs its routing");
  if (experts.empty()) experts = ff.experts;
  if (experts.size() != routing->tokens_of.size())
    throw InvalidArgument("feed_forward_apply: " + std::to_string(experts.size()) +
                          " experts for " + std::to_string(routing->tokens_of.size()) +
                          " routed groups");
  RowMatrix y(n, d);
  // Dropped tokens (over the expert capacity): FF output zero, the residual alone goes on.
  for (int64_t t = 0; t < n; ++t)
    if (routing->dropped[static_cast<size_t>(t)]) y.row(t).setZero();
  if (!grouped_experts_apply(x, *routing, experts, y)) {
    RowMatrix xin, yout;
    for (size_t e = 0; e < experts.size(); ++e) {
      const auto& toks = routing->tokens_of[e];
      if (toks.empty()) continue;
      const auto k = static_cast<int64_t>(toks.size());
      xin.resize(k, d);
      yout.resize(k, d);
      for (int64_t i = 0; i < k; ++i) xin.row(i) = x.row(toks[static_cast<size_t>(i)]);
      experts[e]->forward(xin.data(), k, nullptr, yout.data());
      for (int64_t i = 0; i < k; ++i) y.row(toks[static_cast<size_t>(i)]) = yout.row(i);
    }
  }
  for (int64_t t = 0; t < n; ++t) h.row(t) += routing->prob[static_cast<size_t>(t)] * y.row(t);
}

void feed_forward_layer(const SwitchModel& m, Stack s, int64_t b, const SeqOffsets& seqs,
                        RowMatrix& h, const ForwardOptions& opt) {
  const FeedForward& ff = m.blocks(s)[static_cast<size_t>(b)].ff;
  RowMatrix x;
  rms_norm(h, ff.layer_norm, m.config.layer_norm_epsilon, x);
  if (ff.sparse) {
    const Routing r = route(ff, x, seqs, opt);
    feed_forward_apply(ff, x, &r, h);
  } else {
    feed_forward_apply(ff, x, nullptr, h);
  }
}

// ---- whole model --------------------------------------------------------------------------------

SeqOffsets encoder_seqs(const TokenPairs& p) {
  SeqOffsets s;
  s.offsets = p.encoder_offsets;
  if (s.offsets.empty()) s.offsets = {0};
  return s;
}

SeqOffsets decoder_seqs(const TokenPairs& p) {
  SeqOffsets s;
  s.offsets = p.decoder_offsets;
  if (s.offsets.empty()) s.offsets = {0};
  return s;
}

std::vector<int32_t> shift_right(const SwitchModel& m, std::span<const int32_t> targets) {
  std::vector<int32_t> in(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const int32_t v = i == 0 ? m.config.decoder_start_token_id : targets[i - 1];
    in[i] = v == -100 ? m.config.pad_token_id : v;
  }
  return in;
}

RowMatrix encode(const SwitchModel& m, const TokenPairs& batch, const ForwardOptions& opt,
                 ForwardTrace* trace) {
  const SeqOffsets seqs = encoder_seqs(batch);
  RowMatrix h = embed(m, Stack::kEncoder, batch.encoder_ids);
  for (int64_t b = 0; b < static_cast<int64_t>(m.encoder.size()); ++b) {
    self_attention_layer(m, Stack::kEncoder, b, seqs, h);
    feed_forward_layer(m, Stack::kEncoder, b, seqs, h, opt);
    if (trace) trace->encoder_blocks.push_back(h);
  }
  RowMatrix out;
  rms_norm(h, m.encoder_final_ln, m.config.layer_norm_epsilon, out);
  if (trace) trace->encoder_final = out;
  return out;
}

RowMatrix decode(const SwitchModel& m, const TokenPairs& batch, const RowMatrix& enc_out,
                 const ForwardOptions& opt, ForwardTrace* trace) {
  const SeqOffsets seqs = decoder_seqs(batch), eseqs = encoder_seqs(batch);
  std::vector<int32_t> inputs;
  inputs.reserve(batch.decoder_targets.size());
  for (int64_t p = 0; p < batch.num_pairs(); ++p) {
    const auto shifted = shift_right(m, batch.decoder(p));
    inputs.insert(inputs.end(), shifted.begin(), shifted.end());
  }
  RowMatrix h = embed(m, Stack::kDecoder, inputs);
  for (int64_t b = 0; b < static_cast<int64_t>(m.decoder.size()); ++b) {
    self_attention_layer(m, Stack::kDecoder, b, seqs, h);
    cross_attention_layer(m, b, seqs, enc_out, eseqs, h);
    feed_forward_layer(m, Stack::kDecoder, b, seqs, h, opt);
    if (trace) trace->decoder_blocks.push_back(h);
  }
  RowMatrix out;
  rms_norm(h, m.decoder_final_ln, m.config.layer_norm_epsilon, out);
  return out;
}

RowMatrix logits(const SwitchModel& m, const RowMatrix& dec_out) {
  RowMatrix x = dec_out;
  if (m.scale_logits)
    x *= static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.config.d_model)));
  RowMatrix y(x.rows(), m.lm_head.out);
  linear_forward(m.lm_head.map(), x.data(), x.rows(), y.data());
  return y;
}

LossResult cross_entropy(const SwitchModel& m, const TokenPairs& batch, const ForwardOptions& opt) {
  const RowMatrix enc = encode(m, batch, opt);
  const RowMatrix dec = decode(m, batch, enc, opt);
  const int64_t n = dec.rows(), V = m.lm_head.out;
  std::vector<double> nll(static_cast<size_t>(n), 0.0);
  // Logits of this many rows at a time (256 x vocab floats): enough rows for the product with
  // lm_head to run at GEMM speed, few enough to bound memory.
  constexpr int64_t kLogitRows = 256;
  for (int64_t r0 = 0; r0 < n; r0 += kLogitRows) {
    const int64_t r1 = std::min(n, r0 + kLogitRows);
    const RowMatrix lg = logits(m, dec.middleRows(r0, r1 - r0));
    parallel_rows(r1 - r0, [&](int64_t a, int64_t b) {
      thread_local Eigen::ArrayXf ex;
      for (int64_t i = a; i < b; ++i) {
        const int32_t t = batch.decoder_targets[static_cast<size_t>(r0 + i)];
        if (t == -100) continue;
        // log-softmax: exponentials in float32 (as transformers computes it), summed in float64.
        const Eigen::Map<const Eigen::ArrayXf> row(lg.row(i).data(), V);
        const float mx = row.maxCoeff();
        ex = (row - mx).exp();
        double sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += static_cast<double>(ex[v]);
        nll[static_cast<size_t>(r0 + i)] =
            std::log(sum) + static_cast<double>(mx) - static_cast<double>(lg(i, t));
      }
    });
  }
  LossResult r;
  for (int64_t i = 0; i < n; ++i) {
    if (batch.decoder_targets[static_cast<size_t>(i)] == -100) continue;
    r.nll_sum += nll[static_cast<size_t>(i)];
    ++r.targets;
  }
  return r;
}

double block_forward_flops(const SwitchConfig& c, Stack s, bool sparse, int64_t num_experts,
                           const SeqOffsets& seqs, const SeqOffsets& enc_seqs) {
  const double d = static_cast<double>(c.d_model);
  const double inner = static_cast<double>(c.num_heads * c.d_kv);
  const double ff = static_cast<double>(c.d_ff);
  const double n = static_cast<double>(seqs.num_tokens());
  double f = 8.0 * n * d * inner;  // q, k, v, o
  double sq = 0;
  for (int64_t i = 0; i < seqs.num_seqs(); ++i) {
    const double l = static_cast<double>(seqs.offsets[i + 1] - seqs.offsets[i]);
    sq += l * l;
  }
  f += 4.0 * inner * sq;  // scores and context
  if (s == Stack::kDecoder) {
    const double ne = static_cast<double>(enc_seqs.num_tokens());
    f += 4.0 * n * d * inner + 4.0 * ne * d * inner;  // q, o; k, v over the encoder output
    double cross = 0;
    for (int64_t i = 0; i < seqs.num_seqs() && i < enc_seqs.num_seqs(); ++i)
      cross += static_cast<double>(seqs.offsets[i + 1] - seqs.offsets[i]) *
               static_cast<double>(enc_seqs.offsets[i + 1] - enc_seqs.offsets[i]);
    f += 4.0 * inner * cross;
  }
  f += 4.0 * n * d * ff;  // wi and wo (each token's expert in sparse blocks)
  if (sparse) f += 2.0 * n * d * static_cast<double>(num_experts);
  return f;
}

double forward_flops(const SwitchModel& m, const TokenPairs& batch) {
  const SeqOffsets es = encoder_seqs(batch), ds = decoder_seqs(batch);
  double f = 0;
  for (Stack s : {Stack::kEncoder, Stack::kDecoder}) {
    const StackLayout& sl = s == Stack::kEncoder ? m.layout.encoder : m.layout.decoder;
    for (int64_t b = 0; b < sl.num_blocks; ++b)
      f += block_forward_flops(m.config, s, sl.sparse[static_cast<size_t>(b)], m.layout.num_experts,
                               s == Stack::kEncoder ? es : ds, es);
  }
  f += 2.0 * static_cast<double>(ds.num_tokens()) * static_cast<double>(m.config.d_model) *
       static_cast<double>(m.config.vocab_size);  // logits
  return f;
}

EvalResult evaluate(const SwitchModel& m, const TokenPairs& pairs, int64_t batch_pairs,
                    const ForwardOptions& opt, const std::function<void(int64_t)>& progress) {
  if (batch_pairs < 1) throw InvalidArgument("evaluate: batch_pairs must be >= 1");
  EvalResult r;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t p = 0; p < pairs.num_pairs(); p += batch_pairs) {
    const TokenPairs b = pairs.slice(p, std::min(pairs.num_pairs(), p + batch_pairs));
    const LossResult l = cross_entropy(m, b, opt);
    r.flops += forward_flops(m, b);
    r.loss.nll_sum += l.nll_sum;
    r.loss.targets += l.targets;
    r.encoder_tokens += static_cast<int64_t>(b.encoder_ids.size());
    r.decoder_tokens += static_cast<int64_t>(b.decoder_targets.size());
    if (progress) progress(std::min(pairs.num_pairs(), p + batch_pairs));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace qmoe::sw
