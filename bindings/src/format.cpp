// CompressedMatrix (raw tensors, decode, from_tensors) and containers: save, load, load_metadata
// (qmoe/format). decoder_cpu.cpp and decoder_cuda.cpp add the matrix's matvec, matmul and to_cuda.
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <span>
#include <stdexcept>

#include "common.h"
#include "qmoe/format/container.h"
#include "qmoe/format/reference.h"

namespace qmoe::python {
namespace {

// A read-only numpy array over memory kept alive by `base`.
template <class T>
py::array readonly_view(const T* data, std::vector<py::ssize_t> shape, py::handle base) {
  py::array_t<T> a(std::move(shape), data, base);
  a.attr("setflags")(py::arg("write") = false);
  return a;
}

// A 1-D read-only view of a member of `self`'s matrix, or None when its codec has no such member.
template <class T>
py::object member_view(py::handle self, bool present, std::span<const T> member) {
  if (!present) return py::none();
  return readonly_view(member.data(), {static_cast<py::ssize_t>(member.size())}, self);
}

// Raw tensors -> a validated CompressedMatrix (copies them).
PyCompressed from_tensors(const std::string& codec_name, std::pair<int64_t, int64_t> shape,
                          const py::handle& levels_obj, const py::handle& codes_obj,
                          const py::handle& row_offsets_obj, const py::handle& packed_obj,
                          const py::handle& dictionary_obj, const py::handle& tokens_obj,
                          const py::handle& kinds_obj, const py::handle& group_offsets_obj,
                          const std::string& original_dtype) {
  qmoe::CompressedMatrix m;
  m.codec = *parse_codec(codec_name, false);
  m.rows = shape.first;
  m.cols = shape.second;
  if (m.rows < 0 || m.cols < 0) bad_arg("shape: negative dimension");
  const DType orig = parse_dtype_name(original_dtype);
  auto copy_1d = [](const py::handle& obj, const char* what, const py::dtype& want, auto& out) {
    py::array a = as_array(obj, what);
    if (!a.dtype().is(want))
      bad_arg(std::string(what) + ": expected " + dtype_str(want) + ", got " +
              dtype_str(a.dtype()));
    check_c_contiguous(a, what);
    out.resize(static_cast<size_t>(a.size()));
    if (a.size() > 0) std::memcpy(out.data(), a.data(), nbytes_of(a));
  };
  py::array lv = as_array(levels_obj, "levels");
  if (is_ml_bfloat16(lv.dtype())) lv = lv.attr("view")(py::dtype::of<uint16_t>());
  copy_1d(lv, "levels", py::dtype::of<uint16_t>(), m.levels);
  // The member arguments, each given exactly for the codecs that store it (the codec table).
  // The member arguments, each given exactly for the codecs that store it (the codec table): a
  // member kind, or the fitted dictionary where `member` is empty.
  struct Arg {
    const char* name;
    const char* type;
    const py::handle& obj;
    std::optional<qmoe::Member> member;
    bool taken_by(const qmoe::CodecTraits& t) const {
      return member ? t.stores(*member) : t.has_fitted_dictionary();
    }
  };
  const Arg args[] = {
      {"codes", "uint16", codes_obj, qmoe::Member::kCodes},
      {"row_offsets", "int32", row_offsets_obj, qmoe::Member::kRowOffsets},
      {"packed", "uint8", packed_obj, qmoe::Member::kPacked},
      {"tokens", "uint8", tokens_obj, qmoe::Member::kTokens},
      {"kinds", "uint8", kinds_obj, qmoe::Member::kKinds},
      {"group_offsets", "int32", group_offsets_obj, qmoe::Member::kGroupOffsets},
      {"dictionary", "uint32, 65536 entries", dictionary_obj, std::nullopt},
  };
  const qmoe::CodecTraits& traits = qmoe::codec_traits(m.codec);
  std::string missing;
  for (const Arg& a : args) {
    const bool wanted = a.taken_by(traits);
    if (!wanted && !a.obj.is_none()) {
      // "codes: only for qmoe-v1, qmoe-v2 and qmoe-v3"
      std::vector<std::string_view> takers;
      for (const qmoe::CodecTraits& t : qmoe::kCodecs) {
        if (a.taken_by(t)) takers.push_back(t.name);
      }
      std::string list;
      for (size_t i = 0; i < takers.size(); ++i) {
        list += (i == 0 ? "" : i + 1 == takers.size() ? " and " : ", ") + std::string(takers[i]);
      }
      bad_arg(std::string(a.name) + ": only for " + list);
    }
    if (wanted && a.obj.is_none()) {
      missing += (missing.empty() ? "" : ", ") + std::string(a.name) + " (" + a.type + ")";
    }
  }
  if (!missing.empty()) bad_arg(std::string(traits.name) + " needs " + missing);
  if (traits.stores(qmoe::Member::kCodes)) {
    copy_1d(codes_obj, "codes", py::dtype::of<uint16_t>(), m.codes);
    copy_1d(row_offsets_obj, "row_offsets", py::dtype::of<int32_t>(), m.row_offsets);
  }
  if (traits.stores(qmoe::Member::kPacked))
    copy_1d(packed_obj, "packed", py::dtype::of<uint8_t>(), m.packed);
  if (traits.stores(qmoe::Member::kTokens)) {
    copy_1d(tokens_obj, "tokens", py::dtype::of<uint8_t>(), m.tokens);
    copy_1d(kinds_obj, "kinds", py::dtype::of<uint8_t>(), m.kinds);
    copy_1d(group_offsets_obj, "group_offsets", py::dtype::of<int32_t>(), m.group_offsets);
  }
  if (traits.has_fitted_dictionary()) {
    std::vector<uint32_t> words;
    copy_1d(dictionary_obj, "dictionary", py::dtype::of<uint32_t>(), words);
    py::gil_scoped_release nogil;
    qmoe::validate_dictionary(m.codec, words, "CompressedMatrix.from_tensors");
    auto d = std::make_shared<qmoe::FittedDictionary>();
    d->id = qmoe::v2_dictionary_id(words);
    d->entries = std::move(words);
    m.dictionary = std::move(d);
  }
  {
    py::gil_scoped_release nogil;
    qmoe::validate(m.view(), "CompressedMatrix.from_tensors");
  }
  return PyCompressed::owning(std::move(m), orig);
}

// numpy dtype -> stored element type. Native byte order only.
DType dense_dtype(const py::dtype& dt, const std::string& name) {
  const char order = dt.attr("byteorder").cast<std::string>()[0];
  if (order == '>') bad_arg("tensor '" + name + "': big-endian arrays are not supported");
  if (is_ml_bfloat16(dt)) return DType::kBF16;
  const char kind = kind_of(dt);
  const auto size = itemsize_of(dt);
  if (kind == 'b' && size == 1) return DType::kBool;
  if (kind == 'u' || kind == 'i') {
    const bool u = kind == 'u';
    switch (size) {
      case 1:
        return u ? DType::kU8 : DType::kI8;
      case 2:
        return u ? DType::kU16 : DType::kI16;
      case 4:
        return u ? DType::kU32 : DType::kI32;
      case 8:
        return u ? DType::kU64 : DType::kI64;
      default:
        break;
    }
  }
  if (kind == 'f') {
    switch (size) {
      case 2:
        return DType::kF16;
      case 4:
        return DType::kF32;
      case 8:
        return DType::kF64;
      default:
        break;
    }
  }
  bad_arg("tensor '" + name + "': dtype " + dtype_str(dt) + " cannot be stored");
}

// Stored element type -> numpy dtype (BF16: ml_dtypes.bfloat16 unless raw_bf16 or ml_dtypes is
// missing, then uint16 bit patterns).
py::dtype numpy_dtype(DType t, bool raw_bf16) {
  switch (t) {
    case DType::kBool:
      return py::dtype("bool");
    case DType::kU8:
      return py::dtype("uint8");
    case DType::kI8:
      return py::dtype("int8");
    case DType::kU16:
      return py::dtype("uint16");
    case DType::kI16:
      return py::dtype("int16");
    case DType::kF16:
      return py::dtype("float16");
    case DType::kBF16:
      if (!raw_bf16) {
        try {
          return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
        } catch (const py::error_already_set& e) {
          if (!e.matches(PyExc_ImportError)) throw;
        }
      }
      return py::dtype("uint16");
    case DType::kU32:
      return py::dtype("uint32");
    case DType::kI32:
      return py::dtype("int32");
    case DType::kF32:
      return py::dtype("float32");
    case DType::kU64:
      return py::dtype("uint64");
    case DType::kI64:
      return py::dtype("int64");
    case DType::kF64:
      return py::dtype("float64");
  }
  throw std::logic_error("numpy_dtype: unknown DType");
}

std::vector<std::filesystem::path> save(
    const std::filesystem::path& path, const py::dict& tensors,
    const std::optional<std::map<std::string, std::string>>& metadata, int64_t shard_size) {
  // Collect and check everything with the GIL held; write without it. `keep` holds the arrays
  // (and matrices) whose memory the spans point into.
  struct Dense {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::span<const std::byte> bytes;
  };
  struct Compressed {
    std::string name;
    qmoe::CompressedView view;
    DType original;
  };
  std::vector<Dense> dense;
  std::vector<Compressed> compressed;
  std::vector<py::object> keep;
  for (auto [key, value] : tensors) {
    if (!py::isinstance<py::str>(key)) bad_arg("save: tensor names must be str");
    std::string name = key.cast<std::string>();
    if (py::isinstance<PyCompressed>(value)) {
      const auto& p = value.cast<const PyCompressed&>();
      compressed.push_back({std::move(name), p.view, p.original_dtype});
      keep.push_back(py::reinterpret_borrow<py::object>(value));
      continue;
    }
    py::array a = py::array::ensure(value);
    if (!a) bad_arg("tensor '" + name + "': expected a CompressedMatrix or an array");
    if (!(a.flags() & py::array::c_style)) {
      bad_arg("tensor '" + name + "': array must be C-contiguous (use numpy.ascontiguousarray)");
    }
    Dense d{name, dense_dtype(a.dtype(), name), {}, {}};
    for (py::ssize_t i = 0; i < a.ndim(); ++i) d.shape.push_back(static_cast<int64_t>(a.shape(i)));
    d.bytes = {static_cast<const std::byte*>(a.data()), nbytes_of(a)};
    dense.push_back(std::move(d));
    keep.push_back(std::move(a));
  }
  py::gil_scoped_release nogil;
  qmoe::ContainerWriteOptions opt;
  opt.shard_size = shard_size;
  qmoe::ContainerWriter w(path, opt);
  if (metadata) {
    for (const auto& [k, v] : *metadata) w.set_metadata(k, v);
  }
  for (auto& d : dense) w.add_dense(std::move(d.name), d.dtype, std::move(d.shape), d.bytes);
  for (auto& c : compressed) w.add_compressed(std::move(c.name), c.view, c.original);
  return w.finish();
}

std::shared_ptr<const qmoe::Container> open_container(const std::filesystem::path& path,
                                                      bool verify_checksums) {
  qmoe::ContainerOpenOptions opt;
  opt.verify_checksums = verify_checksums;
  py::gil_scoped_release nogil;
  return std::make_shared<const qmoe::Container>(qmoe::Container::open(path, opt));
}

py::dict load(const std::filesystem::path& path, bool verify_checksums, bool raw_bf16) {
  std::shared_ptr<const qmoe::Container> c = open_container(path, verify_checksums);
  // One capsule keeps the mapping alive for every dense array.
  auto* held = new std::shared_ptr<const qmoe::Container>(c);
  py::capsule base(held,
                   [](void* p) { delete static_cast<std::shared_ptr<const qmoe::Container>*>(p); });
  py::dict out;
  for (const std::string& name : c->names()) {
    if (const qmoe::CompressedEntry* e = c->find_compressed(name)) {
      PyCompressed p;
      p.owner = c;
      p.view = e->view;
      p.original_dtype = e->original_dtype;
      out[py::str(name)] = py::cast(std::move(p));
    } else if (const qmoe::DenseEntry* d = c->find_dense(name)) {
      std::vector<py::ssize_t> shape(d->shape.begin(), d->shape.end());
      // C-order strides computed here rather than by pybind11 (see itemsize_of()).
      std::vector<py::ssize_t> strides(shape.size());
      py::ssize_t stride = static_cast<py::ssize_t>(qmoe::dtype_size(d->dtype));
      for (size_t i = shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i];
      }
      py::array a(numpy_dtype(d->dtype, raw_bf16), std::move(shape), std::move(strides),
                  d->bytes.data(), base);
      a.attr("setflags")(py::arg("write") = false);
      out[py::str(name)] = std::move(a);
    }
  }
  return out;
}

std::map<std::string, std::string> load_metadata(const std::filesystem::path& path) {
  return open_container(path, false)->metadata();
}

}  // namespace

