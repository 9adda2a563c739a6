// Catch2 runner of the CPU tests: exits 77 (CTest: skipped) with a message when the
// CPU lacks an instruction set the tests were compiled for (kto/cpu/isa.hpp: the check is
// compiled for the baseline x86-64, so it runs on any x86-64 CPU).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include <kto/cpu/isa.hpp>

KTO_ISA_BASELINE int main(int argc, char** argv) {
  if (const char* missing = kto::cpu::missing_isa_feature()) {
    std::printf("SKIPPED: built for an ISA with %s, which this CPU lacks\n", missing);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
