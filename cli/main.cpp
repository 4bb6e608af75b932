#include <algorithm>
#include <csignal>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include <omp.h>

#include "command.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/gptq/hessian.h"
#if defined(QMOE_CLI_HAVE_MPI)
#include "qmoe/mpi/mpi_comm.h"
#endif

namespace qmoe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}

namespace {

// `qmoe --version`: the version and what this build and this machine run.
std::string version_text() {
  namespace cpu = qmoe::cpu;
  std::string levels;
  for (cpu::SimdLevel l : cpu::supported_simd_levels()) {
    levels += (levels.empty() ? "" : ", ") + std::string(cpu::simd_level_name(l));
  }
  // A level, or why there is none (an invalid QMOE_CPU_SIMD).
  auto level_of = [](auto&& get) {
    try {
      return std::string(get());
    } catch (const qmoe::Error& e) {
      return std::string("none (") + e.what() + ")";
    }
  };
  const std::string level = level_of([] { return cpu::simd_level_name(cpu::simd_level()); });
  std::string t = "qmoe " QMOE_VERSION "\n";
#if defined(QMOE_NATIVE_BUILD)
  t += "build: native (-march=native; runs only on CPUs like the one that built it)\n";
#else
  t += "build: portable (the platform's baseline instruction set)\n";
#endif
  t += "CPU decode kernels: " + level + " (this CPU: " + levels +
       "; QMOE_CPU_SIMD=scalar|avx2|avx512 overrides)\n";
  t += "GPTQ / Hessian product kernels: " + level_of([] { return qmoe::gptq_kernel(); }) + "\n";
  t += "OpenMP threads: " + std::to_string(omp_get_max_threads());
  return t;
}

}  // namespace
}  // namespace qmoe::cli

int main(int argc, char** argv) {
  using namespace qmoe::cli;
  // A mapped input truncated by another program while in use: a message naming the file and exit
  // code 2, as for every other error, instead of death by SIGBUS.
  qmoe::install_mapped_file_fault_handler(2);
  // Ctrl-C, kill: the temporary files of unfinished outputs go before the process does.
  qmoe::install_interrupt_cleanup();
  CLI::App app{"qmoe: sub-1-bit compression of Mixture-of-Experts weights"};
  app.require_subcommand(1);
  app.set_version_flag("--version", version_text,
                       "Print the version, the build and the CPU kernels in use, and exit");
  auto& cmds = registry();
  std::sort(cmds.begin(), cmds.end(),
            [](const Command& a, const Command& b) { return a.name < b.name; });
  std::map<CLI::App*, std::function<int()>> runners;
  for (auto& c : cmds) {
    auto* sub = app.add_subcommand(c.name);
    runners[sub] = c.setup(*sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (argc > 1 && std::string_view(argv[1]) == "generate")
    std::fprintf(stderr,
                 "qmoe: note: `qmoe generate` is now `qmoe synth` (synthetic checkpoints); the "
                 "old name goes in the next release\n");
  // Under MPI, a failing process says which one it is and stops the whole job: the others may be
  // waiting for it in a collective.
  auto fail = [](const char* what) {
#if defined(QMOE_CLI_HAVE_MPI)
    if (qmoe::mpi::launched() && qmoe::mpi::started()) {
      std::signal(SIGTERM, SIG_DFL);  // this process reports its own error, nothing more
      const auto w = qmoe::mpi::world();
      std::fprintf(stderr, "qmoe: error (process %d of %d): %s\n", w->rank(), w->size(), what);
      std::fflush(stderr);
      qmoe::mpi::abort_all(2);
    }
#endif
    std::fprintf(stderr, "qmoe: error: %s\n", what);
    return 2;
  };
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub)();
  } catch (const qmoe::Error& e) {
    return fail(e.what());
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  return 0;
}
