// Rewrites the committed golden files of the container tests (tests/format/golden/valid-p5 and
// invalid/) and the container fuzzer's seeds made from them, after a deliberate format change:
//   build/release/tests/format/format_make_golden .
// (the argument is the source tree), then commit what changed and say why. Not a test: the test
// ContainerGolden.CommittedFilesAreTheGeneratorsOutput checks that the committed files are what
// this writes.
#include <cstdio>
#include <exception>

#include "format_golden.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: format_make_golden SOURCE_DIR\n");
    return 2;
  }
  try {
    const qmoe::test::fs::path src(argv[1]);
    if (!qmoe::test::fs::is_directory(src / "tests/format/golden")) {
      std::fprintf(stderr, "format_make_golden: %s is not the qmoe source tree\n", argv[1]);
      return 2;
    }
    qmoe::test::write_format_golden(src / "tests/format/golden",
                                    src / "tests/fuzz/corpus/container");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "format_make_golden: %s\n", e.what());
    return 1;
  }
  return 0;
}
