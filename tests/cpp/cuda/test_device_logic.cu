// The CUDA kernels' index and reduction logic, run on the CPU (label: cpu).
//
// The per-thread pieces of the kernels are __host__ __device__: how a row is
// split into a scalar head, 16-byte vectors and a tail (row_span), what each
// lane folds (thread_row_lse), what each lane writes in the backward
// (write_row), which sequence owns a row, and how (m, s) states combine. Here
// every lane of a warp-per-row group (32) and of a block-per-row group (512)
// is emulated in turn and the states are merged in the kernels' butterfly /
// shared-memory order, so the code that will run on a GPU is checked against
// the float64 reference on machines that have none.
#include <catch2/catch.hpp>

#include <kto/device/backward_kernel.cuh>
#include <kto/device/forward_kernels.cuh>
#include <kto/device/fused_linear_kernels.cuh>

#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "../problem.hpp"

namespace {

using kto::index_t;
using kto::device::LseState;

template <class T>
T cast(double x) {
  return kto::device::from_float<T>(static_cast<float>(x));
}

/// Emulates group_reduce_lse: a butterfly inside each warp, then warp 0 over
/// the per-warp results (lanes past the warp count hold the identity).
template <class State>
State emulate_group_reduce(const std::vector<State>& st) {
  using Warp = std::array<State, 32>;
  auto butterfly = [](Warp w) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      Warp next;
      for (int l = 0; l < 32; ++l) next[l] = kto::device::lse_combine(w[l], w[l ^ offset]);
      w = next;
    }
    return w[0];
  };
  const int warps = static_cast<int>(st.size()) / 32;
  Warp lanes;
  lanes.fill(kto::device::identity_of<State>());
  for (int w = 0; w < warps; ++w) {
    Warp warp;
    std::copy(st.begin() + 32 * w, st.begin() + 32 * (w + 1), warp.begin());
    lanes[w] = butterfly(warp);
  }
  return warps == 1 ? lanes[0] : butterfly(lanes);
}

template <class T, int kThreads>
LseState emulate_row(const T* row, index_t vocab) {
  std::vector<LseState> st(kThreads);
  for (int lane = 0; lane < kThreads; ++lane)
    st[lane] = kto::device::thread_row_lse<T, kThreads>(row, vocab, lane);
  return emulate_group_reduce(st);
}

/// The extended pass of one row (transform and statistics), all lanes then the reduction.
template <class T, int kThreads>
kto::device::StatisticsState emulate_extended_row(const T* row, index_t vocab,
                                                  const kto::device::RowTransform& t) {
  std::vector<kto::device::StatisticsState> st(kThreads);
  for (int lane = 0; lane < kThreads; ++lane)
    st[lane] = kto::device::thread_row_lse<T, kThreads, true>(row, vocab, lane, t);
  return emulate_group_reduce(st);
}

/// z' and ∂z'/∂z of the float64 reference (tests/cpp/reference.hpp).
double reference_transform(double z, const kto::LogitTransform& t) {
  return ref::transform(z, t.scale, t.softcap, t.temperature);
}

double reference_derivative(double z, const kto::LogitTransform& t) {
  return ref::transform_derivative(z, t.scale, t.softcap, t.temperature);
}

/// The transforms the extended tests run: identity (statistics alone), scale and
/// temperature, and a Gemma-2-style soft-cap with both.
std::vector<kto::LogitTransform> test_transforms() {
  kto::LogitTransform identity, scaled, capped;
  scaled.scale = 0.6;
  scaled.temperature = 1.3;
  capped.scale = 1.7;
  capped.softcap = 5.0;  // small against the logits' spread, so tanh saturates
  capped.temperature = 0.8;
  return {identity, scaled, capped};
}

/// z' = f(z) of a row in float64, with Σ|z'| and max|z'| for the tolerances.
struct TransformedRow {
  std::vector<double> values;
  double abs_sum = 0, max_abs = 0;
  TransformedRow(const std::vector<double>& z, const kto::LogitTransform& t) {
    for (double x : z) {
      values.push_back(reference_transform(x, t));
      abs_sum += std::fabs(values.back());
      max_abs = std::max(max_abs, std::fabs(values.back()));
    }
  }
};

struct ReferenceStatistics {
  double lse, entropy, mean_logit;
};

/// lse, entropy and mean of already transformed values, in float64.
ReferenceStatistics reference_statistics(const std::vector<double>& zt) {
  double m = -INFINITY, s = 0, pz = 0, sum = 0;
  for (double x : zt) m = std::max(m, x);
  for (double x : zt) s += std::exp(x - m);
  const double lse = m + std::log(s);
  for (double x : zt) {
    pz += std::exp(x - lse) * x;
    sum += x;
  }
  return {lse, lse - pz, sum / static_cast<double>(zt.size())};
}

/// `vocab` random values of type T, `shift` elements past a 16-byte aligned
/// start (misaligning the row), and their upcast values.
template <class T>
struct RandomRow {
  std::vector<T> storage;
  std::vector<double> z;
  int shift;
  RandomRow(std::mt19937_64& rng, std::normal_distribution<double>& normal, index_t vocab,
            int shift_)
      : storage(vocab + 8), z(vocab), shift(shift_) {
    for (index_t v = 0; v < vocab; ++v) {
      storage[shift + v] = cast<T>(normal(rng));
      z[v] = kto::device::to_float(storage[shift + v]);
    }
  }
  const T* row() const { return storage.data() + shift; }
};

