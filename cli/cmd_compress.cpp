// qmoe compress: a Switch Transformers checkpoint -> a qmoe container (switch/compress.h).
#include <unistd.h>

#include <csignal>
#include <cstring>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "command.h"
#include "qmoe/core/memory.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/format/matrix.h"
#include "qmoe/switch/compress.h"
#include "ternary_flags.h"
#include "util.h"
#if defined(QMOE_CLI_HAVE_MPI)
#include "qmoe/mpi/mpi_comm.h"
#endif

namespace qmoe::cli {
namespace {

struct CompressArgs {
  std::string checkpoint, output, hessians, calib_tokens, codec = "auto", target = "any";
  bool calib_independent = false;
  bool rtn = false, resume = false, progress = false, cast_bf16 = false, no_disk_check = false,
       actorder = false;
  int threads = 0;
  std::string max_memory = "0", shard_size = "0", report;
  double percdamp = 0.1;
  int64_t blocksize = 128;
  TernaryFlags ternary;
};

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = std::lround(s);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

// One line, redrawn in place, e.g.
//   [#####      ] 96/192 matrices  experts encoder.block.5  812 tok/s  3.1 experts/s  ETA 0:15
// The ETA weighs the forward (token-blocks left at the forward's rate) and the experts (matrices
// left at their rate) by what this run measured of each so far.
void draw_bar(const sw::CompressProgress& p) {
  const int width = 24;
  const double frac = p.total ? static_cast<double>(p.done) / static_cast<double>(p.total) : 1.0;
  const int fill = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(fill), '#');
  bar.resize(width, ' ');
  if (p.phase == "assemble") {
    std::fprintf(stderr, "\r[%s] %lld/%lld matrices  writing the container: %-48.48s", bar.c_str(),
                 static_cast<long long>(p.done), static_cast<long long>(p.total),
                 p.current.c_str());
    std::fflush(stderr);
    return;
  }
  const int64_t this_run = p.done - p.resumed;
  const double mrate = p.seconds > 0 ? static_cast<double>(this_run) / p.seconds : 0.0;
  const double trate = p.seconds > 0 ? static_cast<double>(p.tokens) / p.seconds : 0.0;
  // Time left: the larger of the two extrapolations (they run one after the other per block, so
  // either one alone underestimates; the larger is the honest lower bound).
  double eta = NAN;
  if (this_run > 0) eta = static_cast<double>(p.total - p.done) / mrate;
  if (p.total_tokens > 0 && p.tokens > 0) {
    const double t = static_cast<double>(p.total_tokens - p.tokens) / trate;
    eta = std::isfinite(eta) ? std::max(eta, t) : t;
  }
  if (p.total_tokens > 0) {
    std::fprintf(stderr,
                 "\r[%s] %lld/%lld matrices  %-8s %-18s  %6.0f tok/s  %.2f experts/s  ETA %s   ",
                 bar.c_str(), static_cast<long long>(p.done), static_cast<long long>(p.total),
                 p.step.c_str(), p.current.c_str(), trate, mrate / 2, duration(eta).c_str());
  } else {
    std::fprintf(stderr, "\r[%s] %lld/%lld matrices (%lld experts)  %.2f experts/s  ETA %s  %-18s",
                 bar.c_str(), static_cast<long long>(p.done), static_cast<long long>(p.total),
                 static_cast<long long>(p.done / 2), mrate / 2, duration(eta).c_str(),
                 p.current.c_str());
  }
  std::fflush(stderr);
}

// The block loop's phases as a table and as JSON (--report).
struct PhaseRow {
  const char* name;
  const sw::PhaseStats* p;
};

std::vector<PhaseRow> phase_rows(const sw::LoopReport& r) {
  return {{"load", &r.load},      {"forward", &r.forward}, {"hessians", &r.hessians},
          {"gptq", &r.gptq},      {"encode", &r.encode},   {"write", &r.write},
          {"outputs", &r.outputs}};
}

// Wall-clock equivalent of a phase: thread-seconds spread over the loop's threads.
double wall_of(const sw::PhaseStats& p, int threads) {
  return p.thread_seconds && threads > 0 ? p.seconds / threads : p.seconds;
}

void print_phases(const sw::CompressSummary& s) {
  const int th = s.loop.threads;
  std::printf("%-10s %9s %9s %11s %9s %13s\n", "phase", "seconds", "cpu s", "GFLOP", "GFLOP/s",
              "GFLOP/cpu-s");
  for (const auto& row : phase_rows(s.loop)) {
    const double w = wall_of(*row.p, th);
    const double rate = w > 0 ? row.p->flops / w * 1e-9 : 0.0;
    const double crate = row.p->cpu_seconds > 0 ? row.p->flops / row.p->cpu_seconds * 1e-9 : 0.0;
    std::printf("%-10s %9.2f %9.2f %11.1f %9.1f %13.1f\n", row.name, w, row.p->cpu_seconds,
                row.p->flops * 1e-9, rate, crate);
  }
  std::printf("%-10s %10.2f   (assembly of the container)\n", "assemble", s.assemble_seconds);
}

void write_report(const std::string& path, const sw::CompressSummary& s, const std::string& cmd) {
  nlohmann::json j;
  j["command"] = cmd;
  j["threads"] = s.loop.threads;
  j["quantizer"] = s.quantizer;
  j["seconds"] = {{"total", s.total_seconds},
                  {"compress", s.compress_seconds},
                  {"assemble", s.assemble_seconds}};
  for (const auto& row : phase_rows(s.loop)) {
    const double w = wall_of(*row.p, s.loop.threads);
    j["phases"][row.name] = {
        {"seconds", w},
        {"thread_seconds", row.p->thread_seconds ? row.p->seconds : 0.0},
        {"cpu_seconds", row.p->cpu_seconds},
        {"flops", row.p->flops},
        {"gflops_per_s", w > 0 ? row.p->flops / w * 1e-9 : 0.0},
        {"gflops_per_cpu_s",
         row.p->cpu_seconds > 0 ? row.p->flops / row.p->cpu_seconds * 1e-9 : 0.0}};
  }
  j["calibration"] = {{"pairs", s.calibration_pairs},
                      {"tokens", s.calibration_tokens},
                      {"forward_token_blocks", s.loop.forward_tokens},
                      {"hessian_tokens", s.loop.hessian_tokens},
                      {"routed_token_blocks", s.loop.routed_tokens}};
  j["processes"] = {{"count", s.ranks.size()},
                    {"bytes_sent", s.loop.bytes_sent},
                    {"bytes_sent_per_routed_token",
                     s.loop.routed_tokens > 0 ? static_cast<double>(s.loop.bytes_sent) /
                                                    static_cast<double>(s.loop.routed_tokens)
                                              : 0.0}};
  for (size_t r = 0; r < s.ranks.size(); ++r) {
    nlohmann::json pr;
    for (const auto& row : phase_rows(s.ranks[r]))
      pr[row.name] = {{"seconds", row.p->seconds},
                      {"cpu_seconds", row.p->cpu_seconds},
                      {"flops", row.p->flops}};
    j["processes"]["each"].push_back({{"rank", r},
                                      {"threads", s.ranks[r].threads},
                                      {"matrices", s.ranks[r].matrices},
                                      {"seconds", s.ranks[r].seconds},
                                      {"bytes_sent", s.ranks[r].bytes_sent},
                                      {"peak_rss_bytes", s.ranks[r].peak_rss},
                                      {"phases", pr}});
  }
  j["experts"] = {{"matrices", s.expert_matrices},
                  {"compressed_this_run", s.loop.matrices},
                  {"resumed", s.resumed_matrices},
                  {"weights", s.expert_weights},
                  {"bits_per_weight", s.bits_per_expert_weight()},
                  {"zero_fraction", s.mean_zero_fraction}};
  j["memory"] = {{"peak_rss_bytes", peak_resident_bytes()},
                 {"budget_bytes", s.memory_budget},
                 {"needed_bytes", s.loop.memory_needed},
                 {"over_cap_blocks", s.loop.over_cap_blocks},
                 {"peak_in_flight_estimate_bytes", s.loop.peak_in_flight}};
  j["bytes"] = {{"input", s.input_bytes}, {"output", s.output_bytes}};
  write_file_atomic(path, j.dump(2) + "\n");
}

// Under MPI: the block each process is in, for the line it prints when the job is stopped from
// outside (mpirun sends SIGTERM to every process when one of them dies).
char g_stop_line[512] = "";

extern "C" void on_sigterm(int) {
  if (g_stop_line[0]) {
    const ssize_t n = ::write(STDERR_FILENO, g_stop_line, std::strlen(g_stop_line));
    (void)n;
  }
  std::_Exit(3);
}

void set_stop_line(const std::shared_ptr<sw::Comm>& comm, const std::string& where) {
  std::snprintf(g_stop_line, sizeof g_stop_line,
                "qmoe: process %d of %d stopped in %s: the job was aborted (another process "
                "failed or was killed)\n",
                comm->rank(), comm->size(), where.c_str());
}

int run_compress(const CompressArgs& a) {
  Stopwatch clock;
  std::shared_ptr<sw::Comm> comm;
#if defined(QMOE_CLI_HAVE_MPI)
  if (mpi::launched()) {
    comm = mpi::world();
    set_stop_line(comm, "the checks before any work");
    std::signal(SIGTERM, on_sigterm);
  }
#endif
  const bool lead = !comm || comm->rank() == 0;
  sw::CompressOptions opt;
  opt.comm = comm;
  opt.threads = a.threads;
  opt.max_memory = parse_bytes(a.max_memory);
  opt.shard_size = parse_bytes(a.shard_size);
  opt.resume = a.resume;
  opt.cast_bf16 = a.cast_bf16;
  opt.check_disk = !a.no_disk_check;
  opt.percdamp = a.percdamp;
  opt.blocksize = a.blocksize;
  opt.actorder = a.actorder;
  // GPTQ when Hessians come from a file or from calibration (else round to nearest).
  const bool gptq = !a.rtn && (!a.hessians.empty() || !a.calib_tokens.empty());
  apply_ternary_flags(a.ternary, gptq, opt.ternary, opt.rate, opt.actorder);
  opt.codec = parse_codec_option(a.codec);
  opt.target = parse_target_option(a.target);
  if (a.rtn && (!a.hessians.empty() || !a.calib_tokens.empty()))
    throw InvalidArgument("--rtn excludes --hessians and --calib-tokens");
  if (!a.hessians.empty() && !a.calib_tokens.empty())
    throw InvalidArgument("--hessians and --calib-tokens exclude each other");
  std::unique_ptr<sw::HessianProvider> hess;
  if (!a.hessians.empty()) {
    hess = sw::open_hessian_file(a.hessians);
    opt.hessians = hess.get();
  } else if (!a.calib_tokens.empty()) {
    opt.calib_tokens = a.calib_tokens;
    opt.sequential = !a.calib_independent;
  }
  const bool bar = lead && (a.progress || ::isatty(STDERR_FILENO));
  opt.progress = [bar, comm](const sw::CompressProgress& p) {
    if (comm) set_stop_line(comm, p.current.empty() ? p.phase : p.current);
    if (bar) draw_bar(p);
  };
  if (lead)
    opt.note = [bar](const std::string& s) {
      if (bar) std::fprintf(stderr, "\r\033[K");
      std::printf("note: %s\n", s.c_str());
      std::fflush(stdout);
    };

  opt.planned = [&](const sw::CompressPlan& plan) {
    std::printf("checkpoint %s: %zu expert matrices, %lld other tensors, %s\n",
                a.checkpoint.c_str(), plan.experts.size(),
                static_cast<long long>(plan.passthrough_tensors),
                human_bytes(static_cast<double>(plan.input_bytes)).c_str());
    std::printf("disk: needs at most %s (work files, container, writer's staging copy), %s free\n",
                human_bytes(static_cast<double>(plan.disk_needed)).c_str(),
                human_bytes(static_cast<double>(plan.disk_free)).c_str());
    if (hess) {
      std::printf("quantizer: GPTQ ternary, Hessians from %s\n", hess->describe().c_str());
    } else if (!a.calib_tokens.empty()) {
      std::printf("quantizer: GPTQ ternary, Hessians from the calibration tokens %s (%s)\n",
                  a.calib_tokens.c_str(),
                  a.calib_independent
                      ? "every block from the original model"
                      : "sequential: each block after the compressed ones before it");
    } else {
      std::printf(
          "quantizer: round-to-nearest ternary (no Hessians given; recorded as \"rtn\" in the "
          "output)\n");
    }
    std::fflush(stdout);
  };

  if (comm && lead)
    std::printf(
        "processes: %s; each runs its share of the calibration pairs and the experts it "
        "owns\n",
        comm->describe().c_str());
  const sw::CompressSummary s = sw::compress_checkpoint(a.checkpoint, a.output, opt);
  if (bar) std::fprintf(stderr, "\n");
  if (!lead) return 0;

  const double experts = static_cast<double>(s.expert_matrices) / 2.0;
  const double fresh = static_cast<double>(s.expert_matrices - s.resumed_matrices) / 2.0;
  std::printf("%-24s %10s %12s %10s\n", "block", "matrices", "weights", "bits/w");
  for (const auto& b : s.blocks)
    std::printf("%-24s %10lld %12lld %10.4f\n", b.block.c_str(), static_cast<long long>(b.matrices),
                static_cast<long long>(b.weights), b.bits_per_weight());
  std::printf(
      "experts: %lld matrices (%s), %lld weights, %.2f%% zeros, %s -> %s, %.4f bits per "
      "expert weight\n",
      static_cast<long long>(s.expert_matrices), codec_counts(s.codec_matrices).c_str(),
      static_cast<long long>(s.expert_weights), 100.0 * s.mean_zero_fraction,
      human_bytes(static_cast<double>(s.expert_input_bytes)).c_str(),
      human_bytes(static_cast<double>(s.expert_compressed_bytes)).c_str(),
      s.bits_per_expert_weight());
  if (s.quantizer == "gptq" && s.fallback_matrices > 0)
    std::printf("gptq: %lld matrices saw no calibration token and were rounded to nearest\n",
                static_cast<long long>(s.fallback_matrices));
  if (s.below_target_matrices > 0)
    std::printf(
        "rate control: %lld matrices stayed below their size target (no rounding of theirs is "
        "larger; `qmoe inspect --json` marks them below_size_target): the mean is below "
        "--target-bits\n",
        static_cast<long long>(s.below_target_matrices));
  std::printf("container: %s (%zu file%s), %s; input %s (%.1fx smaller)\n", a.output.c_str(),
              s.files.size(), s.files.size() == 1 ? "" : "s",
              human_bytes(static_cast<double>(s.output_bytes)).c_str(),
              human_bytes(static_cast<double>(s.input_bytes)).c_str(),
              s.output_bytes
                  ? static_cast<double>(s.input_bytes) / static_cast<double>(s.output_bytes)
                  : 0.0);
  if (s.resumed_matrices > 0)
    std::printf("resumed: %lld matrices were finished by an earlier run\n",
                static_cast<long long>(s.resumed_matrices));
  std::printf("time: %.2f s (compress %.2f s: %.2f experts/s, %.1f M weights/s; assemble %.2f s)\n",
              clock.seconds(), s.compress_seconds,
              s.compress_seconds > 0 ? fresh / s.compress_seconds : 0.0,
              s.compress_seconds > 0
                  ? fresh * 2.0 * static_cast<double>(s.expert_weights) /
                        static_cast<double>(s.expert_matrices) / s.compress_seconds / 1e6
                  : 0.0,
              s.assemble_seconds);
  std::printf(
      "peak resident memory: %s",
      human_bytes(static_cast<double>(std::max(peak_resident_bytes(), s.loop.peak_rss))).c_str());
  if (s.ranks.size() > 1) std::printf(" (the most of any process)");
  if (opt.max_memory > 0)
    std::printf(" (cap %s)", human_bytes(static_cast<double>(opt.max_memory)).c_str());
  std::printf("\n");
  if (opt.max_memory > 0 && s.loop.over_cap_blocks > 0)
    std::printf(
        "memory: the cap was too small for %lld block%s: what was resident (the model's pieces "
        "and the calibration state) and the largest expert matrix alone need %s; those blocks "
        "ran one matrix at a time above the cap\n",
        static_cast<long long>(s.loop.over_cap_blocks), s.loop.over_cap_blocks == 1 ? "" : "s",
        human_bytes(static_cast<double>(s.loop.memory_needed)).c_str());
  if (s.calibration_pairs > 0)
    std::printf(
        "calibration: %lld pairs (%lld tokens), %lld token-blocks through the forward, "
        "%lld tokens in Hessians\n",
        static_cast<long long>(s.calibration_pairs), static_cast<long long>(s.calibration_tokens),
        static_cast<long long>(s.loop.forward_tokens),
        static_cast<long long>(s.loop.hessian_tokens));
  if (s.ranks.size() > 1)
    std::printf(
        "processes: %zu; %s sent between them (expert inputs and outputs), %.0f bytes per "
        "routed token and sparse block\n",
        s.ranks.size(), human_bytes(static_cast<double>(s.loop.bytes_sent)).c_str(),
        s.loop.routed_tokens > 0
            ? static_cast<double>(s.loop.bytes_sent) / static_cast<double>(s.loop.routed_tokens)
            : 0.0);
  print_phases(s);
  if (!a.report.empty()) write_report(a.report, s, "qmoe compress " + a.checkpoint);
  (void)experts;
  return 0;
}

Registrar compress_cmd("compress", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<CompressArgs>();
  app.description(
      "Compress a Switch Transformers checkpoint: every expert matrix ternarized (GPTQ with "
      "--hessians, else round "
      "to nearest) and encoded, every other tensor copied unchanged");
  app.add_option("checkpoint", a->checkpoint,
                 "Hugging Face checkpoint directory (config.json + safetensors)")
      ->required();
  app.add_option("-o,--output", a->output,
                 "output container (a directory when --shard-size is given)")
      ->required();
  app.add_option("--hessians", a->hessians, "Hessian accumulator file (format/HESSIANS.md): GPTQ");
  app.add_option("--calib-tokens", a->calib_tokens,
                 "calibration token file (format/TOKENS.md): GPTQ with Hessians from QMoE's "
                 "sequential calibration through the forward pass");
  app.add_flag("--calib-independent", a->calib_independent,
               "with --calib-tokens: every Hessian from the original model (no recomputation with "
               "compressed blocks)");
  app.add_flag("--rtn", a->rtn, "round to nearest (the default without --hessians)");
  app.add_option("--threads", a->threads,
                 "threads (0 = all); the output is the same for any value");
  app.add_option("--max-memory", a->max_memory, "cap on resident memory, e.g. 2G (0 = none)");
  app.add_option("--shard-size", a->shard_size,
                 "shard the output at about this size, e.g. 5G (0 = one file)");
  app.add_flag("--resume", a->resume, "continue an interrupted run from <output>.qmoe-work");
  app.add_flag("--progress", a->progress,
               "progress on stderr (phase, block, matrices, tokens/s, ETA) even when it is not a "
               "terminal");
  app.add_option("--report", a->report,
                 "write FILE.json: per-phase times, FLOP rates, calibration, sizes, peak memory");
  app.add_flag("--cast-bf16", a->cast_bf16,
               "store the F32/F16 tensors that are not experts as BF16");
  app.add_option("--codec", a->codec, codec_help());
  app.add_option("--target", a->target, kTargetHelp);
  app.add_option("--percdamp", a->percdamp, "GPTQ dampening, a fraction of the mean diagonal of H");
  app.add_option("--blocksize", a->blocksize, "GPTQ lazy-update block size (columns)");
  app.add_flag("--actorder", a->actorder, "GPTQ: columns in order of decreasing Hessian diagonal");
  add_ternary_flags(app, a->ternary);
  app.add_flag("--no-disk-check", a->no_disk_check,
               "start even if the free disk space looks too small");
  return [a] { return run_compress(*a); };
});

