// safetensors reader (mmap, validated before use) and atomic streaming writer. format/SPEC.md,
// "safetensors layer", is the normative description of what is accepted.
#include "qmoe/format/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "file_internal.h"
#include "qmoe/format/file.h"

namespace qmoe {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little endian; big-endian hosts are not supported");

namespace internal {

// Largest header the reference implementation (huggingface/safetensors) accepts; we use the same
// bound so that every file we accept opens there too, and so a hostile length cannot make us
// parse gigabytes of JSON.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Parses JSON text strictly (check_json_text() of file.h); FormatError
// prefixed with `context` otherwise. Shared with container.cpp (index files).
nlohmann::json parse_json_checked(std::string_view text, const std::string& context) {
  check_json_text(text, context);
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(error_context(context, "", std::string("malformed JSON (") + e.what() + ")"));
  }
}

// Non-negative JSON integer that fits int64; nullopt otherwise (floats, negatives, booleans).
std::optional<int64_t> json_size(const nlohmann::json& j) {
  if (j.is_number_unsigned()) {
    const auto v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v);
  }
  if (j.is_number_integer()) {
    const auto v = j.get<int64_t>();
    if (v < 0) return std::nullopt;
    return v;
  }
  return std::nullopt;
}

// Writes all of [p, p+n) to fd (retrying short writes and EINTR); throws Error naming `path`.
void write_all(int fd, const void* p, size_t n, const std::string& path) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EFAULT) {
        // The source bytes are not readable: a view into a mapped input that was truncated.
        throw Error(error_context(path, "",
                                  "write failed: the data to write could not be read (a mapped "
                                  "input file was truncated while in use?)"));
      }
      throw Error(error_context(path, "", std::string("write failed: ") + std::strerror(errno)));
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
}

std::string io_error(const std::string& path, const char* what) {
  return error_context(path, "", std::string(what) + ": " + std::strerror(errno));
}

}  // namespace internal

using internal::kMaxHeaderBytes;

uint64_t header_digest(const std::map<std::string, std::string>& metadata,
                       const std::vector<TensorInfo>& tensors, std::string_view exclude_key) {
  std::string h;
  auto u64 = [&](uint64_t v) {
    char b[8];
    std::memcpy(b, &v, 8);  // little-endian host (static_assert above)
    h.append(b, 8);
  };
  auto str = [&](std::string_view s) {
    u64(s.size());
    h.append(s);
  };
  for (const auto& [k, v] : metadata) {  // std::map: increasing byte order of the keys
    if (k == exclude_key) continue;
    h.push_back('\x01');
    str(k);
    str(v);
  }
  std::vector<const TensorInfo*> sorted;
  sorted.reserve(tensors.size());
  for (const TensorInfo& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->name < b->name; });
  for (const TensorInfo* t : sorted) {
    h.push_back('\x02');
    str(t->name);
    str(dtype_name(t->dtype));
    u64(t->shape.size());
    for (int64_t d : t->shape) u64(static_cast<uint64_t>(d));
    u64(static_cast<uint64_t>(t->begin));
    u64(static_cast<uint64_t>(t->end));
  }
  return XXH3_64bits(h.data(), h.size());
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- reader ------------------------------------------------------------------------------------

namespace {

// Owns one read-only mapping of a whole file, registered with the SIGBUS handler of file.h for as
// long as it exists.
struct Mapping {
  const std::byte* data = nullptr;
  size_t size = 0;
  std::unique_ptr<internal::MappedRegion> region;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    region.reset();  // before the range can be reused by another mapping
    if (data != nullptr) ::munmap(const_cast<std::byte*>(data), size);
  }
};

uint64_t load_u64_le(const std::byte* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian host (static_assert above)
  return v;
}

}  // namespace

struct SafetensorsFile::Impl {
  std::filesystem::path path;
  std::string path_str;
  Mapping map;
  const std::byte* data = nullptr;  // first byte of the data section
  int64_t data_size = 0;
  std::map<std::string, std::string> metadata;
  std::vector<TensorInfo> tensors;
  std::map<std::string, size_t, std::less<>> index;
};

namespace {

TensorInfo parse_tensor_entry(const std::string& file, const std::string& name,
                              const nlohmann::json& v) {
  auto fail = [&](const std::string& what) -> FormatError {
    return FormatError(error_context(file, name, what));
  };
  if (!v.is_object()) throw fail("header entry is not a JSON object");
  TensorInfo t;
  t.name = name;

  const auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) throw fail("missing or non-string \"dtype\"");
  const auto dtype = dtype_from_name(dt->get_ref<const std::string&>());
  if (!dtype) throw fail("unknown dtype \"" + dt->get<std::string>() + "\"");
  t.dtype = *dtype;

