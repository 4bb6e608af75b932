// The decoder_cuda kernels and host API on a real GPU (CTest label `gpu`): the same checks as the
// emulated tests, plus the DeviceMatrix paths (fused and dense + cuBLAS) and error reporting.
// Every test skips with a reason when no CUDA device is present.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "qmoe/decoder_cuda/decoder.h"
#include "test_util.h"

namespace qmoe::cuda::test {
namespace {

#define GPU_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count() == 0)
      GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount returned 0 or an error)";
  }
};

// Device buffer holding a copy of a host vector.
template <class T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(const std::vector<T>& h) : n(h.size()) {
    if (n == 0) return;
    EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) {
      EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return h;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

struct Shape {
  int64_t rows, cols;
  double p_zero;
};
const Shape kShapes[] = {{1, 1, 0.885},      {2, 3, 0.0},        {9, 63, 0.3},
                         {17, 257, 0.885},   {7, 1001, 0.5},     {5, 2999, 0.2},
                         {3, 9001, 0.885},   {4, 600, 1.0},      {768, 3072, 0.885},
                         {3072, 768, 0.885}, {2080, 6144, 0.885}};
const DType kTypes[] = {DType::kBF16, DType::kF16, DType::kF32};

// Runs DeviceMatrix::forward (fused below the crossover, dense above) and checks values/sentinels.
void check_forward(DeviceMatrix& dm, const CompressedMatrix& m, DType t, int64_t n, bool accumulate,
                   uint64_t seed) {
  SCOPED_TRACE(std::string(codec_name(m.codec)) + " " + std::to_string(m.rows) + "x" +
               std::to_string(m.cols) + " " + std::string(dtype_name(t)) + " tokens " +
               std::to_string(n) + (accumulate ? " accumulate" : ""));
  const int64_t ldx = m.cols + 2, ldy = m.rows + 3;
  Acts x = random_acts(t, static_cast<size_t>(n * ldx + 1), seed);
  Acts y(t, static_cast<size_t>(n * ldy + 5));
  fill_sentinel(y);
  Acts y0 = random_acts(t, y.size(), seed + 1);
  if (accumulate) {
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t r = 0; r < m.rows; ++r) y.set(k * ldy + r, y0.get(k * ldy + r));
    }
  }
  DevBuf<uint8_t> xd(x.bytes), yd(y.bytes);
  dm.forward(t, xd.p, ldx, yd.p, ldy, n, accumulate, nullptr);
  GPU_OK(cudaDeviceSynchronize());
  y.bytes = yd.get();
  std::vector<double> got, want;
  for (int64_t k = 0; k < n; ++k) {
    const auto ref = ref_matvec(m, x, static_cast<size_t>(k * ldx));
    for (int64_t r = 0; r < m.rows; ++r) {
      got.push_back(y.get(k * ldy + r));
      want.push_back(ref[r] + (accumulate ? y0.get(k * ldy + r) : 0.0));
    }
  }
  // The dense path rounds nothing more than the fused one for bf16/fp16 inputs (cuBLAS fp32
  // accumulation); for fp32 it may use another summation order, same tolerance.
  EXPECT_LE(nerr(got, want), tolerance(t));
  for (size_t i = 0; i < y.size(); ++i) {
    const int64_t k = static_cast<int64_t>(i) / ldy, r = static_cast<int64_t>(i) % ldy;
    const bool inside = k < n && r < m.rows;
    ASSERT_EQ(is_sentinel(y, i), !inside) << "element " << i;
  }
}

TEST_F(Gpu, ForwardFusedAndDenseMatchReference) {
  uint64_t seed = 1;
  for (Codec codec : {Codec::kV1, Codec::kV2}) {
    for (const Shape& s : kShapes) {
      const CompressedMatrix m =
          random_matrix(s.rows, s.cols, s.p_zero, 11 + s.rows + s.cols, codec);
      DeviceMatrix dm(m.view());
      ASSERT_EQ(dm.codec(), codec);  // held on the device as it is
      // The reference is a slow CPU decoder: the Switch-sized shapes get fewer combinations.
      const bool big = s.rows * s.cols > 1000000;
      for (DType t : kTypes) {
        if (big && t != DType::kBF16) continue;
        const std::vector<int64_t> counts =
            big ? std::vector<int64_t>{1, 8, 40} : std::vector<int64_t>{1, 3, 8, 13, 32, 40, 100};
        for (int64_t n : counts) check_forward(dm, m, t, n, n % 2 == 1, ++seed);
      }
    }
  }
}

