// Subcommands of the `qmoe` tool. Each cli/cmd_*.cpp registers its subcommand with a static
// Registrar; main() builds the CLI11 app from the registry, so adding a command touches one file.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace qmoe::cli {

struct Command {
  std::string name;
  // Adds the subcommand to `app` and returns the function that runs it (its exit code).
  std::function<std::function<int()>(CLI::App& app)> setup;
};

std::vector<Command>& registry();

struct Registrar {
  Registrar(std::string name, std::function<std::function<int()>(CLI::App&)> setup) {
    registry().push_back({std::move(name), std::move(setup)});
  }
};

}  // namespace qmoe::cli