  const auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) throw fail("missing or non-array \"shape\"");
  // The byte size must be computable without overflow: multiply in the order given, like the
  // reference implementation, and stay within int64.
  uint64_t numel = 1;
  const uint64_t limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  for (const auto& d : *sh) {
    const auto dim = internal::json_size(d);
    if (!dim) throw fail("shape entries must be non-negative integers");
    t.shape.push_back(*dim);
    const auto ud = static_cast<uint64_t>(*dim);
    if (ud != 0 && numel > limit / ud) throw fail("shape's element count overflows");
    numel *= ud;
  }
  const auto esize = static_cast<uint64_t>(dtype_size(t.dtype));
  if (numel > limit / esize) throw fail("shape's byte size overflows");
  const uint64_t nbytes = numel * esize;

  const auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2) {
    throw fail("missing \"data_offsets\" or not a pair [begin, end]");
  }
  const auto b = internal::json_size((*off)[0]);
  const auto e = internal::json_size((*off)[1]);
  if (!b || !e) throw fail("data_offsets must be non-negative integers");
  if (*e < *b) {
    throw fail("data_offsets [" + std::to_string(*b) + ", " + std::to_string(*e) +
               "] end before they begin");
  }
  t.begin = *b;
  t.end = *e;
  if (static_cast<uint64_t>(t.end - t.begin) != nbytes) {
    throw fail("data_offsets span " + std::to_string(t.end - t.begin) + " bytes but " +
               std::string(dtype_name(t.dtype)) + " shape needs " + std::to_string(nbytes));
  }
  return t;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->path_str = path.string();
  const std::string& file = impl->path_str;
  auto fail = [&](const std::string& what) -> FormatError {
    return FormatError(error_context(file, "", what));
  };

  // Refuses FIFOs, devices and directories before reading (a FIFO would block).
  const RegularFile rf = RegularFile::open(path);
  const auto file_size = static_cast<uint64_t>(rf.size());
  if (file_size < 8) {
    throw fail("truncated: " + std::to_string(file_size) +
               " bytes, shorter than the 8-byte header length");
  }
  void* p = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, rf.fd(), 0);
  if (p == MAP_FAILED) throw FormatError(internal::io_error(file, "mmap failed"));
  impl->map.data = static_cast<const std::byte*>(p);
  impl->map.size = file_size;
  impl->map.region = std::make_unique<internal::MappedRegion>(p, file_size, file);

  const uint64_t n = load_u64_le(impl->map.data);
  if (n > kMaxHeaderBytes) {
    throw fail("header length " + std::to_string(n) + " exceeds the limit of " +
               std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (n > file_size - 8) {
    throw fail("header length " + std::to_string(n) + " runs past the end of the file (" +
               std::to_string(file_size) + " bytes)");
  }
  const std::string_view text(reinterpret_cast<const char*>(impl->map.data + 8), n);
  const nlohmann::json header = internal::parse_json_checked(text, file + ": header");
  if (!header.is_object()) throw fail("header is not a JSON object");

  impl->data = impl->map.data + 8 + n;
  impl->data_size = static_cast<int64_t>(file_size - 8 - n);

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (value.is_null()) continue;  // accepted by the reference implementation
      if (!value.is_object()) throw fail("__metadata__ is not a JSON object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) throw fail("__metadata__ value of \"" + mk + "\" is not a string");
        impl->metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    TensorInfo t = parse_tensor_entry(file, key, value);
    if (t.end > impl->data_size) {
      throw FormatError(error_context(file, key,
                                      "data_offsets [" + std::to_string(t.begin) + ", " +
                                          std::to_string(t.end) +
                                          "] run past the end of the data section (" +
                                          std::to_string(impl->data_size) + " bytes)"));
    }
    impl->tensors.push_back(std::move(t));
  }

  // The tensors must tile the data section exactly: sorted by offsets, each begins where the
  // previous one ended, the first at 0 and the last at the end of the file.
  std::sort(impl->tensors.begin(), impl->tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  int64_t expect = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : impl->tensors) {
    if (t.begin < expect) {
      throw FormatError(error_context(
          file, t.name,
          "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
              "] overlap tensor '" + prev->name + "' (ends at " + std::to_string(expect) + ")"));
    }
    if (t.begin > expect) {
      throw FormatError(error_context(file, t.name,
                                      "data_offsets [" + std::to_string(t.begin) + ", " +
                                          std::to_string(t.end) + "] leave a gap after offset " +
                                          std::to_string(expect)));
    }
    expect = t.end;
    prev = &t;
  }
  if (expect != impl->data_size) {
    throw fail("the tensors cover " + std::to_string(expect) + " bytes of the " +
               std::to_string(impl->data_size) + "-byte data section (trailing bytes)");
  }
  for (size_t i = 0; i < impl->tensors.size(); ++i) impl->index.emplace(impl->tensors[i].name, i);

  SafetensorsFile f;
  f.impl_ = std::move(impl);
  return f;
}