TEST_F(Gpu, QmoeV2DictionaryIsSharedAndMatricesStaySmaller) {
  const CompressedMatrix a = random_matrix(64, 512, 0.885, 31, Codec::kV2);
  const CompressedMatrix b = random_matrix(64, 512, 0.885, 32, Codec::kV2);
  ASSERT_EQ(a.view().dictionary_id, b.view().dictionary_id);  // same fitted sparsity
  DeviceMatrix da(a.view()), db(b.view());
  EXPECT_EQ(da.matrix_dev().entries_dev, db.matrix_dev().entries_dev);
  EXPECT_NE(da.matrix_dev().entries_dev, v1_entries_dev());
  const CompressedMatrix v1 = random_matrix(64, 512, 0.885, 31, Codec::kV1);
  EXPECT_LT(da.device_bytes(), DeviceMatrix(v1.view()).device_bytes());
}

// The CPU's codecs run on the GPU too: DeviceMatrix converts a qmoe-v3 or qmoe-g4 matrix to
// qmoe-v2 on upload (codec() says qmoe-v2, source_codec() the codec it was given), with the same
// weights.
TEST_F(Gpu, CpuCodecsAreConvertedToQmoeV2OnUpload) {
  for (Codec codec : {Codec::kV3, Codec::kG4}) {
    SCOPED_TRACE(std::string(codec_name(codec)));
    const CompressedMatrix cpu = random_matrix(33, 300, 0.885, 12, codec);
    ASSERT_EQ(cpu.codec, codec);
    DeviceMatrix dm(cpu.view());
    EXPECT_EQ(dm.codec(), Codec::kV2);
    EXPECT_EQ(dm.source_codec(), codec);
    const CompressedMatrix v2 = transcode(cpu.view(), {.codec = Codec::kV2});
    check_forward(dm, v2, DType::kF32, 1, false, 21);
    check_forward(dm, v2, DType::kBF16, 40, false, 22);
  }
}

TEST_F(Gpu, ForwardP5TakesTheDensePath) {
  const CompressedMatrix m = random_matrix(37, 515, 0.3, 5, Codec::kP5);
  DeviceMatrix dm(m.view());
  for (DType t : kTypes) check_forward(dm, m, t, 3, false, 9);
}

TEST_F(Gpu, SmallDenseWorkspaceTilesRows) {
  const CompressedMatrix m = random_matrix(300, 700, 0.885, 6);
  ForwardOptions opt;
  opt.dense_min_tokens = 1;                 // always dense
  opt.dense_workspace_bytes = 700 * 2 * 7;  // 7 rows per tile for bf16
  DeviceMatrix dm(m.view(), opt);
  check_forward(dm, m, DType::kBF16, 5, true, 3);
  check_forward(dm, m, DType::kF32, 2, false, 4);
}

TEST_F(Gpu, DecodeDenseIsBitExact) {
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kP5}) {
    const CompressedMatrix m = random_matrix(45, 333, 0.885, 8, codec);
    DeviceMatrix dm(m.view());
    std::vector<float> ref(static_cast<size_t>(m.rows * m.cols));
    decode_ref(m.view(), ref.data());
    for (DType t : kTypes) {
      const int64_t ld = m.cols + 1, r0 = 4, r1 = 40;
      Acts out(t, static_cast<size_t>((r1 - r0) * ld));
      fill_sentinel(out);
      DevBuf<uint8_t> od(out.bytes);
      dm.decode_dense(t, od.p, ld, r0, r1);
      GPU_OK(cudaDeviceSynchronize());
      out.bytes = od.get();
      Acts want(t, 1);
      for (size_t i = 0; i < out.size(); ++i) {
        const int64_t r = r0 + static_cast<int64_t>(i) / ld, c = static_cast<int64_t>(i) % ld;
        if (c < m.cols) {
          want.set(0, ref[r * m.cols + c]);
          ASSERT_EQ(out.bits(i), want.bits(0));
        } else {
          ASSERT_TRUE(is_sentinel(out, i));
        }
      }
    }
  }
}