double reference_lse(const std::vector<double>& z) {
  double m = -INFINITY, s = 0;
  for (double x : z) m = std::max(m, x);
  for (double x : z) s += std::exp(x - m);
  return m + std::log(s);
}

}  // namespace

TEST_CASE("row_span covers a row exactly once at every alignment", "[device]") {
  alignas(16) static unsigned char buffer[4096];
  for (index_t vocab : {1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1000}) {
    for (int shift = 0; shift < 16; shift += 2) {
      const void* p = buffer + shift;
      const auto s = kto::device::row_span<__nv_bfloat16>(p, vocab);
      INFO("vocab " << vocab << " shift " << shift);
      CHECK(s.head >= 0);
      CHECK(s.head <= vocab);
      CHECK(s.tail == s.head + s.vectors * 8);
      CHECK(s.tail <= vocab);
      CHECK(vocab - s.tail < 8);
      if (s.vectors > 0) CHECK((shift + 2 * s.head) % 16 == 0);
      if (shift == 0) CHECK(s.head == 0);
    }
  }
  for (int shift = 0; shift < 16; shift += 4) {
    const auto s = kto::device::row_span<float>(buffer + shift, 50);
    CHECK((shift + 4 * s.head) % 16 == 0);
    CHECK(s.tail == s.head + 4 * s.vectors);
    CHECK(50 - s.tail < 4);
  }
}

TEMPLATE_TEST_CASE("forward row logic of both row paths matches float64", "[device]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 3.0);
  const index_t vocab = GENERATE(1, 3, 8, 9, 123, 4096, 5001, 50257);
  const int shift = GENERATE(0, 1, 3);  // elements: misaligns the row pointer
  const RandomRow<T> random(rng, normal, vocab, shift);
  const std::vector<double>& z = random.z;
  const T* row = random.row();
  const double want = reference_lse(z);
  INFO("V " << vocab << " shift " << shift);
  for (const LseState st : {emulate_row<T, 32>(row, vocab), emulate_row<T, 512>(row, vocab)}) {
    const double got = st.m + std::log(static_cast<double>(st.s));
    CHECK(std::fabs(got - want) <= 1e-5 * (std::fabs(want) + 1.0));
  }
}

TEST_CASE("forward row logic keeps NaN, +inf and all -inf rows non-finite", "[device]") {
  const index_t vocab = 3001;
  for (int c = 0; c < 5; ++c) {
    std::vector<float> row(vocab, 0.5f);
    if (c == 0) row[1777] = NAN;
    if (c == 1) row[5] = INFINITY;
    if (c == 2) std::fill(row.begin(), row.end(), -INFINITY);
    if (c == 3) {  // NaN hidden among −inf: the running max stays −inf
      std::fill(row.begin(), row.end(), -INFINITY);
      row[2000] = NAN;
    }
    if (c == 4) std::fill(row.begin(), row.begin() + 3000, -INFINITY);  // one finite value
    INFO("case " << c);
    for (const LseState st :
         {emulate_row<float, 32>(row.data(), vocab), emulate_row<float, 512>(row.data(), vocab)}) {
      const float lse = st.m + std::log(st.s);
      if (c == 4) {
        CHECK(lse == 0.5f);
      } else {
        CHECK_FALSE(std::isfinite(lse));
      }
    }
  }
}

TEMPLATE_TEST_CASE("backward row logic writes every element once with the right value", "[device]",
                   float, __half, __nv_bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 2.0);
  const index_t vocab = GENERATE(1, 3, 9, 123, 5001);
  const int in_shift = GENERATE(0, 1);
  const int out_shift = GENERATE(0, 1, 2);
  const bool zero = GENERATE(false, true);
  INFO("V " << vocab << " in " << in_shift << " out " << out_shift << " zero " << zero);
  std::vector<T> in(vocab + 16), out(vocab + 16, cast<T>(NAN));
  std::vector<double> z(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    in[in_shift + v] = cast<T>(normal(rng));
    z[v] = kto::device::to_float(in[in_shift + v]);
  }
  const double lse = reference_lse(z);
  const index_t target = vocab / 2;
  const float scale = -0.37f;
  auto run = [&](auto threads_tag, T* dst, const T* src) {
    constexpr int kThreads = decltype(threads_tag)::value;
    for (int lane = 0; lane < kThreads; ++lane)
      kto::device::write_row<T, kThreads>(src, dst, vocab, target, static_cast<float>(lse), scale,
                                          lane, zero);
  };
  const double u = std::is_same<T, float>::value    ? 0x1p-24
                   : std::is_same<T, __half>::value ? 0x1p-11
                                                    : 0x1p-8;
  auto check = [&](const std::vector<T>& buf, int shift) {
    index_t bad = 0;
    for (index_t i = 0; i < static_cast<index_t>(buf.size()); ++i) {
      const double got = kto::device::to_float(buf[i]);
      const index_t v = i - shift;
      if (v < 0 || v >= vocab) {
        if (!std::isnan(got)) ++bad;  // outside the row: untouched
        continue;
      }
      const double want = zero ? 0.0 : scale * ((v == target ? 1.0 : 0.0) - std::exp(z[v] - lse));
      if (!(std::fabs(got - want) <=
            1e-5 * std::fabs(scale) * (1 + std::fabs(lse)) + u * std::fabs(want)))
        ++bad;
    }
    CHECK(bad == 0);
  };
  run(std::integral_constant<int, 32>{}, out.data() + out_shift, in.data() + in_shift);
  check(out, out_shift);
  std::fill(out.begin(), out.end(), cast<T>(NAN));
  run(std::integral_constant<int, 512>{}, out.data() + out_shift, in.data() + in_shift);
  check(out, out_shift);
  // In place: the output is the input row.
  std::vector<T> inplace(in.size(), cast<T>(NAN));
  std::copy(in.begin() + in_shift, in.begin() + in_shift + vocab, inplace.begin() + in_shift);
  run(std::integral_constant<int, 512>{}, inplace.data() + in_shift, inplace.data() + in_shift);
  check(inplace, in_shift);
}

