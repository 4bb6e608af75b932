#include "qmoe/switch/model.h"

#include <algorithm>
#include <cstring>

#include <omp.h>

#include "qmoe/core/gemm.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

#include "qmoe/decoder_cpu/matmul.h"

namespace qmoe::sw {

namespace {

// Output features per work item. Fixed (not derived from the thread count) so that results do
// not depend on it; 64 rows of a 768-wide matrix (192 KiB as float) stay in L2.
constexpr int64_t kSlice = 64;
// Even, so that every slice but the last starts and ends at an even row: row_slice() never splits
// a qmoe-v3 pair of rows.
static_assert(kSlice % 2 == 0);

// Y[:, r0:r1] = X · W[r0:r1, :]ᵀ for every slice, in parallel.
template <class SliceFn>
void for_each_slice(int64_t out, SliceFn&& fn) {
  const int64_t slices = (out + kSlice - 1) / kSlice;
#pragma omp parallel for schedule(dynamic, 1) if (slices > 1 && !omp_in_parallel())
  for (int64_t s = 0; s < slices; ++s) fn(s * kSlice, std::min(out, (s + 1) * kSlice));
}

}  // namespace

const char* stack_name(Stack s) {
  return s == Stack::kEncoder ? "encoder" : "decoder";
}

void linear_forward(const Eigen::Map<const RowMatrix>& w, const float* x, int64_t n, float* y,
                    bool relu) {
  const int64_t out = w.rows(), in = w.cols();
  if (n == 0 || out == 0) return;
  // core's gemm: every output one chain of fused multiply-adds over `in`, so a token's result does
  // not depend on the other tokens of the batch or on the thread count.
  matmul_xwt(n, out, in, x, in, w.data(), y, out, {.relu = relu, .threads = 0});
}

void compressed_linear_forward(const CompressedView& w, const float* x, int64_t n, float* y) {
  // Fused decode x batch kernels of decoder_cpu (bit-identical for any thread count).
  if (n > 0 && w.rows > 0) cpu::matmul(w, n, x, w.cols, y, w.rows);
}

void compressed_linear_forward_ref(const CompressedView& w, const float* x, int64_t n, float* y) {
  const int64_t out = w.rows, in = w.cols;
  if (n == 0 || out == 0) return;
  for_each_slice(out, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> dense;
    thread_local std::vector<int32_t> offsets;
    dense.resize(static_cast<size_t>((r1 - r0) * in));
    const CompressedView v = row_slice(w, r0, r1, offsets);
    decode_ref(v, dense.data());
    gemm(n, r1 - r0, in, x, in, 1, dense.data(), 1, in, y + r0, out, 1);
  });
}

DenseExpert::DenseExpert(Linear wi, Linear wo) : wi_(std::move(wi)), wo_(std::move(wo)) {
  if (wo_.in != wi_.out || wo_.out != wi_.in)
    throw InvalidArgument("DenseExpert: wi [" + std::to_string(wi_.out) + ", " +
                          std::to_string(wi_.in) + "] and wo [" + std::to_string(wo_.out) + ", " +
                          std::to_string(wo_.in) + "] do not match");
}

void DenseExpert::forward(const float* x, int64_t n, float* hidden, float* y) const {
  std::vector<float> scratch;
  if (!hidden) {
    scratch.resize(static_cast<size_t>(n * d_ff()));
    hidden = scratch.data();
  }
  linear_forward(wi_.map(), x, n, hidden, /*relu=*/true);
  linear_forward(wo_.map(), hidden, n, y);
}

CompressedExpert::CompressedExpert(CompressedView wi, CompressedView wo,
                                   std::shared_ptr<const void> keep_alive)
    : wi_(wi), wo_(wo), keep_alive_(std::move(keep_alive)) {
  if (wo_.cols != wi_.rows || wo_.rows != wi_.cols)
    throw InvalidArgument("CompressedExpert: wi [" + std::to_string(wi_.rows) + ", " +
                          std::to_string(wi_.cols) + "] and wo [" + std::to_string(wo_.rows) +
                          ", " + std::to_string(wo_.cols) + "] do not match");
}

std::shared_ptr<CompressedExpert> CompressedExpert::owning(CompressedMatrix wi,
                                                           CompressedMatrix wo) {
  auto owned =
      std::make_shared<std::pair<CompressedMatrix, CompressedMatrix>>(std::move(wi), std::move(wo));
  return std::make_shared<CompressedExpert>(owned->first.view(), owned->second.view(), owned);
}

