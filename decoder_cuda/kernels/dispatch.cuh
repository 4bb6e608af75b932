// Argument checking, parameter packing, grid sizing and template dispatch shared by the CUDA
// launch functions (src/*.cu) and the CPU emulation (emu/kernels.cpp), so that the emulated tests
// exercise the same launch configurations the GPU runs. A Launcher supplies
//   template <class E, int NB> void fused(dim3 grid, const FusedParams<typename E::S>&);
//   template <class E> void dense(dim3 grid, const DenseParams<typename E::S>&);
//   template <class E> void p5_dense(dim3 grid, const uint8_t*, const uint16_t*, int32_t cols,
//                                    int32_t row_begin, int32_t row_end, typename E::S*, int64_t
//                                    ld);
#pragma once

#include <algorithm>
#include <limits>
#include <string>

#include "decode_dense.cuh"
#include "fused.cuh"
#include "qmoe/format/error.h"

namespace qmoe::cuda::kern {

// Grid dimensions a test may force to exercise the grid-stride loops (0 = automatic).
struct GridOverride {
  unsigned x = 0;
  unsigned z = 0;
};

inline constexpr int64_t kMaxGridYZ = 65535;

// Tokens per pass for a given number of tokens per expert: the smallest built variant that
// holds them all, so each codeword is decoded once whenever tokens <= kMaxFusedTokens.
inline int choose_tokens_per_pass(int64_t tokens) {
  return tokens <= 1 ? 1 : (tokens <= 8 ? 8 : 32);
}

inline void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgument(what);
}

inline void check_act(DType act, const char* fn) {
  require(act == DType::kBF16 || act == DType::kF16 || act == DType::kF32,
          std::string(fn) + ": activation type must be BF16, F16 or F32");
}

// Calls f(Bf16{}), f(F16{}) or f(F32{}) for the element type of `t` (checked by check_act first:
// anything else is F32).
template <class F>
void with_element_type(DType t, F&& f) {
  switch (t) {
    case DType::kBF16:
      f(Bf16{});
      break;
    case DType::kF16:
      f(F16{});
      break;
    default:
      f(F32{});
      break;
  }
}

template <class L, class E, int NB>
void launch_fused_typed(L& launcher, dim3 grid, const FusedParams<typename E::S>& p) {
  launcher.template fused<E, NB>(grid, p);
}

template <class L, class E>
void launch_fused_nb(L& launcher, int nb, dim3 grid, const FusedParams<typename E::S>& p) {
  switch (nb) {
    case 1:
      launch_fused_typed<L, E, 1>(launcher, grid, p);
      break;
    case 8:
      launch_fused_typed<L, E, 8>(launcher, grid, p);
      break;
    case 32:
      launch_fused_typed<L, E, 32>(launcher, grid, p);
      break;
    default:
      throw InvalidArgument("fused kernel: tokens_per_pass must be 1, 8 or 32, not " +
                            std::to_string(nb));
  }
}

// Common body of the single-matrix and grouped launches.
template <class L>
void dispatch_fused(L& launcher, const MatrixDev& single, const MatrixDev* experts,
                    int32_t num_experts, int32_t max_rows, DType act, const void* x, int64_t ldx,
                    void* y, int64_t ldy, int64_t max_slots, const int32_t* expert_offsets,
                    const int32_t* token_ids, const int32_t* out_ids, const float* scales,
                    int32_t num_tokens, bool accumulate, bool atomic, int nb, GridOverride go) {
  const int warps = nb == 1 ? kWarps<1> : (nb == 8 ? kWarps<8> : kWarps<32>);
  const int64_t groups = (static_cast<int64_t>(max_rows) + warps - 1) / warps;
  const int64_t passes = (max_slots + nb - 1) / nb;
  dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(num_experts),
            static_cast<unsigned>(std::min(passes, kMaxGridYZ)));
  if (go.x != 0) grid.x = go.x;
  if (go.z != 0) grid.z = go.z;
  auto run = [&](auto elem) {
    using E = decltype(elem);
    using S = typename E::S;
    FusedParams<S> p{};
    p.single = single;
    p.experts = experts;
    p.x = static_cast<const S*>(x);
    p.ldx = ldx;
    p.y = static_cast<S*>(y);
    p.ldy = ldy;
    p.expert_offsets = expert_offsets;
    p.token_ids = token_ids;
    p.out_ids = out_ids;
    p.scales = scales;
    p.num_tokens = num_tokens;
    p.accumulate = accumulate ? 1 : 0;
    p.atomic = atomic ? 1 : 0;
    launch_fused_nb<L, E>(launcher, nb, grid, p);
  };
  with_element_type(act, run);
}