TEST_CASE("sequence_of_row and covered_rows agree with a linear scan", "[device]") {
  std::vector<index_t> offsets = {2, 2, 5, 5, 5, 6, 9, 9};  // empty sequences included
  const kto::SequencesView seqs{offsets.data(), static_cast<index_t>(offsets.size()) - 1};
  index_t first = -1, last = -1;
  kto::device::covered_rows(seqs, 12, first, last);
  CHECK(first == 2);
  CHECK(last == 9);
  for (index_t r = first; r < last; ++r) {
    index_t want = -1;
    for (index_t s = 0; s < seqs.count; ++s)
      if (offsets[s] <= r && r < offsets[s + 1]) want = s;
    INFO("row " << r);
    CHECK(kto::device::sequence_of_row(seqs, r) == want);
  }
  // row_target: the id inside the covered rows, ignore_index outside them.
  std::vector<index_t> ids(12);
  for (index_t r = 0; r < 12; ++r) ids[r] = 100 + r;
  const auto targets = kto::targets_vector(ids.data(), 12);
  for (index_t r = 0; r < 12; ++r)
    CHECK(kto::device::row_target(seqs, targets, 12, r, -100) ==
          (r >= 2 && r < 9 ? 100 + r : -100));
  // Offsets past the rows are clamped, never followed.
  std::vector<index_t> bad = {-3, 4, 100};
  kto::device::covered_rows(kto::SequencesView{bad.data(), 2}, 10, first, last);
  CHECK(first == 0);
  CHECK(last == 10);
}

// ------------------------------------------------ fused-linear row kernels --

TEST_CASE("fused-linear forward lanes fold Z + b over float4 slices and the tail", "[device]") {
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 3.0);
  const index_t vocab = GENERATE(1, 3, 4, 5, 123, 4096, 5001);
  const bool with_bias = GENERATE(true, false);
  const index_t ld = (vocab + 3) / 4 * 4;
  alignas(16) static float row[5004], bias[5004];
  std::vector<double> z(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    row[v] = static_cast<float>(normal(rng));
    bias[v] = static_cast<float>(normal(rng));
    z[v] = double(row[v]) + (with_bias ? double(bias[v]) : 0.0);
  }
  for (index_t v = vocab; v < ld; ++v) row[v] = NAN;  // padding is never read
  const float* b = with_bias ? bias : nullptr;
  auto emulate = [&](auto threads) {
    constexpr int K = decltype(threads)::value;
    std::vector<LseState> st(K);
    for (int lane = 0; lane < K; ++lane)
      st[lane] = kto::device::thread_biased_lse<K>(row, b, vocab, lane);
    return emulate_group_reduce(st);
  };
  const double want = reference_lse(z);
  INFO("V " << vocab << " bias " << with_bias);
  for (const LseState st :
       {emulate(std::integral_constant<int, 32>{}), emulate(std::integral_constant<int, 512>{})}) {
    const double got = st.m + std::log(static_cast<double>(st.s));
    CHECK(std::fabs(got - want) <= 1e-5 * (std::fabs(want) + 1.0));
  }
}

TEMPLATE_TEST_CASE("fused-linear backward lanes write every gradient element once", "[device]",
                   float, __half, __nv_bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 2.0);
  const index_t vocab = GENERATE(1, 3, 4, 9, 123, 5001);
  const bool zero = GENERATE(false, true);
  alignas(16) static float row[5004], bias[5004];
  std::vector<double> z(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    row[v] = static_cast<float>(normal(rng));
    bias[v] = static_cast<float>(normal(rng));
    z[v] = double(row[v]) + double(bias[v]);
  }
  const double lse = reference_lse(z);
  const index_t target = vocab / 2;
  const float scale = -0.37f;
  alignas(16) static T out[5008];
  const T poison = cast<T>(NAN);
  for (auto& x : out) x = poison;
  auto run = [&](auto threads) {
    constexpr int K = decltype(threads)::value;
    for (int lane = 0; lane < K; ++lane)
      kto::device::write_chunk_row<T, K>(row, bias, out, vocab, target, static_cast<float>(lse),
                                         scale, lane, zero);
  };
  const double u = std::is_same<T, float>::value    ? 0x1p-24
                   : std::is_same<T, __half>::value ? 0x1p-11
                                                    : 0x1p-8;
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 0)
      run(std::integral_constant<int, 32>{});
    else
      run(std::integral_constant<int, 512>{});
    index_t bad = 0;
    for (index_t v = 0; v < vocab; ++v) {
      const double want =
          zero ? 0.0 : double(scale) * ((v == target ? 1.0 : 0.0) - std::exp(z[v] - lse));
      const double got = kto::device::to_float(out[v]);
      if (!(std::fabs(got - want) <=
            1e-5 * std::fabs(scale) * (1 + std::fabs(lse)) + u * std::fabs(want)))
        ++bad;
    }
    CHECK(bad == 0);
    CHECK(std::isnan(kto::device::to_float(out[vocab])));  // nothing past the row
  }
}