const std::filesystem::path& SafetensorsFile::path() const {
  return impl_->path;
}
const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return impl_->metadata;
}
const std::vector<TensorInfo>& SafetensorsFile::tensors() const {
  return impl_->tensors;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = impl_->index.find(name);
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& t) const {
  if (t.begin < 0 || t.end < t.begin || t.end > impl_->data_size) {
    throw InvalidArgument(
        error_context(impl_->path_str, t.name, "tensor offsets are not within this file"));
  }
  return {impl_->data + t.begin, static_cast<size_t>(t.end - t.begin)};
}

void SafetensorsFile::check_dtype(const TensorInfo& t, DType expected) const {
  if (t.dtype != expected) {
    throw FormatError(error_context(impl_->path_str, t.name,
                                    "dtype is " + std::string(dtype_name(t.dtype)) + ", expected " +
                                        std::string(dtype_name(expected))));
  }
  const auto addr = reinterpret_cast<uintptr_t>(bytes(t).data());
  if (addr % static_cast<uintptr_t>(dtype_size(expected)) != 0) {
    throw FormatError(error_context(impl_->path_str, t.name,
                                    "data is not aligned to its " +
                                        std::to_string(dtype_size(expected)) +
                                        "-byte element size"));
  }
}

// ---- writer ------------------------------------------------------------------------------------

namespace {

std::atomic<uint64_t> g_temp_counter{0};

struct PendingTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t staged_offset;  // where its bytes are in the staging file
  int64_t nbytes;
};

// Copies n bytes at `from_off` of fd `from` to the current position of fd `to`.
void copy_range(int from, int64_t from_off, int to, int64_t n, const std::string& path) {
  while (n > 0) {
    loff_t off = from_off;
    const ssize_t c = ::copy_file_range(from, &off, to, nullptr, static_cast<size_t>(n), 0);
    if (c > 0) {
      from_off += c;
      n -= c;
      continue;
    }
    if (c < 0 && errno == EINTR) continue;
    break;  // unsupported here (EXDEV, ENOSYS, EINVAL, ...) or unexpected EOF: plain copy below
  }
  std::vector<char> buf(static_cast<size_t>(std::min<int64_t>(n, int64_t{4} << 20)));
  while (n > 0) {
    const ssize_t r = ::pread(
        from, buf.data(),
        static_cast<size_t>(std::min<int64_t>(n, static_cast<int64_t>(buf.size()))), from_off);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw Error(internal::io_error(path, "reading staged tensor data failed"));
    internal::write_all(to, buf.data(), static_cast<size_t>(r), path);
    from_off += r;
    n -= r;
  }
}

}  // namespace

struct SafetensorsWriter::Impl {
  std::filesystem::path path;
  std::string tmp;      // "<path>.tmp.<pid>", renamed to path by finish()
  int staging_fd = -1;  // unlinked file holding tensor data in arrival order
  int64_t staged = 0;
  std::vector<PendingTensor> tensors;
  std::set<std::string, std::less<>> names;
  std::map<std::string, std::string> metadata;
  std::string checksum_key;  // header checksum entry, empty for none
  bool finished = false;

  ~Impl() {
    if (staging_fd >= 0) ::close(staging_fd);
    if (!finished) ::unlink(tmp.c_str());
  }

  // Tensors in file order: widest element type first (so every tensor is aligned to its
  // element size, given that the data section starts 8-aligned), then in arrival order.
  std::vector<size_t> order() const {
    std::vector<size_t> o(tensors.size());
    for (size_t i = 0; i < o.size(); ++i) o[i] = i;
    std::stable_sort(o.begin(), o.end(), [&](size_t a, size_t b) {
      return dtype_size(tensors[a].dtype) > dtype_size(tensors[b].dtype);
    });
    return o;
  }

