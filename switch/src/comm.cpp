#include "qmoe/switch/comm.h"

namespace qmoe::sw {
namespace {

class LocalComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string describe() const override { return "1 process"; }
  std::vector<std::vector<std::byte>> exchange(std::vector<std::vector<std::byte>> send) override {
    if (send.size() != 1) throw InvalidArgument("Comm::exchange: one buffer per process");
    return send;
  }
  std::vector<std::string> allgather(const std::string& value) override { return {value}; }
};

}  // namespace

std::shared_ptr<Comm> local_comm() {
  static const std::shared_ptr<Comm> c = std::make_shared<LocalComm>();
  return c;
}

void agree(Comm& comm, const std::exception_ptr& local, const std::string& where) {
  std::string mine;
  if (local) {
    try {
      std::rethrow_exception(local);
    } catch (const std::exception& e) {
      mine = std::string("1") + e.what();
    } catch (...) {
      mine = "1(unknown error)";
    }
  }
  const std::vector<std::string> all = comm.allgather(mine);
  int first = -1;
  for (size_t r = 0; r < all.size(); ++r)
    if (!all[r].empty()) {
      first = static_cast<int>(r);
      break;
    }
  if (first < 0) return;
  // The lowest failing process reports its error; every other one (failed too or not) stops with
  // a line that points there.
  if (local && comm.rank() == first) std::rethrow_exception(local);
  throw PeerFailed("stopped: process " + std::to_string(first) + " of " +
                   std::to_string(comm.size()) + " failed in " + where +
                   " (its error is reported by that process)");
}

}  // namespace qmoe::sw
