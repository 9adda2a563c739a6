// isa_check.hpp — does this CPU have every instruction set the tests were compiled for?
//
// CI compiles the CPU tests once per ISA (-march=native, x86-64-v3, x86-64, x86-64-v4,
// aarch64). A binary built for an extension the machine lacks would die of SIGILL; the
// runner (catch_main.cpp) asks first (kto/cpu/isa.hpp, compiled for the baseline) and
// reports a skip naming the missing feature.
#pragma once

#include <kto/cpu/isa.hpp>

#define KTO_TEST_BASELINE KTO_ISA_BASELINE

namespace test {

KTO_TEST_BASELINE inline const char* missing_isa_feature() {
  return kto::cpu::missing_isa_feature();
}

}  // namespace test
