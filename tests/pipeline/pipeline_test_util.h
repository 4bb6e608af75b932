// Helpers for the pipeline tests: temporary folders, running the qmoe CLI as a child process
// (optionally killing it with SIGKILL after a delay), reading files.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace qmoe::test {

namespace fs = std::filesystem;

// A fresh folder under the system temp folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("qmoe_pipeline_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

inline std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void write_file(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}

// Every file of a container (one file, or the files of a directory) by name -> contents.
inline std::map<std::string, std::string> container_bytes(const fs::path& p) {
  std::map<std::string, std::string> r;
  if (fs::is_directory(p)) {
    for (const auto& e : fs::directory_iterator(p))
      r[e.path().filename().string()] = read_file(e.path());
  } else if (fs::exists(p)) {
    r["(single file)"] = read_file(p);
  }
  return r;
}

// "" when equal, else which file differs and where.
inline std::string diff(const std::map<std::string, std::string>& a,
                        const std::map<std::string, std::string>& b) {
  if (a.size() != b.size())
    return "different file counts: " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  for (const auto& [name, x] : a) {
    auto it = b.find(name);
    if (it == b.end()) return "file " + name + " missing";
    const std::string& y = it->second;
    if (x == y) continue;
    size_t i = 0;
    while (i < x.size() && i < y.size() && x[i] == y[i]) ++i;
    return "file " + name + " differs at byte " + std::to_string(i) + " (sizes " +
           std::to_string(x.size()) + ", " + std::to_string(y.size()) + "): ..." +
           x.substr(i > 40 ? i - 40 : 0, 80) + "... vs ..." + y.substr(i > 40 ? i - 40 : 0, 80) +
           "...";
  }
  return "";
}

struct CliResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string output;   // stdout and stderr together
  int64_t max_rss = 0;  // bytes (ru_maxrss of the child)
  double seconds = 0;
};

// Runs the qmoe CLI with `args`. With kill_after_s >= 0 the child gets SIGKILL after that many
// seconds if it has not finished.
inline CliResult run_cli(const std::vector<std::string>& args, double kill_after_s = -1.0) {
  const fs::path log =
      fs::temp_directory_path() / ("qmoe_cli_" + std::to_string(::getpid()) + ".log");
  std::vector<std::string> all{QMOE_CLI};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  CliResult r;
  int status = 0;
  struct rusage ru {};
  if (kill_after_s >= 0) {
    for (;;) {
      const pid_t w = ::wait4(pid, &status, WNOHANG, &ru);
      if (w == pid) break;
      const double el =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (el >= kill_after_s) {
        ::kill(pid, SIGKILL);
        ::wait4(pid, &status, 0, &ru);
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  } else {
    ::wait4(pid, &status, 0, &ru);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.max_rss = static_cast<int64_t>(ru.ru_maxrss) * 1024;
  r.output = read_file(log);
  std::error_code ec;
  fs::remove(log, ec);
  return r;
}

}  // namespace qmoe::test
