// In-model decoding through the C++ API: open a qmoe container, take one compressed expert matrix
// and multiply it by a vector without ever expanding it, checked against the reference decoder.
//
//   expert_matvec CONTAINER [TENSOR]   a container written by `qmoe compress` or `qmoe encode`
//   expert_matvec                      makes one first: a random matrix, ternarized and encoded
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"
#include "qmoe/format/reference.h"

namespace {

// A 768 x 3072 float matrix, round-to-nearest ternary, qmoe-v1 codes, in a one-tensor container.
std::filesystem::path make_container(const std::filesystem::path& path) {
  const int64_t rows = 768, cols = 3072;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& v : w) v = normal(rng);
  const qmoe::CompressedMatrix m = qmoe::encode(qmoe::ternarize_rtn(w.data(), rows, cols));
  qmoe::ContainerWriter writer(path);
  writer.add_compressed("expert.wo.weight", m.view(), qmoe::DType::kF32);
  writer.finish();
  return path;
}

}  // namespace

int main(int argc, char** argv) try {
  const std::filesystem::path path =
      argc > 1 ? std::filesystem::path(argv[1])
               : make_container(std::filesystem::temp_directory_path() / "qmoe_example.qmoe");
  const qmoe::Container c = qmoe::Container::open(path);
  if (c.compressed().empty()) {
    std::fprintf(stderr, "%s: no compressed tensor\n", path.c_str());
    return 1;
  }
  const qmoe::CompressedEntry* e = argc > 2 ? c.find_compressed(argv[2]) : &c.compressed().front();
  if (e == nullptr) {
    std::fprintf(stderr, "%s: no compressed tensor '%s'\n", path.c_str(), argv[2]);
    return 1;
  }
  const qmoe::CompressedView& w = e->view;
  std::printf("%s: %s, %lld x %lld, %s, %.3f bits per weight\n", path.c_str(), e->name.c_str(),
              static_cast<long long>(w.rows), static_cast<long long>(w.cols),
              std::string(qmoe::codec_name(w.codec)).c_str(), w.bits_per_weight());

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(w.cols)), y(static_cast<size_t>(w.rows)),
      ref(static_cast<size_t>(w.rows));
  for (float& v : x) v = normal(rng);

  qmoe::cpu::matvec(w, x.data(), y.data());  // also warms up the tables and scratch
  const int reps = 20;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) qmoe::cpu::matvec(w, x.data(), y.data());
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      reps;

  qmoe::matvec_ref(w, x.data(), ref.data());
  double err = 0.0, norm = 0.0;
  for (size_t r = 0; r < y.size(); ++r) {
    err = std::fmax(err, std::fabs(static_cast<double>(y[r]) - ref[r]));
    norm = std::fmax(norm, std::fabs(static_cast<double>(ref[r])));
  }
  std::printf("matvec: %.1f us (%s kernels), max |y - reference| = %.3g (max |y| = %.3g)\n", us,
              std::string(qmoe::cpu::simd_level_name(qmoe::cpu::simd_level())).c_str(), err, norm);
  return err <= 1e-4 * (norm + 1.0) ? 0 : 1;
} catch (const std::exception& ex) {
  std::fprintf(stderr, "expert_matvec: %s\n", ex.what());
  return 1;
}
