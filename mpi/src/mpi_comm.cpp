#include "qmoe/mpi/mpi_comm.h"

#include <mpi.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "qmoe/format/error.h"

namespace qmoe::mpi {
namespace {

// Messages of at most this many bytes (MPI counts are ints); larger buffers go in pieces.
constexpr int64_t kPiece = int64_t{1} << 30;

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(std::string("MPI: ") + what + ": " + msg);
}

class World final : public sw::Comm {
 public:
  World() {
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    std::atexit([] {
      int done = 0;
      MPI_Finalized(&done);
      if (!done) MPI_Finalize();
    });
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe() const override {
    return "MPI, " + std::to_string(size_) + " process" + (size_ == 1 ? "" : "es");
  }

  std::vector<std::vector<std::byte>> exchange(std::vector<std::vector<std::byte>> send) override {
    if (static_cast<int>(send.size()) != size_)
      throw InvalidArgument("Comm::exchange: one buffer per process");
    // Sizes first, then the bytes, point to point in pieces of at most kPiece.
    std::vector<int64_t> out_sizes(static_cast<size_t>(size_)), in_sizes(out_sizes.size());
    for (int r = 0; r < size_; ++r)
      out_sizes[static_cast<size_t>(r)] = static_cast<int64_t>(send[static_cast<size_t>(r)].size());
    check(MPI_Alltoall(out_sizes.data(), 1, MPI_INT64_T, in_sizes.data(), 1, MPI_INT64_T,
                       MPI_COMM_WORLD),
          "MPI_Alltoall");
    std::vector<std::vector<std::byte>> recv(static_cast<size_t>(size_));
    std::vector<MPI_Request> reqs;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      auto& in = recv[static_cast<size_t>(r)];
      in.resize(static_cast<size_t>(in_sizes[static_cast<size_t>(r)]));
      int tag = 0;
      for (int64_t at = 0; at < static_cast<int64_t>(in.size()); at += kPiece, ++tag) {
        const int n =
            static_cast<int>(std::min<int64_t>(kPiece, static_cast<int64_t>(in.size()) - at));
        reqs.emplace_back();
        check(MPI_Irecv(in.data() + at, n, MPI_BYTE, r, tag, MPI_COMM_WORLD, &reqs.back()),
              "MPI_Irecv");
      }
    }
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      const auto& out = send[static_cast<size_t>(r)];
      int tag = 0;
      for (int64_t at = 0; at < static_cast<int64_t>(out.size()); at += kPiece, ++tag) {
        const int n =
            static_cast<int>(std::min<int64_t>(kPiece, static_cast<int64_t>(out.size()) - at));
        reqs.emplace_back();
        check(MPI_Isend(out.data() + at, n, MPI_BYTE, r, tag, MPI_COMM_WORLD, &reqs.back()),
              "MPI_Isend");
      }
    }
    if (!reqs.empty())
      check(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE),
            "MPI_Waitall");
    recv[static_cast<size_t>(rank_)] = std::move(send[static_cast<size_t>(rank_)]);
    return recv;
  }

  std::vector<std::string> allgather(const std::string& value) override {
    const int64_t mine = static_cast<int64_t>(value.size());
    std::vector<int64_t> sizes(static_cast<size_t>(size_));
    check(MPI_Allgather(&mine, 1, MPI_INT64_T, sizes.data(), 1, MPI_INT64_T, MPI_COMM_WORLD),
          "MPI_Allgather");
    std::vector<int> counts(static_cast<size_t>(size_)), displs(counts.size());
    int64_t total = 0;
    for (int r = 0; r < size_; ++r) {
      if (sizes[static_cast<size_t>(r)] > kPiece) throw Error("MPI: allgather value too large");
      counts[static_cast<size_t>(r)] = static_cast<int>(sizes[static_cast<size_t>(r)]);
      displs[static_cast<size_t>(r)] = static_cast<int>(total);
      total += sizes[static_cast<size_t>(r)];
      if (total > kPiece) throw Error("MPI: allgather values too large");
    }
    std::string all(static_cast<size_t>(total), '\0');
    check(MPI_Allgatherv(value.data(), static_cast<int>(mine), MPI_CHAR, all.data(), counts.data(),
                         displs.data(), MPI_CHAR, MPI_COMM_WORLD),
          "MPI_Allgatherv");
    std::vector<std::string> out(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r)
      out[static_cast<size_t>(r)] = all.substr(static_cast<size_t>(displs[static_cast<size_t>(r)]),
                                               static_cast<size_t>(counts[static_cast<size_t>(r)]));
    return out;
  }

 private:
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool launched() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"}) {
    const char* s = std::getenv(v);
    if (s && *s) return true;
  }
  return false;
}

std::shared_ptr<sw::Comm> world() {
  static const std::shared_ptr<sw::Comm> w = std::make_shared<World>();
  return w;
}

bool started() {
  int init = 0;
  MPI_Initialized(&init);
  return init != 0;
}

void abort_all(int code) {
  int init = 0, done = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&done);
  if (init && !done) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace qmoe::mpi
