// Safe opening of input files, the strict JSON check, and the SIGBUS handler for mapped files.
#include "qmoe/format/file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "file_internal.h"
#include "qmoe/format/error.h"

namespace qmoe {

namespace {

std::string errno_text(const std::string& file, const char* what) {
  return error_context(file, "", std::string(what) + ": " + std::strerror(errno));
}

const char* file_kind(mode_t m) {
  if (S_ISFIFO(m)) return "a named pipe";
  if (S_ISDIR(m)) return "a directory";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a plain file";
}

}  // namespace

// ---- RegularFile --------------------------------------------------------------------------------

RegularFile RegularFile::open(const std::filesystem::path& path) {
  const std::string file = path.string();
  // stat() first, so that a device is never opened (opening one can have effects of its own);
  // O_NONBLOCK in case the path becomes a FIFO in between: opening one for reading then returns
  // at once instead of waiting for a writer, and fstat() below refuses it.
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) throw FormatError(errno_text(file, "cannot open"));
  if (!S_ISREG(st.st_mode)) {
    throw FormatError(
        error_context(file, "", std::string("not a regular file (") + file_kind(st.st_mode) + ")"));
  }
  RegularFile f;
  f.fd_ = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (f.fd_ < 0) throw FormatError(errno_text(file, "cannot open"));
  if (::fstat(f.fd_, &st) != 0) throw FormatError(errno_text(file, "cannot stat"));
  if (!S_ISREG(st.st_mode)) {
    throw FormatError(
        error_context(file, "", std::string("not a regular file (") + file_kind(st.st_mode) + ")"));
  }
  // Regular files ignore O_NONBLOCK; clear it anyway so that the descriptor behaves as usual.
  const int flags = ::fcntl(f.fd_, F_GETFL);
  if (flags >= 0) (void)::fcntl(f.fd_, F_SETFL, flags & ~O_NONBLOCK);
  f.size_ = static_cast<int64_t>(st.st_size);
  return f;
}

RegularFile::RegularFile(RegularFile&& o) noexcept : fd_(o.fd_), size_(o.size_) {
  o.fd_ = -1;
}

RegularFile& RegularFile::operator=(RegularFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    size_ = o.size_;
    o.fd_ = -1;
  }
  return *this;
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

std::string read_regular_file(const std::filesystem::path& path, int64_t max_bytes) {
  const std::string file = path.string();
  const RegularFile f = RegularFile::open(path);
  if (f.size() > max_bytes) {
    throw FormatError(error_context(file, "",
                                    std::to_string(f.size()) + " bytes, larger than the limit of " +
                                        std::to_string(max_bytes)));
  }
  std::string out;
  out.reserve(static_cast<size_t>(f.size()));
  char buf[65536];
  for (;;) {
    const ssize_t r = ::read(f.fd(), buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw FormatError(errno_text(file, "read failed"));
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
    // The file may grow after fstat(): the bound holds for what is read.
    if (static_cast<int64_t>(out.size()) > max_bytes) {
      throw FormatError(
          error_context(file, "", "larger than the limit of " + std::to_string(max_bytes)));
    }
  }
  return out;
}

// ---- strict JSON --------------------------------------------------------------------------------

namespace {

// Deepest JSON nesting a safetensors header or index needs is 3, a config.json 2; anything much
// deeper is hostile.
constexpr int kMaxJsonDepth = 16;

// SAX pass: rejects duplicate keys (which nlohmann would silently collapse, and which make a
// header ambiguous), U+0000 in strings and keys (names are C strings in many tools: "a\u0000b"
// would read as "a" there), and excessive nesting.
class StructureCheck : public nlohmann::json_sax<nlohmann::json> {
 public:
  std::string error;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t& s) override { return no_nul(s, "string"); }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return depth_ok();
  }
  bool key(string_t& k) override {
    if (!no_nul(k, "object key")) return false;
    if (!keys_.back().insert(k).second) {
      error = "duplicate key \"" + k + "\"";
      return false;
    }
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    keys_.emplace_back();  // arrays have no keys; the entry only counts depth
    return depth_ok();
  }
  bool end_array() override {
    keys_.pop_back();
    return true;
  }
  bool parse_error(std::size_t pos, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    error = "malformed JSON at byte " + std::to_string(pos) + " (" + ex.what() + ")";
    return false;
  }

 private:
  std::vector<std::set<std::string>> keys_;
  bool depth_ok() {
    if (keys_.size() > static_cast<size_t>(kMaxJsonDepth)) {
      error = "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
      return false;
    }
    return true;
  }
  bool no_nul(const std::string& s, const char* what) {
    if (s.find('\0') == std::string::npos) return true;
    std::string shown = s;
    for (char& c : shown) {
      if (c == '\0') c = '?';
    }
    error = std::string("a ") + what + " holds U+0000 (\"" + shown.substr(0, 64) + "\")";
    return false;
  }
};

}  // namespace