struct CheckArgs {
  std::string checkpoint, container;
  int threads = 0;
};

int run_check(const CheckArgs& a) {
  const sw::CheckSummary s = sw::check_compressed(a.checkpoint, a.container, a.threads);
  std::printf("check: %lld expert matrices (%lld weights) decoded",
              static_cast<long long>(s.expert_matrices), static_cast<long long>(s.expert_weights));
  if (s.exact_matrices == s.expert_matrices)
    std::printf(", every one exactly equal to the round-to-nearest ternarization of the original");
  std::printf("; %lld other tensors byte-identical\n",
              static_cast<long long>(s.passthrough_tensors));
  std::printf("check: ternary vs original weights: relative Frobenius error %.4f\n",
              s.relative_error);
  std::printf(
      "check: reference decode %.1f M weights/s per thread; %.2f s in all\n",
      s.decode_seconds > 0 ? static_cast<double>(s.expert_weights) / s.decode_seconds / 1e6 : 0.0,
      s.seconds);
  return 0;
}

Registrar check_cmd("check-compressed", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<CheckArgs>();
  app.description(
      "Check a container against its checkpoint: experts decode to the ternarized originals "
      "(round-to-nearest "
      "containers), other tensors byte-identical");
  app.add_option("checkpoint", a->checkpoint,
                 "the Hugging Face checkpoint directory it was compressed from")
      ->required();
  app.add_option("container", a->container, "the qmoe container")->required();
  app.add_option("--threads", a->threads, "threads (0 = all)");
  return [a] { return run_check(*a); };
});

}  // namespace
}  // namespace qmoe::cli
