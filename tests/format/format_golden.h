// The small containers of the container tests, and the generator of the committed golden files
// (tests/format/golden/valid-p5.safetensors, tests/format/golden/invalid/) and of the container
// fuzzer's seeds made from them (tests/fuzz/corpus/container/). The generator is not a test:
// format_make_golden (make_golden.cpp) runs it on the source tree after a deliberate format change,
// and the test ContainerGolden.CommittedFilesAreTheGeneratorsOutput checks that the committed
// files are what it writes today.
#pragma once

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "format_test_util.h"

namespace qmoe::test {

// A 3 x 4 qmoe-v1 matrix "m" with one code per row, a 2 x 7 qmoe-p5 matrix "p" and a dense
// F32 tensor "embed".
struct Small {
  TernaryMatrix tm, tp;
  CompressedMatrix m, p;
  std::vector<float> embed{1, 2, 3, 4};
  Small() {
    tm = TernaryMatrix(3, 4);
    tm.symbols = {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2};
    tm.levels = {float_to_bf16(-1),   float_to_bf16(1),  float_to_bf16(-0.5f),
                 float_to_bf16(0.5f), float_to_bf16(-2), float_to_bf16(2)};
    tp = random_ternary(2, 7, 0.5, 9);
    m = GreedyV1::get().encode(tm);
    p = encode_p5(tp);
  }
  fs::path write(const TempDir& dir, const std::string& name = "c.safetensors") const {
    write_to(dir / name);
    return dir / name;
  }
  void write_to(const fs::path& path) const {
    ContainerWriter w(path);
    w.add_dense("embed", DType::kF32, {4}, bytes_of(embed));
    w.add_compressed("m", m.view(), DType::kF32);
    w.add_compressed("p", p.view(), DType::kF32);
    w.finish();
  }
};

template <class T>
void poke(nlohmann::ordered_json& h, std::vector<uint8_t>& d, const std::string& tensor,
          size_t index, T value) {
  const auto b = h[tensor]["data_offsets"][0].get<size_t>();
  std::memcpy(d.data() + b + index * sizeof(T), &value, sizeof(T));
}

// Renames a stored tensor together with its checksum key.
inline void rename_tensor(nlohmann::ordered_json& h, const std::string& from,
                          const std::string& to) {
  h[to] = h[from];
  h.erase(from);
  auto& md = h["__metadata__"];
  md["qmoe.xxh3." + to] = md["qmoe.xxh3." + from];
  md.erase("qmoe.xxh3." + from);
}

// Writes valid-p5.safetensors (format/SPEC.md 7.1) and invalid/*.safetensors into `golden`, and
// the container fuzzer's seeds made from them (the same files and one with a qmoe-v1 matrix)
// into `corpus`. Deterministic.
inline void write_format_golden(const fs::path& golden, const fs::path& corpus) {
  using Header = nlohmann::ordered_json;
  using Data = std::vector<uint8_t>;
  fs::create_directories(golden / "invalid");
  TernaryMatrix t(2, 7);
  t.symbols = {0, 1, 2, 0, 0, 0, 2, 2, 0, 0, 1, 0, 0, 0};
  t.levels = {float_to_bf16(-1), float_to_bf16(1), float_to_bf16(-0.5f), float_to_bf16(0.5f)};
  const std::vector<float> bias = {0.25f, -4.0f};
  const fs::path valid = golden / "valid-p5.safetensors";
  {
    ContainerWriter w(valid);
    w.set_metadata("note", "golden");
    w.add_compressed("w", encode_p5(t).view(), DType::kF32);
    w.add_dense("bias", DType::kF32, {2}, bytes_of(bias));
    w.finish();
  }
  const auto full = read_bytes(valid);
  auto variant = [&](const std::string& name, const std::function<void(Header&, Data&)>& edit,
                     bool fix = true) {
    const fs::path p = golden / "invalid" / name;
    write_bytes(p, full);
    rewrite(p, [&](Header& h, Data& d) {
      edit(h, d);
      if (fix) refresh_checksums(h, d);
    });
  };
  write_bytes(golden / "invalid/truncated.safetensors", Data(full.begin(), full.begin() + 5));
  {
    Data b = full;
    b[0] = static_cast<uint8_t>(b[0] + 200);
    write_bytes(golden / "invalid/header-past-end.safetensors", Data(b.begin(), b.begin() + 100));
  }
  {
    Data b = full;
    *std::find(b.begin() + 8, b.end(), ':') = ';';
    write_bytes(golden / "invalid/bad-json.safetensors", b);
  }
  auto last_tensor = [](Header& h) {
    std::string last;
    int64_t best = -1;
    for (auto& [k, v] : h.items()) {
      if (k != "__metadata__" && v["data_offsets"][0].get<int64_t>() > best) {
        best = v["data_offsets"][0].get<int64_t>();
        last = k;
      }
    }
    return last;
  };
  variant(
      "offset-gap.safetensors",
      [&](Header& h, Data& d) {
        const std::string l = last_tensor(h);
        h[l]["data_offsets"] = {h[l]["data_offsets"][0].get<int64_t>() + 1,
                                h[l]["data_offsets"][1].get<int64_t>() + 1};
        d.insert(d.begin() + h[l]["data_offsets"][0].get<int64_t>() - 1, 0);
      },
      false);
  variant(
      "offset-overlap.safetensors",
      [&](Header& h, Data& d) {
        const std::string l = last_tensor(h);
        h[l]["data_offsets"] = {h[l]["data_offsets"][0].get<int64_t>() - 1,
                                h[l]["data_offsets"][1].get<int64_t>() - 1};
        d.pop_back();
      },
      false);
  variant(
      "unknown-dtype.safetensors", [](Header& h, Data&) { h["bias"]["dtype"] = "X32"; }, false);
  variant("padding-symbol.safetensors",
          [](Header& h, Data& d) { poke<uint8_t>(h, d, "w.qmoe_packed", 1, 2 + 27); });
  variant("nan-level.safetensors",
          [](Header& h, Data& d) { poke<uint16_t>(h, d, "w.qmoe_levels", 1, 0x7fc0); });
  variant("missing-member.safetensors",
          [](Header& h, Data&) { rename_tensor(h, "w.qmoe_levels", "stray"); });

  fs::create_directories(corpus);
  fs::copy_file(valid, corpus / "valid-p5.safetensors", fs::copy_options::overwrite_existing);
  for (const auto& e : fs::directory_iterator(golden / "invalid")) {
    fs::copy_file(e.path(), corpus / e.path().filename(), fs::copy_options::overwrite_existing);
  }
  Small().write_to(corpus / "valid-v1.safetensors");
}

}  // namespace qmoe::test
