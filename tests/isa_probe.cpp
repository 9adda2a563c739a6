// Configure-time probe (tests/CMakeLists.txt): exits 0 when this CPU runs code built for
// the tests' -march, else prints the missing feature and exits 1.
#include <cstdio>

#include "isa_check.hpp"

KTO_TEST_BASELINE int main() {
  const char* missing = test::missing_isa_feature();
  if (missing) std::printf("%s", missing);
  return missing ? 1 : 0;
}