template <class L>
void dispatch_single_fused(L& launcher, const MatrixDev& m, DType act, const void* x, int64_t ldx,
                           void* y, int64_t ldy, int64_t n_tokens, bool accumulate, int nb = 0,
                           GridOverride go = {}) {
  constexpr const char* fn = "launch_fused";
  check_act(act, fn);
  require(m.rows >= 0 && m.cols >= 0, std::string(fn) + ": negative shape");
  require(n_tokens >= 0 && n_tokens <= std::numeric_limits<int32_t>::max(),
          std::string(fn) + ": n_tokens out of range");
  require(n_tokens <= 1 || ldx >= m.cols,
          std::string(fn) + ": ldx " + std::to_string(ldx) + " < cols " + std::to_string(m.cols));
  require(n_tokens <= 1 || ldy >= m.rows,
          std::string(fn) + ": ldy " + std::to_string(ldy) + " < rows " + std::to_string(m.rows));
  if (m.rows == 0 || n_tokens == 0) return;
  require(m.entries_dev != nullptr && (m.codes_dev != nullptr || m.cols == 0) &&
              m.row_offsets_dev != nullptr && m.levels_dev != nullptr &&
              (x != nullptr || m.cols == 0) && y != nullptr,
          std::string(fn) + ": null pointer");
  if (nb == 0) nb = choose_tokens_per_pass(n_tokens);
  dispatch_fused(launcher, m, nullptr, 1, m.rows, act, x, ldx, y, ldy, n_tokens, nullptr, nullptr,
                 nullptr, nullptr, static_cast<int32_t>(n_tokens), accumulate, false, nb, go);
}

template <class L>
void dispatch_grouped(L& launcher, const GroupedArgs& g, DType act, GridOverride go = {}) {
  constexpr const char* fn = "launch_grouped";
  check_act(act, fn);
  require(g.num_experts >= 0 && g.num_experts <= kMaxGridYZ,
          std::string(fn) + ": num_experts out of range");
  require(g.max_rows >= 0 && g.cols >= 0 && g.total_slots >= 0,
          std::string(fn) + ": negative size");
  require(g.ldx >= g.cols, std::string(fn) + ": ldx < cols");
  require(g.ldy >= g.max_rows, std::string(fn) + ": ldy < max_rows");
  if (g.num_experts == 0 || g.max_rows == 0 || g.total_slots == 0) return;
  require(g.experts_dev != nullptr && g.expert_offsets_dev != nullptr && g.x_dev != nullptr &&
              g.y_dev != nullptr,
          std::string(fn) + ": null pointer");
  int nb = g.tokens_per_pass;
  if (nb == 0) nb = choose_tokens_per_pass((g.total_slots + g.num_experts - 1) / g.num_experts);
  dispatch_fused(launcher, MatrixDev{}, g.experts_dev, g.num_experts, g.max_rows, act, g.x_dev,
                 g.ldx, g.y_dev, g.ldy, g.total_slots, g.expert_offsets_dev, g.token_ids_dev,
                 g.out_ids_dev, g.scales_dev, 0, g.accumulate, g.accumulate && act == DType::kF32,
                 nb, go);
}

template <class L>
void dispatch_dense(L& launcher, const MatrixDev& m, int64_t row_begin, int64_t row_end, DType out,
                    void* out_ptr, int64_t ld) {
  constexpr const char* fn = "launch_decode_dense";
  check_act(out, fn);
  require(0 <= row_begin && row_begin <= row_end && row_end <= m.rows,
          std::string(fn) + ": bad row range");
  require(ld >= m.cols, std::string(fn) + ": ld_out < cols");
  if (row_end == row_begin || m.cols == 0) return;
  require(m.entries_dev != nullptr && m.codes_dev != nullptr && m.row_offsets_dev != nullptr &&
              m.levels_dev != nullptr && out_ptr != nullptr,
          std::string(fn) + ": null pointer");
  const dim3 grid(static_cast<unsigned>((row_end - row_begin + kDenseWarps - 1) / kDenseWarps));
  auto run = [&](auto elem) {
    using E = decltype(elem);
    DenseParams<typename E::S> p{m, static_cast<int32_t>(row_begin), static_cast<int32_t>(row_end),
                                 static_cast<typename E::S*>(out_ptr), ld};
    launcher.template dense<E>(grid, p);
  };
  with_element_type(out, run);
}

template <class L>
void dispatch_p5_dense(L& launcher, const uint8_t* packed, const uint16_t* levels, int64_t rows,
                       int64_t cols, int64_t row_begin, int64_t row_end, DType out, void* out_ptr,
                       int64_t ld) {
  constexpr const char* fn = "launch_p5_decode_dense";
  check_act(out, fn);
  require(rows >= 0 && cols >= 0 && rows <= std::numeric_limits<int32_t>::max() &&
              cols <= std::numeric_limits<int32_t>::max(),
          std::string(fn) + ": shape out of range");
  require(0 <= row_begin && row_begin <= row_end && row_end <= rows,
          std::string(fn) + ": bad row range");
  require(ld >= cols, std::string(fn) + ": ld_out < cols");
  if (row_end == row_begin || cols == 0) return;
  require(packed != nullptr && levels != nullptr && out_ptr != nullptr,
          std::string(fn) + ": null pointer");
  const int64_t bytes = (row_end - row_begin) * p5::row_bytes(cols);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((bytes + 255) / 256, 65535)));
  auto run = [&](auto elem) {
    using E = decltype(elem);
    launcher.template p5_dense<E>(grid, packed, levels, static_cast<int32_t>(cols),
                                  static_cast<int32_t>(row_begin), static_cast<int32_t>(row_end),
                                  static_cast<typename E::S*>(out_ptr), ld);
  };
  with_element_type(out, run);
}

}  // namespace qmoe::cuda::kern
