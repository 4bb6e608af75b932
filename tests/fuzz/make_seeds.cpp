// Writes the generated seeds of the fuzz corpora (tests/fuzz/corpus/): checkpoint folders of a
// small Switch model (float32 in one file, bfloat16 in shards with an index and tied aliases, and
// as qmoe containers with its config), containers with qmoe-v2 and qmoe-v3 matrices and their
// dictionaries, a sharded container mixing the codecs, a qmoe-g4 container made for the CPU, and
// token files. Not a test: run it by
// hand after a deliberate change of a format,
//   build/release/tests/fuzz/fuzz_make_seeds tests/fuzz/corpus
// and commit what changed. The seeds are deterministic.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <tuple>
#include <vector>

#include "fuzz_files.h"
#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/generate.h"
#include "qmoe/switch/tokens.h"

namespace fs = std::filesystem;
using qmoe::fuzz::File;

namespace {

std::string read(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << s;
  std::printf("%8zu  %s\n", s.size(), p.c_str());
}

// Every file of `dir` (sorted by name) as one folder input.
std::string folder(const fs::path& dir) {
  std::vector<fs::path> paths;
  for (const auto& e : fs::directory_iterator(dir)) paths.push_back(e.path());
  std::sort(paths.begin(), paths.end());
  std::vector<File> files;
  for (const auto& p : paths) files.push_back({p.filename().string(), read(p)});
  return qmoe::fuzz::serialize_files(files);
}

qmoe::sw::GenerateOptions small_model() {
  qmoe::sw::GenerateOptions o;
  o.vocab_size = 24;
  o.d_model = 4;
  o.d_ff = 8;
  o.d_kv = 2;
  o.num_heads = 2;
  o.num_layers = o.num_decoder_layers = 2;
  o.num_experts = 2;
  o.threads = 1;
  return o;
}

// The checkpoint in `from` as a qmoe container in `to` (a file, or a folder when sharded): the
// experts' matrices round-to-nearest ternarized and encoded with `codec`, everything else dense,
// and the config in the metadata, as qmoe compress stores it.
void to_container(const fs::path& from, const fs::path& to, qmoe::Codec codec,
                  int64_t shard_size = 0) {
  const auto in = qmoe::SafetensorsFile::open(from / "model.safetensors");
  qmoe::ContainerWriter w(to, {.shard_size = shard_size});
  w.set_metadata("config.json", read(from / "config.json"));
  for (const auto& t : in.tensors()) {
    if (t.name.find(".experts.") == std::string::npos) {
      w.add_dense(t.name, t.dtype, t.shape, in.bytes(t));
      continue;
    }
    const auto tern = qmoe::ternarize_rtn(in.bytes(t).data(), t.dtype, t.shape[0], t.shape[1]);
    w.add_compressed(t.name, qmoe::encode(tern, {.codec = codec}).view(), t.dtype);
  }
  w.finish();
}

// A container of small matrices (and a dense tensor) in `to`: for each codec, one of each shape.
// The qmoe-v2 and qmoe-v3 matrices share one dictionary per codec (one zero fraction).
void matrices(const fs::path& to, std::vector<qmoe::Codec> codecs,
              std::vector<std::pair<int, int>> shapes, int64_t shard_size = 0) {
  qmoe::ContainerWriter w(to, {.shard_size = shard_size});
  w.set_metadata("note", "fuzz seed");
  int k = 0;
  for (const qmoe::Codec codec : codecs) {
    for (const auto& [rows, cols] : shapes) {
      std::vector<float> x(static_cast<size_t>(rows * cols));
      for (size_t i = 0; i < x.size(); ++i)
        x[i] = (i * 2654435761u) % 9 == 0 ? 1.0f : (i * 40503u) % 11 == 0 ? -0.5f : 0.0f;
      const auto tern = qmoe::ternarize_rtn(x.data(), rows, cols);
      std::string name = "m";  // (not "m" + ...: GCC 12 warns falsely about that, -Wrestrict)
      name += std::to_string(k++);
      w.add_compressed(name, qmoe::encode(tern, {.codec = codec, .fitted_p0 = 0.890625}).view(),
                       qmoe::DType::kF32);
    }
  }
  const std::vector<float> bias = {0.25f, -4.0f, 1.5f};
  w.add_dense("bias", qmoe::DType::kF32, {3}, std::as_bytes(std::span(bias)));
  w.finish();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  const fs::path corpus = argv[1];
  const fs::path tmp = fs::temp_directory_path() / ("qmoe-seeds-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (const char* d : {"checkpoint", "container", "tokens"}) fs::create_directories(corpus / d);

  // ---- checkpoint folders ----
  auto o = small_model();
  qmoe::sw::generate_checkpoint(tmp / "f32", o);
  write(corpus / "checkpoint/small-f32", folder(tmp / "f32"));
  o.dtype = qmoe::DType::kBF16;
  o.shard_size = 1500;
  o.sparse_step = 1;
  o.misleading_config = true;
  qmoe::sw::generate_checkpoint(tmp / "bf16", o);
  write(corpus / "checkpoint/small-bf16-sharded-aliases", folder(tmp / "bf16"));
  fs::create_directories(tmp / "p5");
  to_container(tmp / "f32", tmp / "p5/model.safetensors", qmoe::Codec::kP5);
  write(corpus / "checkpoint/small-container-p5", folder(tmp / "p5"));
  to_container(tmp / "f32", tmp / "p5-sharded", qmoe::Codec::kP5, 1000);
  write(corpus / "checkpoint/small-container-p5-sharded", folder(tmp / "p5-sharded"));
  fs::create_directories(tmp / "v1");
  to_container(tmp / "f32", tmp / "v1/model.safetensors", qmoe::Codec::kV1);
  write(corpus / "checkpoint/small-container-v1", folder(tmp / "v1"));

  // ---- containers: qmoe-v2 and qmoe-v3 matrices with their dictionaries, and a sharded one ----
  matrices(tmp / "v2.safetensors", {qmoe::Codec::kV2}, {{3, 40}, {4, 7}, {5, 0}});
  write(corpus / "container/valid-v2.safetensors", read(tmp / "v2.safetensors"));
  matrices(tmp / "v3.safetensors", {qmoe::Codec::kV3}, {{3, 40}, {4, 7}, {0, 5}});
  write(corpus / "container/valid-v3.safetensors", read(tmp / "v3.safetensors"));
  matrices(tmp / "sharded", {qmoe::Codec::kP5, qmoe::Codec::kV2, qmoe::Codec::kV3}, {{3, 40}}, 64);
  write(corpus / "container/sharded-p5-v2-v3", folder(tmp / "sharded"));
  // A qmoe-g4 container made for the CPU: format/SPEC.md 4.5.6's example matrix (a group of 4 rows
  // with an escape, a group with padding rows), target "cpu".
  {
    qmoe::TernaryMatrix t(5, 6);
    for (const auto& [r, c, sym] :
         {std::tuple{1, 0, 1}, {2, 5, 1}, {3, 0, 2}, {4, 2, 2}, {4, 3, 2}})
      t.symbols[static_cast<size_t>(r * 6 + c)] = static_cast<uint8_t>(sym);
    for (int r = 0; r < 5; ++r) {
      t.levels[static_cast<size_t>(2 * r)] =
          qmoe::float_to_bf16(-0.5f - 0.25f * static_cast<float>(r));
      t.levels[static_cast<size_t>(2 * r + 1)] =
          qmoe::float_to_bf16(0.75f + 0.25f * static_cast<float>(r));
    }
    qmoe::ContainerWriter w(tmp / "g4.safetensors", {});
    w.set_target(qmoe::Target::kCpu);
    w.set_metadata("quantizer", "rtn");
    w.add_compressed("w", qmoe::encode(t, {.codec = qmoe::Codec::kG4}).view(), qmoe::DType::kF32);
    w.finish();
    write(corpus / "container/valid-g4.safetensors", read(tmp / "g4.safetensors"));
  }

  // ---- token files ----
  // Described (fuzz_tokens.cpp): flags, then pairs of (encoder length, target length, ids).
  write(corpus / "tokens/pairs-3", std::string("\x00\x00\x03\x02\x05\x06\x07\x08\x01"
                                               "\x01\x03\x09\x0a\x0b\xff"
                                               "\x02\x00\x0c\x0d",
                                               19));
  write(corpus / "tokens/edge-ids",
        std::string("\x00\x00\x04\x04\x00\x01\x32\x33\x30\x31\x32\x33", 12));
  write(corpus / "tokens/raw-offset", std::string("\x40\x18\x05\x00\x00\x00\x00\x00\x00\x00"
                                                  "\x02\x01\x05\x06\x07",
                                                  15));
  write(corpus / "tokens/i32-offsets", std::string("\x04\x00\x02\x02\x05\x06\x07\x08", 8));
  qmoe::sw::TokenPairs pairs;
  const int32_t e1[] = {5, 6, 7}, d1[] = {8, 1}, e2[] = {9}, d2[] = {10, 11, -100};
  pairs.add(e1, d1);
  pairs.add(e2, d2);
  pairs.save(tmp / "t.safetensors");
  write(corpus / "tokens/raw-spec-example", "\x01" + read(tmp / "t.safetensors"));
  fs::remove_all(tmp);
  return 0;
}