void CompressedExpert::forward(const float* x, int64_t n, float* hidden, float* y) const {
  std::vector<float> scratch;
  if (!hidden) {
    scratch.resize(static_cast<size_t>(n * d_ff()));
    hidden = scratch.data();
  }
  compressed_linear_forward(wi_, x, n, hidden);
  for (int64_t i = 0; i < n * d_ff(); ++i) hidden[i] = std::max(hidden[i], 0.0f);
  compressed_linear_forward(wo_, hidden, n, y);
}

// ---- loading ------------------------------------------------------------------------------------

namespace {

Linear load_linear(const SwitchSource& src, const std::string& name, int64_t out, int64_t in) {
  Linear l;
  l.t = src.dense(name, {out, in});
  l.out = out;
  l.in = in;
  return l;
}

Attention load_attention(const SwitchSource& src, const std::string& prefix, const SwitchConfig& c,
                         bool bias) {
  const int64_t inner = c.num_heads * c.d_kv;
  Attention a;
  a.q = load_linear(src, prefix + "q.weight", inner, c.d_model);
  a.k = load_linear(src, prefix + "k.weight", inner, c.d_model);
  a.v = load_linear(src, prefix + "v.weight", inner, c.d_model);
  a.o = load_linear(src, prefix + "o.weight", c.d_model, inner);
  if (bias)
    a.relative_bias = src.dense(prefix + "relative_attention_bias.weight",
                                {c.relative_attention_num_buckets, c.num_heads});
  return a;
}

}  // namespace

SwitchModel SwitchModel::load(const std::filesystem::path& path, const LoadOptions& opt) {
  return load(SwitchSource::open(path), opt);
}

SwitchModel SwitchModel::load(std::shared_ptr<const SwitchSource> src, const LoadOptions& opt) {
  SwitchModel m = shell(std::move(src));
  const SwitchConfig& c = m.config;
  if (!c.tie_word_embeddings) {
    m.lm_head = load_linear(*m.source, "lm_head.weight", c.vocab_size, c.d_model);
    m.scale_logits = false;
  } else {
    m.lm_head.t = m.shared;  // shares the mapping (F32) or copies the converted floats
    m.lm_head.out = c.vocab_size;
    m.lm_head.in = c.d_model;
    if (!m.lm_head.t.owned.empty()) m.lm_head.t.data = m.lm_head.t.owned.data();
    m.scale_logits = true;
  }
  for (Stack s : {Stack::kEncoder, Stack::kDecoder})
    for (int64_t b = 0; b < static_cast<int64_t>(m.blocks(s).size()); ++b) m.load_block(s, b, opt);
  return m;
}

SwitchModel SwitchModel::shell(std::shared_ptr<const SwitchSource> src) {
  SwitchModel m;
  m.source = src;
  m.config = src->config();
  m.layout = src->layout();
  const SwitchConfig& c = m.config;
  std::string emb = "shared.weight";
  if (!src->has(emb)) emb = "encoder.embed_tokens.weight";
  m.shared = src->dense(emb, {c.vocab_size, c.d_model});
  if (!c.tie_word_embeddings) {
    // Untied: each stack embeds with its own matrix when the checkpoint stores one (as
    // transformers 5 saves them); an index alias of shared.weight resolves to shared.weight.
    if (src->has("encoder.embed_tokens.weight"))
      m.encoder_embed = src->dense("encoder.embed_tokens.weight", {c.vocab_size, c.d_model});
    if (src->has("decoder.embed_tokens.weight"))
      m.decoder_embed = src->dense("decoder.embed_tokens.weight", {c.vocab_size, c.d_model});
  }
  m.scale_logits = c.tie_word_embeddings;
  m.encoder.resize(static_cast<size_t>(m.layout.encoder.num_blocks));
  m.decoder.resize(static_cast<size_t>(m.layout.decoder.num_blocks));
  m.encoder_final_ln = src->dense("encoder.final_layer_norm.weight", {c.d_model});
  m.decoder_final_ln = src->dense("decoder.final_layer_norm.weight", {c.d_model});
  return m;
}