// ------------------------------------------- transform and token statistics --

/// Float sums of n terms, each lane serial then a tree: |error| ≤ (n/lanes + log2 lanes +
/// 1)·u·Σ|x|.
double sum_bound(index_t n, int lanes, double abs_sum) {
  return (static_cast<double>(n) / lanes + 11.0) * 0x1p-24 * abs_sum;
}

/// A reduced row state against the float64 statistics of the transformed row: lse at
/// rtol 1e-5 of its scale; the entropy log s − w/s at 1e-5 (1 + max|z'|) plus the float
/// sum bound of w/s (Σ e|z' − m| ≤ 2 max|z'| s); the mean Σ z'/V under sum_bound() plus
/// 2u Σ|z'|/V for the rounded weight 1/V and each product.
void check_row_state(const kto::device::StatisticsState& st, const TransformedRow& want_row,
                     int lanes) {
  const ReferenceStatistics want = reference_statistics(want_row.values);
  const auto vocab = static_cast<index_t>(want_row.values.size());
  const double lse = st.m + std::log(static_cast<double>(st.s));
  CHECK(std::fabs(lse - want.lse) <= 1e-5 * (std::fabs(want.lse) + 1.0));
  const auto ts = kto::token_statistics(st.s, st.w, st.t);
  CHECK(std::fabs(ts.entropy - want.entropy) <=
        1e-5 * (want_row.max_abs + 1.0) + sum_bound(vocab, lanes, 2 * want_row.max_abs));
  CHECK(std::fabs(ts.mean_logit - want.mean_logit) <=
        (sum_bound(vocab, lanes, want_row.abs_sum) + 2 * 0x1p-24 * want_row.abs_sum) /
                static_cast<double>(vocab) +
            1e-7);
}

TEMPLATE_TEST_CASE(
    "extended forward row logic: transformed lse, entropy and mean logit match float64", "[device]",
    float, __half, __nv_bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 3.0);
  const index_t vocab = GENERATE(1, 3, 9, 123, 5001, 50257);
  const int shift = GENERATE(0, 1);
  const RandomRow<T> random(rng, normal, vocab, shift);
  const std::vector<double>& z = random.z;
  const T* row = random.row();
  for (const kto::LogitTransform& t : test_transforms()) {
    const auto rt = kto::device::RowTransform::of(t);
    const TransformedRow want(z, t);
    INFO("V " << vocab << " shift " << shift << " scale " << t.scale << " cap " << t.softcap);
    check_row_state(emulate_extended_row<T, 32>(row, vocab, rt), want, 32);
    check_row_state(emulate_extended_row<T, 512>(row, vocab, rt), want, 512);
  }
}

TEST_CASE("extended forward row logic: -inf logits add nothing to the entropy", "[device]") {
  const index_t vocab = 3001;
  std::vector<float> row(vocab, -INFINITY);
  std::vector<double> finite;
  for (index_t v = 0; v < vocab; v += 7) {
    row[v] = 0.25f * static_cast<float>(v % 11) - 1.0f;
    finite.push_back(row[v]);
  }
  const ReferenceStatistics want = reference_statistics(finite);
  for (const auto& st : {emulate_extended_row<float, 32>(row.data(), vocab, {}),
                         emulate_extended_row<float, 512>(row.data(), vocab, {})}) {
    const auto ts = kto::token_statistics(st.s, st.w, st.t);
    CHECK(std::fabs(st.m + std::log(st.s) - want.lse) <= 1e-5 * (std::fabs(want.lse) + 1.0));
    CHECK(std::fabs(ts.entropy - want.entropy) <= 1e-5 * 2.0);
    CHECK(ts.mean_logit == -INFINITY);
  }
  std::vector<float> nan_row(vocab, 0.5f);
  nan_row[1234] = NAN;
  const auto st = emulate_extended_row<float, 512>(nan_row.data(), vocab, {});
  CHECK_FALSE(std::isfinite(st.m + std::log(st.s)));
  CHECK_FALSE(std::isfinite(kto::token_statistics(st.s, st.w, st.t).entropy));
}

