// Configure-time probe (tests/CMakeLists.txt): exits 0 when this CPU runs code built for
// the tests' -march, else prints the missing feature and exits 1.
#include <cstdio>

#include <kto/cpu/isa.hpp>

KTO_ISA_BASELINE int main() {
  const char* missing = kto::cpu::missing_isa_feature();
  if (missing) std::printf("%s", missing);
  return missing ? 1 : 0;
}