void SwitchModel::load_block(Stack s, int64_t b, const LoadOptions& opt) {
  const SwitchSource& src = *source;
  const SwitchConfig& c = config;
  const int64_t E = layout.num_experts;
  const std::string stack = stack_name(s);
  const StackLayout& sl = s == Stack::kEncoder ? layout.encoder : layout.decoder;
  if (b < 0 || b >= sl.num_blocks)
    throw InvalidArgument("load_block: no " + stack + " block " + std::to_string(b));
  Block& blk = blocks(s)[static_cast<size_t>(b)];
  const std::string p = SwitchNames::block_prefix(stack, b);
  blk.self_ln = src.dense(p + "layer.0.layer_norm.weight", {c.d_model});
  blk.self_attn = load_attention(src, p + "layer.0.SelfAttention.", c, b == 0);
  if (s == Stack::kDecoder) {
    blk.cross_ln = src.dense(p + "layer.1.layer_norm.weight", {c.d_model});
    blk.cross_attn = load_attention(src, p + "layer.1.EncDecAttention.", c, false);
  }
  const std::string fp = SwitchNames::ff_prefix(stack, b);
  FeedForward& ff = blk.ff;
  ff.layer_norm = src.dense(fp + "layer_norm.weight", {c.d_model});
  ff.sparse = sl.sparse[static_cast<size_t>(b)];
  if (!ff.sparse) {
    ff.wi = load_linear(src, fp + "mlp.wi.weight", c.d_ff, c.d_model);
    ff.wo = load_linear(src, fp + "mlp.wo.weight", c.d_model, c.d_ff);
    return;
  }
  ff.router = load_linear(src, SwitchNames::router(stack, b), E, c.d_model);
  ff.experts.assign(static_cast<size_t>(E), nullptr);
  for (int64_t e = 0; e < E; ++e) {
    const std::string wi = SwitchNames::expert(stack, b, e, "wi");
    const std::string wo = SwitchNames::expert(stack, b, e, "wo");
    const CompressedView* cwi = src.compressed(wi);
    const CompressedView* cwo = src.compressed(wo);
    if (cwi && cwo) {
      if (cwi->rows != c.d_ff || cwi->cols != c.d_model)
        throw FormatError(error_context(src.path().string(), wi,
                                        "compressed shape does not match d_ff x d_model"));
      if (cwo->rows != c.d_model || cwo->cols != c.d_ff)
        throw FormatError(error_context(src.path().string(), wo,
                                        "compressed shape does not match d_model x d_ff"));
      if (opt.compressed_experts) {
        ff.experts[static_cast<size_t>(e)] = std::make_shared<CompressedExpert>(*cwi, *cwo, source);
      } else {
        Linear lwi, lwo;
        lwi.out = c.d_ff, lwi.in = c.d_model;
        lwo.out = c.d_model, lwo.in = c.d_ff;
        lwi.t.shape = {c.d_ff, c.d_model};
        lwo.t.shape = {c.d_model, c.d_ff};
        lwi.t.owned.resize(static_cast<size_t>(c.d_ff * c.d_model));
        lwo.t.owned.resize(static_cast<size_t>(c.d_ff * c.d_model));
        decode_ref(*cwi, lwi.t.owned.data());
        decode_ref(*cwo, lwo.t.owned.data());
        lwi.t.data = lwi.t.owned.data();
        lwo.t.data = lwo.t.owned.data();
        ff.experts[static_cast<size_t>(e)] =
            std::make_shared<DenseExpert>(std::move(lwi), std::move(lwo));
      }
    } else if (cwi || cwo) {
      throw FormatError(error_context(src.path().string(), cwi ? wo : wi,
                                      "expert has one compressed and one dense matrix"));
    } else if (opt.dense_experts) {
      ff.experts[static_cast<size_t>(e)] = std::make_shared<DenseExpert>(
          load_linear(src, wi, c.d_ff, c.d_model), load_linear(src, wo, c.d_model, c.d_ff));
    }
  }
}

void SwitchModel::release_block(Stack s, int64_t b) {
  Block& blk = blocks(s).at(static_cast<size_t>(b));
  // Block 0 of each stack keeps its relative position bias: every later block of the stack uses it.
  FloatTensor bias = std::move(blk.self_attn.relative_bias);
  blk = Block{};
  if (b == 0) blk.self_attn.relative_bias = std::move(bias);
}

void SwitchModel::set_expert(Stack s, int64_t block, int64_t expert,
                             std::shared_ptr<const ExpertMlp> mlp) {
  auto& bl = blocks(s);
  if (block < 0 || block >= static_cast<int64_t>(bl.size()))
    throw InvalidArgument(std::string("set_expert: no ") + stack_name(s) + " block " +
                          std::to_string(block));
  FeedForward& ff = bl[static_cast<size_t>(block)].ff;
  if (!ff.sparse)
    throw InvalidArgument(std::string("set_expert: ") + stack_name(s) + " block " +
                          std::to_string(block) + " is not sparse");
  if (expert < 0 || expert >= static_cast<int64_t>(ff.experts.size()))
    throw InvalidArgument("set_expert: no expert " + std::to_string(expert));
  if (!mlp || mlp->d_model() != config.d_model || mlp->d_ff() != config.d_ff)
    throw InvalidArgument("set_expert: expert shape does not match the model");
  ff.experts[static_cast<size_t>(expert)] = std::move(mlp);
}

}  // namespace qmoe::sw