TEMPLATE_TEST_CASE("forward and backward row logic: finfo.min masks get exactly zero p",
                   "[device][masked]", float, __half, __nv_bfloat16) {
  // Hugging Face masks with the dtype's lowest finite value: its p underflows, so it adds
  // exactly 0 to s, w and the gradient; the mean logit (Σ x / V) stays finite.
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 2.0);
  const index_t vocab = GENERATE(37, 3001);
  const double lowest = std::is_same<T, float>::value    ? -std::numeric_limits<float>::max()
                        : std::is_same<T, __half>::value ? -65504.0
                                                         : -0x1.fep127;  // bf16's lowest
  std::vector<T> row(vocab);
  std::vector<double> z(vocab), kept;
  std::vector<bool> masked(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    masked[v] = v % 3 == 1 || v == 2;  // inside every vector of 2, 4 or 8 elements
    row[v] = cast<T>(masked[v] ? lowest : normal(rng));
    z[v] = kto::device::to_float(row[v]);
    if (!masked[v]) kept.push_back(z[v]);
  }
  REQUIRE(std::isfinite(lowest));
  const ReferenceStatistics want = reference_statistics(kept);
  double mean = 0, abs_mean = 0;
  for (double x : z) mean += x / vocab, abs_mean += std::fabs(x) / vocab;
  for (const auto& st : {emulate_extended_row<T, 32>(row.data(), vocab, {}),
                         emulate_extended_row<T, 512>(row.data(), vocab, {})}) {
    const auto ts = kto::token_statistics(st.s, st.w, st.t);
    CHECK(std::fabs(st.m + std::log(st.s) - want.lse) <= 1e-5 * (std::fabs(want.lse) + 1.0));
    CHECK(std::fabs(ts.entropy - want.entropy) <= 1e-5 * (1 + 16 * 2.0));  // range of kept z
    REQUIRE(std::isfinite(ts.mean_logit));
    CHECK(std::fabs(ts.mean_logit - mean) <=
          (sum_bound(vocab, 32, abs_mean * vocab) + 2 * 0x1p-24 * abs_mean * vocab) / vocab);
  }
  const float lse = static_cast<float>(want.lse);
  std::vector<T> out(vocab, cast<T>(NAN));
  for (int lane = 0; lane < 32; ++lane)
    kto::device::write_row<T, 32>(row.data(), out.data(), vocab, 0, lse, -0.5f, lane, false);
  index_t nonzero = 0;
  for (index_t v = 0; v < vocab; ++v)
    if (masked[v] && kto::device::to_float(out[v]) != 0.0f) ++nonzero;
  CHECK(nonzero == 0);
}

TEMPLATE_TEST_CASE("extended backward row logic carries the transform's derivative", "[device]",
                   float, __half, __nv_bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 2.0);
  const index_t vocab = GENERATE(1, 9, 123, 5001);
  const int shift = GENERATE(0, 1);
  std::vector<T> in(vocab + 16), out(vocab + 16);
  std::vector<double> z(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    in[shift + v] = cast<T>(normal(rng));
    z[v] = kto::device::to_float(in[shift + v]);
  }
  const double u = std::is_same<T, float>::value    ? 0x1p-24
                   : std::is_same<T, __half>::value ? 0x1p-11
                                                    : 0x1p-8;
  const index_t target = vocab / 3;
  const float scale = 0.81f;
  for (const kto::LogitTransform& t : test_transforms()) {
    const auto rt = kto::device::RowTransform::of(t);
    const std::vector<double> zt = TransformedRow(z, t).values;
    const double lse = reference_lse(zt);
    INFO("V " << vocab << " shift " << shift << " scale " << t.scale << " cap " << t.softcap);
    auto run = [&](auto threads) {
      constexpr int K = decltype(threads)::value;
      std::fill(out.begin(), out.end(), cast<T>(NAN));
      for (int lane = 0; lane < K; ++lane)
        kto::device::write_row<T, K, true>(in.data() + shift, out.data() + shift, vocab, target,
                                           static_cast<float>(lse), scale, lane, false, rt);
      index_t bad = 0;
      for (index_t v = 0; v < vocab; ++v) {
        const double d = reference_derivative(z[v], t);
        const double want = scale * ((v == target ? 1.0 : 0.0) - std::exp(zt[v] - lse)) * d;
        const double got = kto::device::to_float(out[shift + v]);
        if (!(std::fabs(got - want) <=
              1e-5 * std::fabs(scale) * std::fabs(d) * (1 + std::fabs(lse)) + u * std::fabs(want)))
          ++bad;
      }
      CHECK(bad == 0);
      CHECK(std::isnan(kto::device::to_float(out[shift + vocab])));
    };
    run(std::integral_constant<int, 32>{});
    run(std::integral_constant<int, 512>{});
  }
}