py::class_<PyCompressed> bind_format(py::module_& m) {
  py::class_<PyCompressed> matrix(m, "CompressedMatrix", R"doc(
An encoded ternary matrix (rows x cols). Obtained from encode(), compress_matrix(), load() or
CompressedMatrix.from_tensors(); immutable. Matrices returned by load() are zero-copy views into
the memory-mapped file, which stays mapped while any of them (or their raw tensors) is alive.
)doc");
  matrix
      .def_static("from_tensors", &from_tensors, py::arg("codec"), py::arg("shape"), py::kw_only(),
                  py::arg("levels"), py::arg("codes") = py::none(),
                  py::arg("row_offsets") = py::none(), py::arg("packed") = py::none(),
                  py::arg("dictionary") = py::none(), py::arg("tokens") = py::none(),
                  py::arg("kinds") = py::none(), py::arg("group_offsets") = py::none(),
                  py::arg("original_dtype") = "F32",
                  R"doc(
Builds a matrix from its raw tensors (copied), as stored in a container (format/SPEC.md).

codec: "qmoe-v1" (needs codes uint16 and row_offsets int32 of rows+1 entries), "qmoe-v2" or
"qmoe-v3" (the same plus dictionary, uint32 of 65536 entry words of that codec), "qmoe-g4"
(needs tokens uint8, kinds uint8 and group_offsets int32 of 2*(ceil(rows/4)+1) entries, SPEC
section 4.5) or "qmoe-p5" (needs packed uint8 of rows*ceil(cols/5) bytes). levels: 2*rows bfloat16 bit patterns (uint16 or
ml_dtypes.bfloat16, any shape), (lo, hi) per row. The whole stream is validated.
Raises ValueError for wrong dtypes or a missing tensor, qmoe.FormatError for a malformed stream.
)doc")
      .def_property_readonly(
          "shape", [](const PyCompressed& p) { return py::make_tuple(p.view.rows, p.view.cols); },
          "(rows, cols) of the matrix.")
      .def_property_readonly(
          "rows", [](const PyCompressed& p) { return p.view.rows; }, "Number of rows.")
      .def_property_readonly(
          "cols", [](const PyCompressed& p) { return p.view.cols; }, "Number of columns.")
      .def_property_readonly(
          "codec",
          [](const PyCompressed& p) { return std::string(qmoe::codec_name(p.view.codec)); },
          "Codec name: 'qmoe-v1', 'qmoe-v2', 'qmoe-v3', 'qmoe-g4' or 'qmoe-p5'.")
      .def_property_readonly(
          "original_dtype",
          [](const PyCompressed& p) { return std::string(qmoe::dtype_name(p.original_dtype)); },
          "dtype of the weights before compression, safetensors spelling ('F32', 'BF16', ...).")
      .def_property_readonly(
          "nbytes", [](const PyCompressed& p) { return p.view.compressed_bytes(); },
          "Bytes of codes (or packed data), row offsets and levels together (a qmoe-v2 / qmoe-v3 "
          "dictionary, "
          "shared by the matrices of a file, is not counted).")
      .def_property_readonly(
          "bits_per_weight", [](const PyCompressed& p) { return p.view.bits_per_weight(false); },
          "nbytes * 8 / (rows * cols); 0 for an empty matrix.")
      .def_property_readonly(
          "code_bits_per_weight",
          [](const PyCompressed& p) { return p.view.bits_per_weight(true); },
          "Bits per weight of the codes (or packed data) alone.")
      .def_property_readonly(
          "codes",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_codes(), v.codes);
          },
          "qmoe-v1 / qmoe-v2 / qmoe-v3 codewords, uint16 (read-only view); None for qmoe-p5.")
      .def_property_readonly(
          "row_offsets",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_codes(), v.row_offsets);
          },
          "qmoe-v1 / qmoe-v2 / qmoe-v3 row offsets into codes, int32, rows+1 entries (read-only "
          "view; qmoe-v3: a pair of rows' codes are its even row's range, odd rows' are empty); "
          "None for qmoe-p5.")
      .def_property_readonly(
          "dictionary",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_dictionary(), v.dictionary);
          },
          "qmoe-v2 / qmoe-v3 dictionary: 65536 entry words, uint32 (read-only view; layout in "
          "format/SPEC.md section 4.3.2 for qmoe-v2, 4.4.2 for qmoe-v3); None for the other "
          "codecs.")
      .def_property_readonly(
          "dictionary_id",
          [](const PyCompressed& p) -> py::object {
            if (!p.view.has_dictionary()) return py::none();
            return py::str(qmoe::hex64(p.view.dictionary_id));
          },
          "qmoe-v2 / qmoe-v3: the dictionary's id (XXH3-64 of its bytes, 16 hex digits); None "
          "otherwise.")
      .def_property_readonly(
          "packed",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kP5, v.packed);
          },
          "qmoe-p5 base-3 packed bytes, uint8, rows*ceil(cols/5) (read-only view); None for "
          "the other codecs.")
      .def_property_readonly(
          "tokens",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.tokens);
          },
          "qmoe-g4 gap tokens, two per byte, uint8 (read-only view, format/SPEC.md section 4.5); "
          "None for the other codecs.")
      .def_property_readonly(
          "kinds",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.kinds);
          },
          "qmoe-g4 kind bits (1 = high), eight per byte, uint8 (read-only view); None for the "
          "other codecs.")
      .def_property_readonly(
          "group_offsets",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.group_offsets);
          },
          "qmoe-g4 (first token, first kind bit) of each group of 4 rows and the ends, int32, "
          "2*(ceil(rows/4)+1) entries (read-only view); None for the other codecs.")
      .def_property_readonly(
          "levels",
          [](py::object self) {
            const auto& p = self.cast<const PyCompressed&>();
            return readonly_view(p.view.levels.data(), {static_cast<py::ssize_t>(p.view.rows), 2},
                                 self);
          },
          "Per-row (lo, hi) levels as bfloat16 bit patterns, uint16 of shape (rows, 2) (read-only "
          "view).")
      .def(
          "decode",
          [](const PyCompressed& p) {
            std::vector<float> out(static_cast<size_t>(p.view.rows * p.view.cols));
            {
              py::gil_scoped_release nogil;
              qmoe::decode_ref(p.view, out.data());
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(p.view.rows),
                                             static_cast<py::ssize_t>(p.view.cols)});
          },
          "Decodes to dense float32 of shape (rows, cols): each weight is its row's lo, 0 or hi.")
      .def(
          "decode_symbols",
          [](const PyCompressed& p) {
            std::vector<uint8_t> out(static_cast<size_t>(p.view.rows * p.view.cols));
            {
              py::gil_scoped_release nogil;
              qmoe::decode_symbols_ref(p.view, out.data());
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(p.view.rows),
                                             static_cast<py::ssize_t>(p.view.cols)});
          },
          "Decodes to ternary symbols, uint8 of shape (rows, cols): 0 = zero, 1 = lo, 2 = hi.")
      .def("__repr__", [](const PyCompressed& p) {
        return "CompressedMatrix(shape=(" + std::to_string(p.view.rows) + ", " +
               std::to_string(p.view.cols) + "), codec='" +
               std::string(qmoe::codec_name(p.view.codec)) +
               "', bits_per_weight=" + std::to_string(p.view.bits_per_weight(false)) + ")";
      });

  m.def("save", &save, py::arg("path"), py::arg("tensors"), py::kw_only(),
        py::arg("metadata") = py::none(), py::arg("shard_size") = 0, R"doc(
Writes a qmoe container (format/SPEC.md): a safetensors file any safetensors reader opens.

tensors: dict of name -> CompressedMatrix (stored as its tensor group, e.g. "<name>.qmoe_codes")
or array (stored unchanged; bool, int8..int64, uint8..uint64, float16/32/64 or
ml_dtypes.bfloat16, C-contiguous, native byte order). metadata: str -> str pairs for the
__metadata__ header (keys "format", "format_version" and "qmoe.*" are reserved).
shard_size: 0 writes one file at `path`; otherwise `path` is a directory that receives shards of
about shard_size bytes and model.safetensors.index.json. Files appear atomically.
Returns the paths written (pathlib.Path). Raises ValueError for bad names, dtypes or arguments, RuntimeError for
I/O failures.
)doc");

  m.def("load", &load, py::arg("path"), py::kw_only(), py::arg("verify_checksums") = false,
        py::arg("raw_bf16") = false, R"doc(
Opens a qmoe container (a .safetensors file, an index .json, or a directory holding either),
memory-mapped and fully validated. Returns a dict of logical name -> CompressedMatrix for
compressed matrices and read-only numpy arrays for dense tensors, sorted by name; both are
zero-copy views that keep the mapping alive. BF16 tensors come back as ml_dtypes.bfloat16 when
ml_dtypes is installed and raw_bf16 is False, as uint16 bit patterns otherwise.
verify_checksums: also hash every tensor against its stored xxh3 checksum.
Raises qmoe.FormatError for a missing, malformed or inconsistent file.
)doc");

  m.def(
      "codecs",
      [] {
        static constexpr const char* kMember[] = {
            "codes", "row_offsets", "packed", "group_offsets", "tokens", "kinds", "levels"};
        static constexpr const char* kDictionary[] = {"none", "builtin", "fitted"};
        py::list out;
        for (const qmoe::CodecTraits& t : qmoe::kCodecs) {
          py::list members;
          for (const qmoe::Member mb : t.members()) members.append(kMember[static_cast<int>(mb)]);
          py::dict d;
          d["name"] = std::string(t.name);
          d["summary"] = std::string(t.summary);
          d["members"] = members;
          d["dictionary"] = kDictionary[static_cast<int>(t.dictionary)];
          d["row_unit"] = t.row_unit;
          d["gpu_native"] = t.gpu_native;
          d["auto_for"] = t.auto_for
                              ? py::object(py::str(std::string(qmoe::target_name(*t.auto_for))))
                              : py::object(py::none());
          out.append(d);
        }
        return out;
      },
      R"doc(
Every codec, from the library's one table of them (qmoe/format/codec.h), in the order messages list
them: a list of dicts with "name" (as stored, e.g. "qmoe-v1"), "summary", "members" (the stored
tensors' kinds, in the order a writer stores them: "codes", "row_offsets", "packed",
"group_offsets", "tokens", "kinds", "levels"), "dictionary" ("none", "builtin": one fixed by the
format, or "fitted": fitted to the weights and shared), "row_unit" (rows a row slice keeps
together), "gpu_native" (the CUDA kernels read it as stored; other codecs are converted to qmoe-v2
on upload) and "auto_for" (the target "any", "cpu" or "gpu" for which codec="auto" picks it, or
None).
)doc");

  m.def("load_metadata", &load_metadata, py::arg("path"), R"doc(
The metadata of a qmoe container (of its index when sharded) as a dict of str -> str: what was
given to save(), plus "format" and "format_version" (the reserved "qmoe.*" bookkeeping entries
are left out). Raises qmoe.FormatError as load() does.
)doc");
  return matrix;
}

}  // namespace qmoe::python