TEST_F(Gpu, GroupedLayerWithSkewedRouting) {
  const int n_experts = 16, n_tokens = 70;
  const int64_t max_rows = 96, cols = 160;
  std::vector<CompressedMatrix> experts;
  std::vector<std::unique_ptr<DeviceMatrix>> dms;
  std::vector<MatrixDev> views;
  for (int e = 0; e < n_experts; ++e) {  // qmoe-v1 and qmoe-v2 experts mixed
    experts.push_back(random_matrix(e % 3 == 2 ? max_rows - 9 : max_rows, cols, 0.885, 40 + e,
                                    e % 2 == 1 ? Codec::kV2 : Codec::kV1));
    dms.push_back(std::make_unique<DeviceMatrix>(experts.back().view()));
    views.push_back(dms.back()->matrix_dev());
  }
  std::vector<int> expert_of(n_tokens, 5);  // expert 5 takes almost everything
  expert_of[3] = 2;
  expert_of[50] = 11;
  std::vector<int32_t> offsets(n_experts + 1, 0), token_ids(n_tokens);
  for (int e : expert_of) ++offsets[e + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
  for (int tk = 0; tk < n_tokens; ++tk) token_ids[fill[expert_of[tk]]++] = tk;
  std::vector<float> scales(n_tokens);
  for (int s = 0; s < n_tokens; ++s) scales[s] = 0.5f + 0.01f * s;
  for (DType t : kTypes) {
    const int64_t ldx = cols, ldy = max_rows;
    Acts x = random_acts(t, n_tokens * ldx, 77);
    Acts y(t, n_tokens * ldy);
    fill_sentinel(y);
    DevBuf<MatrixDev> vd(views);
    DevBuf<int32_t> od(offsets), td(token_ids);
    DevBuf<float> sd(scales);
    DevBuf<uint8_t> xd(x.bytes), yd(y.bytes);
    GroupedArgs g;
    g.experts_dev = vd.p;
    g.num_experts = n_experts;
    g.max_rows = static_cast<int32_t>(max_rows);
    g.cols = static_cast<int32_t>(cols);
    g.expert_offsets_dev = od.p;
    g.token_ids_dev = td.p;
    g.scales_dev = sd.p;
    g.total_slots = n_tokens;
    g.x_dev = xd.p;
    g.ldx = ldx;
    g.y_dev = yd.p;
    g.ldy = ldy;
    launch_grouped(g, t, nullptr);
    GPU_OK(cudaDeviceSynchronize());
    y.bytes = yd.get();
    std::vector<double> got, want;
    for (int e = 0; e < n_experts; ++e) {
      for (int32_t s = offsets[e]; s < offsets[e + 1]; ++s) {
        const auto ref = ref_matvec(experts[e], x, static_cast<size_t>(token_ids[s] * ldx));
        for (int64_t r = 0; r < experts[e].rows; ++r) {
          got.push_back(y.get(token_ids[s] * ldy + r));
          want.push_back(scales[s] * ref[r]);
        }
        for (int64_t r = experts[e].rows; r < ldy; ++r)
          EXPECT_TRUE(is_sentinel(y, token_ids[s] * ldy + r));
      }
    }
    EXPECT_LE(nerr(got, want), tolerance(t)) << dtype_name(t);
  }
}

TEST_F(Gpu, CudaErrorsNameTheCall) {
  try {
    (void)v1_entries_dev(device_count() + 7);  // no such device
    FAIL() << "no error for an invalid device ordinal";
  } catch (const CudaError& e) {
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice"), std::string::npos) << e.what();
  }
  const CompressedMatrix m = random_matrix(4, 10, 0.5, 1);
  DeviceMatrix dm(m.view());
  EXPECT_THROW(dm.forward(DType::kU8, nullptr, 10, nullptr, 4, 1, false), InvalidArgument);
}

}  // namespace
}  // namespace qmoe::cuda::test