TEST_CASE("extended fused-linear lanes transform Z + b, with statistics and derivative",
          "[device]") {
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 3.0);
  const index_t vocab = GENERATE(1, 5, 123, 5001);
  alignas(16) static float row[5004], bias[5004];
  alignas(16) static float out[5008];
  std::vector<double> z(vocab);
  for (index_t v = 0; v < vocab; ++v) {
    row[v] = static_cast<float>(normal(rng));
    bias[v] = static_cast<float>(normal(rng));
    z[v] = double(row[v] + bias[v]);  // the kernels add in float first
  }
  const index_t target = vocab - 1;
  const float scale = -1.25f;
  for (const kto::LogitTransform& t : test_transforms()) {
    const auto rt = kto::device::RowTransform::of(t);
    const TransformedRow row_t(z, t);
    const std::vector<double>& zt = row_t.values;
    const ReferenceStatistics want = reference_statistics(zt);
    INFO("V " << vocab << " scale " << t.scale << " cap " << t.softcap);
    auto emulate = [&](auto threads) {
      constexpr int K = decltype(threads)::value;
      std::vector<kto::device::StatisticsState> st(K);
      for (int lane = 0; lane < K; ++lane)
        st[lane] = kto::device::thread_biased_lse<K, true>(row, bias, vocab, lane, rt);
      check_row_state(emulate_group_reduce(st), row_t, K);
      std::fill(std::begin(out), std::end(out), NAN);
      for (int lane = 0; lane < K; ++lane)
        kto::device::write_chunk_row<float, K, true>(
            row, bias, out, vocab, target, static_cast<float>(want.lse), scale, lane, false, rt);
      index_t bad = 0;
      for (index_t v = 0; v < vocab; ++v) {
        const double d = reference_derivative(z[v], t);
        const double g = scale * ((v == target ? 1.0 : 0.0) - std::exp(zt[v] - want.lse)) * d;
        if (!(std::fabs(out[v] - g) <=
              1e-5 * std::fabs(scale) * std::fabs(d) * (1 + std::fabs(want.lse)) +
                  0x1p-24 * std::fabs(g)))
          ++bad;
      }
      CHECK(bad == 0);
    };
    emulate(std::integral_constant<int, 32>{});
    emulate(std::integral_constant<int, 512>{});
  }
}

/// Every lane of every row of a chunk through chunk_backward_row (the kernel's body).
template <class T, int kThreads, bool kExtended>
void emulate_chunk_backward(const kto::device::ChunkBackwardParams<T>& p) {
  for (index_t i = 0; i < p.z.rows; ++i)
    for (int lane = 0; lane < kThreads; ++lane)
      kto::device::chunk_backward_row<T, kThreads, kExtended>(p, i, lane);
}

TEMPLATE_TEST_CASE("vocab blocks: each block's lanes write the whole row's dZ of its columns",
                   "[device][vocab_blocks]", float, __half, __nv_bfloat16) {
  // Strategy vocab_blocks' dZ kernel over a block of columns [v0, v0 + w) (its logits
  // alone, `cols` apart) writes what the whole-row kernel writes there, bit for bit, and
  // nothing in the block's padding: the relative target, the bias offset and the width.
  // Rows: unscored (ignore_index), a zero row scale, targets in the first and last block.
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 2.0);
  const index_t vocab = GENERATE(37, 200, 5001);
  const index_t cols = GENERATE(64, 128);
  const bool with_bias = GENERATE(true, false);
  const int transform = GENERATE(0, 1);  // none; a soft-cap (the extended kernels)
  INFO("V " << vocab << " block " << cols << " bias " << with_bias << " transform " << transform);
  // operator new's alignment covers the kernels' float4 and 4-element stores: every row
  // below starts a multiple of 4 elements in.
  static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "vectors must be 16-byte aligned");
  constexpr index_t rows = 6;
  const index_t ld = (vocab + 3) / 4 * 4;
  std::vector<float> z(rows * ld), bias(ld);
  for (auto& x : z) x = static_cast<float>(normal(rng));
  for (auto& x : bias) x = static_cast<float>(normal(rng));
  std::vector<index_t> targets = {-100, 0, vocab - 1, vocab / 2, 1, vocab - 2};
  const std::vector<index_t> offsets = {0, rows};
  std::vector<float> scale = {0.5f, -0.7f, 1.1f, 0.0f, -0.3f, 0.9f};
  std::vector<float> lse(rows);
  for (index_t r = 0; r < rows; ++r) {
    std::vector<double> row(static_cast<size_t>(vocab));
    for (index_t v = 0; v < vocab; ++v) row[v] = double(z[r * ld + v]) + (with_bias ? bias[v] : 0);
    lse[r] = static_cast<float>(reference_lse(row));  // any value: both runs read the same
  }
  kto::LogitTransform capped;
  capped.softcap = 4.0;
  const auto rt = kto::device::RowTransform::of(transform ? capped : kto::LogitTransform{});
  const kto::device::BatchRows batch{kto::targets_vector(targets.data(), rows),
                                     kto::sequences(offsets.data(), 1), rows, -100};
  auto params = [&](const float* logits, index_t z_ld, T* grad, index_t v0, index_t w) {
    const float* b = with_bias ? bias.data() + v0 : nullptr;  // the block's columns' bias
    const kto::device::ChunkView view{logits, z_ld, vocab, b, 0, rows};
    return kto::device::ChunkBackwardParams<T>{view, batch, lse.data(), scale.data(), grad, z_ld,
                                               rt,   v0,    w};
  };
  const T poison = cast<T>(NAN);
  auto same_bits = [](T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; };
  auto emulate = [&](auto threads) {
    constexpr int K = decltype(threads)::value;
    auto run = [&](const kto::device::ChunkBackwardParams<T>& p) {
      if (transform)
        emulate_chunk_backward<T, K, true>(p);
      else
        emulate_chunk_backward<T, K, false>(p);
    };
    std::vector<T> whole(rows * ld, poison);
    run(params(z.data(), ld, whole.data(), 0, 0));
    index_t blocks = 0, differ = 0, past = 0;
    for (index_t v0 = 0; v0 < vocab; v0 += cols, ++blocks) {
      const index_t w = std::min(cols, vocab - v0);
      std::vector<float> block(rows * cols, NAN);
      for (index_t r = 0; r < rows; ++r)
        std::copy(z.begin() + r * ld + v0, z.begin() + r * ld + v0 + w, block.begin() + r * cols);
      std::vector<T> grad(rows * cols, poison);
      run(params(block.data(), cols, grad.data(), v0, w));
      for (index_t r = 0; r < rows; ++r) {
        for (index_t k = 0; k < w; ++k)
          differ += !same_bits(grad[r * cols + k], whole[r * ld + v0 + k]);
        for (index_t k = w; k < cols; ++k) past += !same_bits(grad[r * cols + k], poison);
      }
    }
    INFO("lanes " << K << " blocks " << blocks);
    CHECK(blocks == (vocab + cols - 1) / cols);
    CHECK(differ == 0);
    CHECK(past == 0);
    // The whole row's dZ is right (so agreeing with it means something): the one-hot at
    // each scored row's target, zeros on the unscored row and the zero-scale row.
    index_t nonzero = 0;
    for (index_t v = 0; v < vocab; ++v)  // row 0: ignore_index; row 3: scale 0
      nonzero += !same_bits(whole[v], cast<T>(0.0)) + !same_bits(whole[3 * ld + v], cast<T>(0.0));
    CHECK(nonzero == 0);
    const double g = kto::device::to_float(whole[1 * ld + 0]);  // row 1's target column
    const double x = double(z[1 * ld]) + (with_bias ? bias[0] : 0);
    if (!transform)
      CHECK(std::fabs(g - scale[1] * (1.0 - std::exp(x - lse[1]))) <= 1e-5 + 0x1p-7 * std::fabs(g));
  };
  emulate(std::integral_constant<int, 32>{});
  emulate(std::integral_constant<int, 512>{});
}