void check_json_text(std::string_view text, const std::string& context) {
  // nlohmann's parser skips a UTF-8 byte-order mark; JSON text has none (RFC 8259 section 8.1),
  // and other readers (Python's json, the safetensors reference) refuse it.
  if (text.substr(0, 3) == "\xEF\xBB\xBF") {
    throw FormatError(error_context(context, "",
                                    "malformed JSON: starts with a UTF-8 byte-order mark "
                                    "(EF BB BF), which is not JSON whitespace"));
  }
  // nlohmann's lexer takes a NUL byte for the end of input and would ignore what follows it; a
  // NUL is never valid JSON text (raw control characters are not allowed even inside strings).
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    throw FormatError(
        error_context(context, "", "malformed JSON: NUL byte at byte " + std::to_string(nul)));
  }
  StructureCheck check;
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &check,
                                            nlohmann::json::input_format_t::json, true, false);
  if (!ok) {
    throw FormatError(
        error_context(context, "", check.error.empty() ? "malformed JSON" : check.error));
  }
}

// ---- the SIGBUS handler -------------------------------------------------------------------------

// One registration, read by the signal handler without locks. Slots are allocated once and never
// freed (a process has as many as it ever had mappings and temporary files open at the same time)
// and are reused through `busy`. A slot is published by storing `live` (release) after its fields;
// the handler reads `live` (acquire) first.
struct FaultSlot {
  std::atomic<bool> busy{false};
  std::atomic<bool> live{false};
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<FaultSlot*> next{nullptr};
  char path[4096] = {};
};

namespace internal {
namespace {

std::atomic<FaultSlot*> g_mappings{nullptr};
std::atomic<FaultSlot*> g_temp_files{nullptr};

FaultSlot* claim(std::atomic<FaultSlot*>& head, const std::string& path) {
  FaultSlot* s = nullptr;
  for (FaultSlot* t = head.load(std::memory_order_acquire); t != nullptr;
       t = t->next.load(std::memory_order_acquire)) {
    bool expected = false;
    if (t->busy.compare_exchange_strong(expected, true)) {
      s = t;
      break;
    }
  }
  if (s == nullptr) {
    s = new FaultSlot;  // never freed: the handler may be walking the list at any time
    s->busy.store(true);
    FaultSlot* h = head.load(std::memory_order_acquire);
    do {
      s->next.store(h, std::memory_order_relaxed);
    } while (!head.compare_exchange_weak(h, s, std::memory_order_acq_rel));
  }
  const size_t n = std::min(path.size(), sizeof(s->path) - 1);
  std::memcpy(s->path, path.data(), n);
  s->path[n] = '\0';
  return s;
}

void release(FaultSlot* s) {
  if (s == nullptr) return;
  s->live.store(false, std::memory_order_release);
  s->begin.store(0, std::memory_order_relaxed);
  s->end.store(0, std::memory_order_relaxed);
  s->busy.store(false, std::memory_order_release);
}

}  // namespace

MappedRegion::MappedRegion(const void* p, size_t n, const std::string& path)
    : slot_(claim(g_mappings, path)) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  slot_->begin.store(b, std::memory_order_relaxed);
  slot_->end.store(b + n, std::memory_order_relaxed);
  slot_->live.store(true, std::memory_order_release);
}

