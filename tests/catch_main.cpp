// Catch2 runner of the CPU tests: exits 77 (CTest: skipped) with a message when the
// CPU lacks an instruction set the tests were compiled for (isa_check.hpp).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "isa_check.hpp"

KTO_TEST_BASELINE int main(int argc, char** argv) {
  if (const char* missing = test::missing_isa_feature()) {
    std::printf("SKIPPED: built for an ISA with %s, which this CPU lacks\n", missing);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