TEST_CASE("vocab parallel: slice partials merged in rank order give the row's lse and target",
          "[device][vocab_parallel]") {
  // Each slice's lanes fold their columns (thread_biased_lse, then the group reduction),
  // slice_partial() takes the target logit when the slice holds it, and merge_gathered()
  // folds the ranks as kto::merge_row_partials does on the host, bit for bit; the merged
  // lse is the row's float64 lse at 1e-5 of its scale, the target logit exact.
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<double> normal(0.0, 3.0);
  const index_t vocab = GENERATE(7, 123, 5001);
  const index_t ranks = GENERATE(1, 2, 3);
  const bool with_bias = GENERATE(true, false);
  INFO("V " << vocab << " ranks " << ranks << " bias " << with_bias);
  std::vector<float> z(static_cast<size_t>(vocab)), bias(static_cast<size_t>(vocab));
  std::vector<double> x(static_cast<size_t>(vocab));
  for (index_t v = 0; v < vocab; ++v) {
    z[v] = static_cast<float>(normal(rng));
    bias[v] = with_bias ? static_cast<float>(normal(rng)) : 0.0f;
    x[v] = double(z[v] + bias[v]);  // the kernels add in float first
  }
  const double lse = reference_lse(x);
  for (const index_t target : {index_t{0}, vocab / 2, vocab - 1}) {
    INFO("target " << target);
    // Slices start at multiples of 4 (the float4 loads), uneven in length.
    std::vector<index_t> begin(static_cast<size_t>(ranks + 1), 0);
    for (index_t k = 1; k < ranks; ++k)
      begin[k] = std::max(begin[k - 1], vocab * k / ranks / 4 * 4);
    begin[ranks] = vocab;
    std::vector<kto::RowPartial<float>> gathered;
    auto slice = [&](auto threads, index_t k) {
      constexpr int K = decltype(threads)::value;
      const index_t v0 = begin[k], cols = begin[k + 1] - v0;
      std::vector<kto::device::RowState<false>> st(K);
      for (int lane = 0; lane < K; ++lane)
        st[lane] = kto::device::thread_biased_lse<K>(z.data() + v0, bias.data() + v0, cols, lane);
      return kto::device::slice_partial<false>(emulate_group_reduce(st), z.data() + v0,
                                               bias.data() + v0, target, v0, cols, {});
    };
    for (const int lanes : {32, 512}) {
      gathered.clear();
      for (index_t k = 0; k < ranks; ++k)
        gathered.push_back(lanes == 32 ? slice(std::integral_constant<int, 32>{}, k)
                                       : slice(std::integral_constant<int, 512>{}, k));
      const auto merged = kto::device::merge_gathered(gathered.data(), ranks, 1, 0);
      const auto host = kto::merge_row_partials(gathered, ranks)[0];
      CHECK(std::memcmp(&merged, &host, sizeof(merged)) == 0);
      // The step's layout: each rank sends `stride` rows (KL rows first), this batch's from
      // `first`; this is row 1 of it. Every other entry is NaN and must not be read.
      constexpr index_t stride = 5, first = 2, row = 1;
      std::vector<kto::RowPartial<float>> wide(static_cast<size_t>(ranks * stride),
                                               kto::RowPartial<float>{NAN, NAN});
      for (index_t k = 0; k < ranks; ++k) wide[k * stride + first + row] = gathered[k];
      const auto strided = kto::device::merge_gathered(wide.data() + first, ranks, stride, row);
      CHECK(std::memcmp(&strided, &host, sizeof(strided)) == 0);
      CHECK(merged.target_logit == z[target] + bias[target]);
      CHECK(std::fabs(merged.lse - lse) <= 1e-5 * (1.0 + std::fabs(lse)));
    }
  }
}

