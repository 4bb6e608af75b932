// The processes of one compression run, as the block loop needs them: who am I, how many are we,
// and moving bytes between us. One process (local_comm()) by default; `qmoe compress` under
// mpirun or srun uses MPI's world (mpi/mpi_comm.h). The loop never calls MPI itself, and every
// library below it stays single-process.
//
// How the work is split (Partition): calibration pairs by data, contiguous and balanced (process r
// runs pairs [P r / R, P (r + 1) / R)); experts by owner, independent of the data: expert e of the
// block with index i in the loop's order (encoder blocks 0.., then decoder blocks) belongs to
// process (e + i) mod R, so that the R owners rotate from block to block. Both are functions of
// (P, R) only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "qmoe/format/error.h"

namespace qmoe::sw {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "1 process", "MPI, 4 processes".
  virtual std::string describe() const = 0;
  // Process r receives send[r] from every process: returns, in rank order, what each process sent
  // to this one. Collective: every process calls it, in the same order.
  virtual std::vector<std::vector<std::byte>> exchange(
      std::vector<std::vector<std::byte>> send) = 0;
  // Every process's value, in rank order. Collective.
  virtual std::vector<std::string> allgather(const std::string& value) = 0;
};

// The single process: rank 0 of 1; exchange() hands the buffer back.
std::shared_ptr<Comm> local_comm();

struct Partition {
  int ranks = 1;
  int64_t pairs = 0;  // calibration pairs in all
  int64_t pair_begin(int rank) const { return pairs * rank / ranks; }
  int64_t pair_end(int rank) const { return pairs * (rank + 1) / ranks; }
  int owner(int64_t block_index, int64_t expert) const {
    return static_cast<int>((expert + block_index) % ranks);
  }
};

// Raised on the processes that did not fail when another one did (agree()): the run stops on all
// of them; the failing process reports its own error.
class PeerFailed : public Error {
 public:
  using Error::Error;
};

// Every process's outcome of a step, so that all stop together: returns when no process failed;
// otherwise the lowest failing process rethrows its own error (the error is reported once) and
// every other one throws PeerFailed naming that process and `where`. Collective.
void agree(Comm& comm, const std::exception_ptr& local, const std::string& where);

}  // namespace qmoe::sw