MappedRegion::~MappedRegion() {
  release(slot_);
}

namespace {

struct sigaction g_previous {};
std::atomic<bool> g_installed{false};
int g_exit_code = 2;

void remove_temp_files() {
  for (const FaultSlot* s = g_temp_files.load(std::memory_order_acquire); s != nullptr;
       s = s->next.load(std::memory_order_acquire)) {
    if (s->live.load(std::memory_order_acquire)) ::unlink(s->path);
  }
}

void write_str(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = ::write(STDERR_FILENO, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

// Only async-signal-safe calls: loads, unlink(), write(), sigaction(), _exit().
void on_sigbus(int sig, siginfo_t* info, void* context) {
  const auto addr = reinterpret_cast<uintptr_t>(info != nullptr ? info->si_addr : nullptr);
  const FaultSlot* hit = nullptr;
  for (const FaultSlot* s = g_mappings.load(std::memory_order_acquire); s != nullptr;
       s = s->next.load(std::memory_order_acquire)) {
    if (s->live.load(std::memory_order_acquire) && addr >= s->begin.load() &&
        addr < s->end.load()) {
      hit = s;
      break;
    }
  }
  if (hit == nullptr) {
    // Not ours: whoever handled SIGBUS before, or the default action when the faulting
    // instruction runs again.
    if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
    if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
        g_previous.sa_handler != nullptr) {
      g_previous.sa_handler(sig);
      return;
    }
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGBUS, &dfl, nullptr);
    return;
  }
  remove_temp_files();
  write_str("qmoe: error: ");
  write_str(hit->path);
  write_str(
      ": the mapped file could not be read any more (truncated or rewritten by another program "
      "while in use, or an I/O error of the device); stopping, without output\n");
  ::_exit(g_exit_code);
}

// SIGINT, SIGTERM, SIGHUP: the temporary files go, then the signal's own action ends the process.
void on_interrupt(int sig) {
  remove_temp_files();
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

std::atomic<bool> g_interrupt_installed{false};

}  // namespace
}  // namespace internal

TempFileMark::TempFileMark(const std::string& path)
    : slot_(internal::claim(internal::g_temp_files, path)) {
  slot_->live.store(true, std::memory_order_release);
}

TempFileMark& TempFileMark::operator=(TempFileMark&& o) noexcept {
  if (this != &o) {
    release();
    slot_ = o.slot_;
    o.slot_ = nullptr;
  }
  return *this;
}

void TempFileMark::release() {
  internal::release(slot_);
  slot_ = nullptr;
}

void install_interrupt_cleanup() {
  if (internal::g_interrupt_installed.exchange(true)) return;
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    ::sigaction(sig, nullptr, &old);
    // An ignored signal stays ignored (nohup, a background job of a non-interactive shell).
    if ((old.sa_flags & SA_SIGINFO) == 0 && old.sa_handler == SIG_IGN) continue;
    struct sigaction sa {};
    sa.sa_handler = internal::on_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(sig, &sa, nullptr);
  }
}

void install_mapped_file_fault_handler(int exit_code) {
  internal::g_exit_code = exit_code;
  if (internal::g_installed.exchange(true)) return;
  struct sigaction sa {};
  sa.sa_sigaction = internal::on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, &internal::g_previous);
}

void write_file_atomic(const std::filesystem::path& path, std::string_view data) {
  const std::string tmp = path.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(internal::io_error(path.string(), "cannot create a temporary file"));
  TempFileMark mark(tmp);  // removed if the run is interrupted
  try {
    internal::write_all(fd, data.data(), data.size(), tmp);
    if (::fsync(fd) != 0) throw Error(internal::io_error(tmp, "fsync failed"));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string msg = internal::io_error(path.string(), "cannot finish writing");
    ::unlink(tmp.c_str());
    throw Error(msg);
  }
  mark.release();
}

}  // namespace qmoe