TEST_CASE("compact rows: every lane's segment, the scan and the writes list the scored rows",
          "[device][compact]") {
  // compact_rows_kernel emulated: all kCompactThreads lanes count their segment, lane 0's
  // exclusive scan, then each lane writes its rows; against a plain scan of the rows.
  using namespace kto::device;
  std::mt19937_64 rng(test::fresh_seed());
  for (index_t rows : {0, 1, 7, 1023, 1024, 1025, 5000, 70001}) {
    std::vector<index_t> targets(static_cast<size_t>(rows));
    std::bernoulli_distribution ignored(0.45);
    for (auto& t : targets) t = ignored(rng) ? -100 : 3;
    const std::vector<index_t> offsets = {0, rows / 3, rows - rows / 5};  // rows past: unscored
    const BatchRows batch{kto::targets_vector(targets.data(), rows),
                          kto::sequences(offsets.data(), 2), rows, -100};
    std::vector<index_t> want;
    for (index_t r = 0; r < rows; ++r)
      if (r < offsets[2] && targets[r] != -100) want.push_back(r);
    std::vector<index_t> first(kCompactThreads);
    std::vector<std::pair<index_t, index_t>> segments(kCompactThreads);
    for (int t = 0; t < kCompactThreads; ++t) {
      compact_segment(rows, t, segments[t].first, segments[t].second);
      first[t] = count_scored(batch, segments[t].first, segments[t].second);
    }
    index_t run = 0;
    for (auto& f : first) {
      const index_t n = f;
      f = run;
      run += n;
    }
    INFO("rows " << rows);
    REQUIRE(run == static_cast<index_t>(want.size()));
    std::vector<index_t> row_of(want.size(), -1);
    for (int t = 0; t < kCompactThreads; ++t)
      write_scored(batch, segments[t].first, segments[t].second, first[t], row_of.data(), run);
    CHECK(row_of == want);
    // Segments tile [0, rows) in order, each lane's at most ceil(rows / lanes) long.
    for (int t = 1; t < kCompactThreads; ++t) CHECK(segments[t].first == segments[t - 1].second);
    CHECK(segments.back().second == rows);
    // A host count one short: the writes stop at the map's end.
    if (run > 0) {
      std::vector<index_t> short_map(want.size() + 1, -7);
      for (int t = 0; t < kCompactThreads; ++t)
        write_scored(batch, segments[t].first, segments[t].second, first[t], short_map.data(),
                     run - 1);
      CHECK(short_map[static_cast<size_t>(run - 1)] == -7);
    }
  }
}

TEST_CASE("device error keys rank a forward cause before the finish's consequence", "[device]") {
  using namespace kto::device;
  // A NaN logit in row 5000 makes sequence 2's log-prob NaN: the row must win.
  const auto cause = error_key(5000, kNonFiniteLogits);
  const auto consequence = error_key(2, kNonFiniteInput);
  CHECK(cause < consequence);
  CHECK(error_key(7, kTargetOutOfRange | kKlBatchTag) < error_key(1, kInvalidLabel));
  // host_targets that disagree with targets explain the rows nobody scored.
  CHECK(error_key(100000, kHostTargetsMismatch) < error_key(0, kNonFiniteInput));
  // Within a stage the lowest index wins, and the index reads back.
  CHECK(error_key(3, kNonFiniteLogits) < error_key(4, kTargetOutOfRange));
  // Another rank's failure ranks after any error of this rank's own.
  CHECK(error_key(123456, kInvalidLabel) < error_key(1, kPeerFailure));
  CHECK(error_key(123456, kNonFiniteInput | kKlBatchTag) < error_key(1, kPeerFailure));
  for (long long index : {0LL, 1LL, 123456789LL, (1LL << 40) + 5})
    for (unsigned kind : {1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u, 2u | kKlBatchTag, 8u | kKlBatchTag}) {
      const auto key = error_key(index, kind);
      CHECK(error_index(key) == index);
      CHECK((key & kKindMask) == (kind & kKindMask));
      CHECK(((key & kKlBatchTag) != 0) == ((kind & kKlBatchTag) != 0));
      CHECK(key != kNoError);
    }
}

TEST_CASE("masked row copy: scored rows copied, ignored rows zeroed, every column once",
          "[device]") {
  const index_t cols = 37;
  std::vector<float> in(cols, NAN), out(cols, 5.0f);
  for (index_t step : {1, 4, 32, 128}) {
    std::fill(out.begin(), out.end(), 5.0f);
    for (index_t t = 0; t < step; ++t)  // every lane of a block of `step` threads
      kto::device::masked_row_copy(in.data(), out.data(), cols, t, step, false);
    for (float x : out) CHECK(x == 0.0f);
    for (index_t k = 0; k < cols; ++k) in[static_cast<size_t>(k)] = 0.5f * static_cast<float>(k);
    for (index_t t = 0; t < step; ++t)
      kto::device::masked_row_copy(in.data(), out.data(), cols, t, step, true);
    CHECK(out == in);
    std::fill(in.begin(), in.end(), NAN);
  }
}