  std::string header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    std::vector<TensorInfo> layout;  // the entries below, for the header checksum
    int64_t offset = 0;
    for (size_t i : order()) {
      const PendingTensor& t = tensors[i];
      layout.push_back(TensorInfo{t.name, t.dtype, t.shape, offset, offset + t.nbytes});
      offset += t.nbytes;
    }
    std::map<std::string, std::string> md = metadata;
    if (!checksum_key.empty()) {
      md.erase(checksum_key);
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx",
                    static_cast<unsigned long long>(header_digest(md, layout, checksum_key)));
      md[checksum_key] = hex;
    }
    if (!md.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& [k, v] : md) m[k] = v;
      h["__metadata__"] = std::move(m);
    }
    for (const TensorInfo& t : layout) {
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = dtype_name(t.dtype);
      e["shape"] = t.shape;
      e["data_offsets"] = {t.begin, t.end};
      h[t.name] = std::move(e);
    }
    std::string s;
    try {
      s = h.dump();
    } catch (const nlohmann::json::exception& e) {
      throw InvalidArgument(
          error_context(path.string(), "", std::string("cannot encode header: ") + e.what()));
    }
    s.append((8 - s.size() % 8) % 8, ' ');
    if (s.size() > kMaxHeaderBytes) {
      throw InvalidArgument(
          error_context(path.string(), "",
                        "header would be " + std::to_string(s.size()) + " bytes, over the " +
                            std::to_string(kMaxHeaderBytes) + "-byte safetensors limit"));
    }
    return s;
  }
};

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path) : impl_(std::make_unique<Impl>()) {
  impl_->path = std::move(path);
  impl_->tmp = impl_->path.string() + ".tmp." + std::to_string(::getpid());
  const std::string staging = impl_->tmp + "." + std::to_string(g_temp_counter++) + ".data";
  impl_->staging_fd = ::open(staging.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (impl_->staging_fd < 0) throw Error(internal::io_error(staging, "cannot create staging file"));
  ::unlink(staging.c_str());  // lives only as long as the descriptor: no debris after a crash
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  if (impl_->finished)
    throw InvalidArgument(error_context(impl_->path.string(), "", "writer already finished"));
  impl_->metadata[std::move(key)] = std::move(value);
}

void SafetensorsWriter::set_header_checksum_key(std::string key) {
  if (impl_->finished)
    throw InvalidArgument(error_context(impl_->path.string(), "", "writer already finished"));
  impl_->checksum_key = std::move(key);
}

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape,
                            std::span<const std::byte> data) {
  const std::string file = impl_->path.string();
  if (impl_->finished) throw InvalidArgument(error_context(file, name, "writer already finished"));
  if (name == "__metadata__")
    throw InvalidArgument(error_context(file, name, "reserved tensor name"));
  if (impl_->names.count(name) != 0)
    throw InvalidArgument(error_context(file, name, "duplicate tensor name"));
  uint64_t numel = 1;
  const uint64_t limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  for (int64_t d : shape) {
    if (d < 0) throw InvalidArgument(error_context(file, name, "negative dimension"));
    const auto ud = static_cast<uint64_t>(d);
    if (ud != 0 && numel > limit / ud)
      throw InvalidArgument(error_context(file, name, "shape overflows"));
    numel *= ud;
  }
  const auto esize = static_cast<uint64_t>(dtype_size(dtype));
  if (numel > limit / esize || numel * esize != data.size()) {
    throw InvalidArgument(error_context(file, name,
                                        "data holds " + std::to_string(data.size()) +
                                            " bytes, shape needs " + std::to_string(numel) + " x " +
                                            std::to_string(esize)));
  }
  internal::write_all(impl_->staging_fd, data.data(), data.size(), file);
  impl_->tensors.push_back(PendingTensor{name, dtype, std::move(shape), impl_->staged,
                                         static_cast<int64_t>(data.size())});
  impl_->staged += static_cast<int64_t>(data.size());
  impl_->names.insert(std::move(name));
}

int64_t SafetensorsWriter::size_bytes() const {
  return 8 + static_cast<int64_t>(impl_->header().size()) + impl_->staged;
}

void SafetensorsWriter::finish() {
  Impl& w = *impl_;
  if (w.finished)
    throw InvalidArgument(error_context(w.path.string(), "", "writer already finished"));
  const std::string header = w.header();
  const int fd = ::open(w.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw Error(internal::io_error(w.tmp, "cannot create"));
  internal::TempFileMark mark(w.tmp);  // removed by the fault handler of file.h if it fires now
  try {
    const uint64_t n = header.size();
    internal::write_all(fd, &n, 8, w.tmp);
    internal::write_all(fd, header.data(), header.size(), w.tmp);
    for (size_t i : w.order())
      copy_range(w.staging_fd, w.tensors[i].staged_offset, fd, w.tensors[i].nbytes, w.tmp);
    if (::fsync(fd) != 0) throw Error(internal::io_error(w.tmp, "fsync failed"));
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) throw Error(internal::io_error(w.tmp, "close failed"));
  if (::rename(w.tmp.c_str(), w.path.c_str()) != 0)
    throw Error(internal::io_error(w.path.string(), "rename failed"));
  mark.release();
  w.finished = true;
  ::close(w.staging_fd);
  w.staging_fd = -1;
}

}  // namespace qmoe
