#include "qmoe/core/memory.h"

#include <unistd.h>

#include <fstream>
#include <string>

namespace qmoe {

int64_t resident_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t size = 0, rss = 0;
  if (!(f >> size >> rss)) return 0;
  return rss * ::sysconf(_SC_PAGESIZE);
}

int64_t peak_resident_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return 0;
}

}  // namespace qmoe
