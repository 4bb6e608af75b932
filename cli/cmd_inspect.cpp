// qmoe inspect: what a container holds -- per tensor, per block and in total.
#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "command.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/matrix.h"

#include "util.h"

namespace qmoe::cli {
namespace {

using nlohmann::json;

struct InspectArgs {
  std::string input;
  bool json_out = false, summary = false;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r;
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "x" : "") + std::to_string(s[i]);
  return r.empty() ? "scalar" : r;
}

// Per expert matrix statistics the compress pipeline stores under "compress.stats.<block>".
struct ExpertStat {
  double zero_fraction = -1, loss = -1, output_loss = -1;
  int64_t tokens = -1;
  bool fallback = false;
  bool below_target = false;  // rate control: stayed below its size target
};

// "encoder.block.3.layer.1.mlp.experts.expert_5.wo.weight" -> ("encoder.block.3", 5, 1).
bool parse_expert(const std::string& name, std::string& block, int64_t& expert, int& which) {
  std::vector<std::string> p;
  size_t b = 0;
  for (size_t e; (e = name.find('.', b)) != std::string::npos; b = e + 1)
    p.push_back(name.substr(b, e - b));
  p.push_back(name.substr(b));
  auto digits = [](const std::string& s) {
    return !s.empty() && s.size() < 10 &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  if (p.size() != 10 || (p[0] != "encoder" && p[0] != "decoder") || p[1] != "block" ||
      !digits(p[2]) || p[3] != "layer" || !digits(p[4]) || p[5] != "mlp" || p[6] != "experts" ||
      p[7].rfind("expert_", 0) != 0 || !digits(p[7].substr(7)) || (p[8] != "wi" && p[8] != "wo") ||
      p[9] != "weight")
    return false;
  block = p[0] + ".block." + p[2];
  expert = std::stoll(p[7].substr(7));
  which = p[8] == "wi" ? 0 : 1;
  return true;
}

int run_inspect(const InspectArgs& a) {
  const Container c = Container::open(a.input);
  const auto& md = c.metadata();
  auto meta = [&](const std::string& k) -> std::string {
    auto it = md.find(k);
    return it == md.end() ? std::string() : it->second;
  };
  int64_t container_bytes = 0;
  for (const auto& f : c.files())
    container_bytes += static_cast<int64_t>(std::filesystem::file_size(f));
  const std::string in_bytes_s = meta("source.bytes");
  const int64_t input_bytes = in_bytes_s.empty() ? 0 : std::stoll(in_bytes_s);

  // Stats written by `qmoe compress`.
  std::map<std::string, ExpertStat> stats;  // tensor name -> stats
  std::map<std::string, json> block_stats;
  for (const auto& [k, v] : md) {
    if (k.rfind("compress.stats.", 0) != 0) continue;
    const json j = json::parse(v, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    block_stats[k.substr(15)] = j;
  }
  auto stat_of = [&](const std::string& name) -> const ExpertStat* {
    std::string block;
    int64_t e;
    int w;
    if (!parse_expert(name, block, e, w)) return nullptr;
    auto it = block_stats.find(block);
    if (it == block_stats.end()) return nullptr;
    auto& s = stats[name];
    const size_t i = static_cast<size_t>(2 * e + w);
    const json& j = it->second;
    auto pick = [&](const char* key, double& out) {
      if (j.contains(key) && j[key].is_array() && i < j[key].size() && j[key][i].is_number())
        out = j[key][i].get<double>();
    };
    pick("zero_fraction", s.zero_fraction);
    pick("loss", s.loss);
    pick("output_loss", s.output_loss);
    if (j.contains("tokens") && j["tokens"].is_array() && i < j["tokens"].size())
      s.tokens = j["tokens"][i].get<int64_t>();
    if (j.contains("fallback") && j["fallback"].is_array())
      for (const auto& f : j["fallback"])
        if (f.is_number_integer() && f.get<size_t>() == i) s.fallback = true;
    if (j.contains("below_target") && j["below_target"].is_array())
      for (const auto& f : j["below_target"])
        if (f.is_number_integer() && f.get<size_t>() == i) s.below_target = true;
    return &s;
  };

  struct Block {
    int64_t matrices = 0, weights = 0, bytes = 0;
    double loss = 0;
    int64_t loss_n = 0;
    double zeros = 0;
    int64_t zeros_n = 0;
  };
  std::map<std::string, Block> blocks;
  json jt = json::array();
  int64_t comp_n = 0, comp_weights = 0, comp_bytes = 0, comp_codes = 0, comp_input = 0;
  int64_t expert_weights = 0, expert_bytes = 0;
  std::array<int64_t, kCodecs.size()> per_codec{};  // compressed matrices of each codec
  // Fitted dictionaries, counted once each in the totals (a v2 and a v3 dictionary never share an
  // id: the container stores them under different names, and their entries differ).
  std::array<std::set<uint64_t>, kCodecs.size()> dictionaries;  // by codec
  int64_t dense_n = 0, dense_bytes = 0;

  std::vector<std::string> names = c.names();
  if (!a.summary && !a.json_out)
    std::printf("%-64s %-12s %-8s %10s %9s %8s\n", "tensor", "shape", "codec", "codes", "bits/w",
                "loss");
  for (const auto& name : names) {
    if (const CompressedEntry* e = c.find_compressed(name)) {
      const CompressedView& v = e->view;
      const int64_t w = v.rows * v.cols;
      // Codewords; qmoe-g4: tokens; qmoe-p5: packed bytes.
      const int64_t codes = v.has_codes() ? static_cast<int64_t>(v.codes.size())
                            : v.codec == Codec::kG4
                                ? v.group_offsets[v.group_offsets.size() - 2] - v.group_offsets[0]
                                : static_cast<int64_t>(v.packed.size());
      const double bpw = v.bits_per_weight();
      ++comp_n;
      comp_weights += w;
      comp_bytes += v.compressed_bytes();
      comp_codes += codes;
      comp_input += w * dtype_size(e->original_dtype);
      const auto ci = static_cast<size_t>(v.codec);
      ++per_codec[ci];
      if (v.has_dictionary() && dictionaries[ci].insert(v.dictionary_id).second)
        comp_bytes += static_cast<int64_t>(v.dictionary.size_bytes());
      const ExpertStat* st = stat_of(name);
      std::string block;
      int64_t ex;
      int which;
      if (parse_expert(name, block, ex, which)) {
        expert_weights += w;
        expert_bytes += v.compressed_bytes();
        auto& b = blocks[block];
        ++b.matrices;
        b.weights += w;
        b.bytes += v.compressed_bytes();
        if (st && st->loss >= 0) {
          b.loss += st->loss;
          ++b.loss_n;
        }
        if (st && st->zero_fraction >= 0) {
          b.zeros += st->zero_fraction;
          ++b.zeros_n;
        }
      }
      if (a.json_out) {
        json t = {{"name", name},
                  {"shape", e->original_shape},
                  {"dtype", std::string(dtype_name(e->original_dtype))},
                  {"codec", std::string(codec_name(v.codec))},
                  {"codes", codes},
                  {"bytes", v.compressed_bytes()},
                  {"bits_per_weight", bpw},
                  {"shard", std::filesystem::path(e->shard).filename().string()}};
        if (st) {
          if (st->zero_fraction >= 0) t["zero_fraction"] = st->zero_fraction;
          if (st->loss >= 0) t["gptq_loss"] = st->loss;
          if (st->output_loss >= 0) t["gptq_output_loss"] = st->output_loss;
          if (st->tokens >= 0) t["tokens"] = st->tokens;
          if (st->fallback) t["rounded_to_nearest"] = true;
          if (st->below_target) t["below_size_target"] = true;
        }
        jt.push_back(t);
      } else if (!a.summary) {
        char loss[32] = "";
        if (st && st->loss >= 0)
          std::snprintf(loss, sizeof loss, "%.4g%s", st->loss, st->fallback ? "*" : "");
        std::printf("%-64s %-12s %-8s %10lld %9.4f %8s\n", name.c_str(),
                    shape_str(e->original_shape).c_str(), std::string(codec_name(v.codec)).c_str(),
                    static_cast<long long>(codes), bpw, loss);
      }
    } else if (const DenseEntry* d = c.find_dense(name)) {
      ++dense_n;
      dense_bytes += static_cast<int64_t>(d->bytes.size());
      if (a.json_out) {
        jt.push_back({{"name", name},
                      {"shape", d->shape},
                      {"dtype", std::string(dtype_name(d->dtype))},
                      {"bytes", d->bytes.size()},
                      {"shard", std::filesystem::path(d->shard).filename().string()}});
      } else if (!a.summary) {
        std::printf("%-64s %-12s %-8s %10s %9s\n", name.c_str(), shape_str(d->shape).c_str(),
                    std::string(dtype_name(d->dtype)).c_str(), "-", "-");
      }
    }
  }
  auto bpw = [](int64_t bytes, int64_t w) {
    return w ? 8.0 * static_cast<double>(bytes) / static_cast<double>(w) : 0.0;
  };
  // Blocks in model order: encoder then decoder, by block number.
  std::vector<std::string> order;
  for (const auto& [k, b] : blocks) order.push_back(k);
  std::sort(order.begin(), order.end(), [](const std::string& x, const std::string& y) {
    auto key = [](const std::string& s) {
      return std::make_pair(s.rfind("decoder", 0) == 0 ? 1 : 0,
                            std::stoll(s.substr(s.rfind('.') + 1)));
    };
    return key(x) < key(y);
  });

  if (a.json_out) {
    json jb = json::array();
    for (const auto& k : order) {
      const auto& b = blocks[k];
      json x = {{"block", k},
                {"matrices", b.matrices},
                {"weights", b.weights},
                {"bytes", b.bytes},
                {"bits_per_expert_weight", bpw(b.bytes, b.weights)}};
      if (b.zeros_n) x["zero_fraction"] = b.zeros / static_cast<double>(b.zeros_n);
      if (b.loss_n) x["mean_gptq_loss"] = b.loss / static_cast<double>(b.loss_n);
      jb.push_back(x);
    }
    json files = json::array();
    for (const auto& f : c.files()) files.push_back(f.string());
    json out = {{"path", a.input},
                {"format", meta("format")},
                {"format_version", meta("format_version")},
                {"quantizer", meta("quantizer")},
                {"files", files},
                {"tensors", jt},
                {"blocks", jb},
                {"totals",
                 {{"compressed_matrices", comp_n},
                  {"compressed_weights", comp_weights},
                  {"compressed_bytes", comp_bytes},
                  {"codes", comp_codes},
                  {"bits_per_weight", bpw(comp_bytes, comp_weights)},
                  {"expert_weights", expert_weights},
                  {"bits_per_expert_weight", bpw(expert_bytes, expert_weights)},
                  {"dense_tensors", dense_n},
                  {"dense_bytes", dense_bytes},
                  {"container_bytes", container_bytes}}}};
    for (const CodecTraits& t : kCodecs) {
      // "qmoe_v1": 3, ...; "qmoe_v2_dictionaries": 1, ... for the codecs with fitted dictionaries.
      std::string key(t.name);
      key[4] = '_';
      out["totals"][key] = per_codec[static_cast<size_t>(t.codec)];
      if (t.has_fitted_dictionary())
        out["totals"][key + "_dictionaries"] = dictionaries[static_cast<size_t>(t.codec)].size();
    }
    if (input_bytes > 0) {
      out["totals"]["input_bytes"] = input_bytes;
      out["totals"]["compression_ratio"] =
          static_cast<double>(input_bytes) / static_cast<double>(container_bytes);
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  if (!order.empty()) {
    std::printf("\n%-24s %9s %12s %14s %8s %12s\n", "block", "matrices", "weights", "bits/expert w",
                "zeros", "mean loss");
    for (const auto& k : order) {
      const auto& b = blocks[k];
      char zeros[16] = "-", loss[24] = "-";
      if (b.zeros_n)
        std::snprintf(zeros, sizeof zeros, "%.2f%%",
                      100.0 * b.zeros / static_cast<double>(b.zeros_n));
      if (b.loss_n)
        std::snprintf(loss, sizeof loss, "%.5g", b.loss / static_cast<double>(b.loss_n));
      std::printf("%-24s %9lld %12lld %14.4f %8s %12s\n", k.c_str(),
                  static_cast<long long>(b.matrices), static_cast<long long>(b.weights),
                  bpw(b.bytes, b.weights), zeros, loss);
    }
  }
  std::printf("\ncontainer: %s, %zu file(s), %s", a.input.c_str(), c.files().size(),
              human_bytes(static_cast<double>(container_bytes)).c_str());
  if (!meta("quantizer").empty()) std::printf(", quantizer %s", meta("quantizer").c_str());
  if (const auto t = c.target()) std::printf(", target %s", std::string(target_name(*t)).c_str());
  std::printf("\n");
  std::printf("compressed: %lld matrices (%s), %lld weights, %lld codes, %s, %.4f bits/weight\n",
              static_cast<long long>(comp_n), codec_counts(per_codec).c_str(),
              static_cast<long long>(comp_weights), static_cast<long long>(comp_codes),
              human_bytes(static_cast<double>(comp_bytes)).c_str(), bpw(comp_bytes, comp_weights));
  if (expert_weights > 0)
    std::printf("experts: %lld weights, %.4f bits per expert weight (originally %s)\n",
                static_cast<long long>(expert_weights), bpw(expert_bytes, expert_weights),
                human_bytes(static_cast<double>(comp_input)).c_str());
  std::printf("uncompressed: %lld tensors, %s\n", static_cast<long long>(dense_n),
              human_bytes(static_cast<double>(dense_bytes)).c_str());
  if (input_bytes > 0)
    std::printf("size: %s against %s input (%.2fx smaller)\n",
                human_bytes(static_cast<double>(container_bytes)).c_str(),
                human_bytes(static_cast<double>(input_bytes)).c_str(),
                static_cast<double>(input_bytes) / static_cast<double>(container_bytes));
  return 0;
}

Registrar inspect_cmd("inspect", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<InspectArgs>();
  app.description(
      "Show a container's tensors, codecs, bits per weight per tensor, per block and in total");
  app.add_option("input", a->input, "container (.safetensors file, index .json or directory)")
      ->required();
  app.add_flag("--json", a->json_out, "machine-readable output");
  app.add_flag("--summary", a->summary, "per block and totals only");
  return [a] { return run_inspect(*a); };
});

}  // namespace
}  // namespace qmoe::cli
