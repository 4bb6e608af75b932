#include <algorithm>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>

#include "command.h"
#include "qmoe/format/error.h"

namespace qmoe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}
}  // namespace qmoe::cli

int main(int argc, char** argv) {
  using namespace qmoe::cli;
  CLI::App app{"qmoe: sub-1-bit compression of Mixture-of-Experts weights"};
  app.require_subcommand(1);
  auto& cmds = registry();
  std::sort(cmds.begin(), cmds.end(), [](const Command& a, const Command& b) { return a.name < b.name; });
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
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub)();
  } catch (const qmoe::Error& e) {
    std::fprintf(stderr, "qmoe: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qmoe: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
