// type_name.hpp — the logit type's name in test and fuzz messages.
#pragma once

#include <Eigen/Core>
#include <type_traits>

namespace test {

template <class T>
const char* type_name() {
  if (std::is_same<T, double>::value) return "double";
  if (std::is_same<T, float>::value) return "float";
  if (std::is_same<T, Eigen::half>::value) return "half";
  return "bfloat16";
}

}  // namespace test
