// The vectorised conversions give exactly the bits of Eigen's scalar ones.
#include "support.hpp"

#include <kto/cpu/convert.hpp>

TEMPLATE_TEST_CASE("widen and narrow match Eigen's scalar conversions bit for bit", "[convert]",
                   Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::vector<float> values = {0.f,       -0.f,  1.f,         -1.f,       65504.f,
                               65520.f,   1e-8f, -1e-30f,     3.0e38f,    INFINITY,
                               -INFINITY, NAN,   1.00390625f, 1.01171875f};
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 20000; ++i) {
    uint32_t b = bits(rng);
    float f;
    std::memcpy(&f, &b, 4);
    values.push_back(f);
  }
  const auto n = static_cast<kto::index_t>(values.size());
  std::vector<T> narrowed(values.size());
  kto::cpu::narrow(values.data(), n, narrowed.data());
  std::vector<float> widened(values.size());
  kto::cpu::widen(narrowed.data(), n, widened.data());
  kto::index_t mismatches = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const T want = static_cast<T>(values[i]);
    const float want_wide = static_cast<float>(want);
    const bool nan = std::isnan(values[i]);
    const bool same_narrow = nan ? std::isnan(static_cast<float>(narrowed[i]))
                                 : std::memcmp(&want, &narrowed[i], sizeof(T)) == 0;
    const bool same_wide =
        nan ? std::isnan(widened[i]) : std::memcmp(&want_wide, &widened[i], sizeof(float)) == 0;
    if (!(same_narrow && same_wide) && mismatches++ < 5) {
      INFO("value " << values[i] << " index " << i);
      CHECK(same_narrow);
      CHECK(same_wide);
    }
  }
  CHECK(mismatches == 0);
}
