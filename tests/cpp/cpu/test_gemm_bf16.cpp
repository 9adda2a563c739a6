// The bfloat16 GEMM (cpu/gemm_bf16.hpp) against a float64 reference, on the
// AVX512-BF16 kernel where this CPU has it and on the portable scalar path.
//
// Tolerance rule. C(i, j) is an fp32 sum of N = (k or 2k for a split float A)
// exact products added one at a time to C0 = (accumulate ? C : 0), so with
// u = 2^-24 and S = |C0| + Σ_p |a_ip b_pj| (the magnitudes the sum was formed from)
//     |got − want| ≤ c · (N + 1) · u · S,   c = 2,
// where want is the float64 sum of the products of the stored values (the bf16
// values of A, or the fp32 values of a float A). A float A is multiplied as
// hi + lo with |a − hi − lo| ≤ 2^-17 |a|, which adds 2^-16 · Σ_p |a_ip b_pj|.
// Inputs are normal numbers (|x| in [2^-8, 2^8]): VDPBF16PS flushes denormals.
#include "support.hpp"

#include <kto/cpu/gemm_bf16.hpp>

namespace {

using bf16 = Eigen::bfloat16;
using kto::index_t;
using kto::cpu::GemmOperand;

constexpr double kTolC = 2;
constexpr double kU = 0x1p-24;

const char* path_name() {
  return kto::cpu::bf16_gemm_supported() ? "AVX512-BF16 kernel" : "portable scalar path";
}

/// How a logical rows × cols matrix lies in memory.
enum class Storage { row_major, col_major, strided };
constexpr Storage kStorages[] = {Storage::row_major, Storage::col_major, Storage::strided};
const char* storage_name(Storage s) {
  return s == Storage::row_major ? "row-major" : s == Storage::col_major ? "col-major" : "strided";
}

/// A matrix in a NaN-filled buffer (a read outside it poisons the result), starting
/// `shift` elements in, so that tests can move it off any alignment.
template <class T>
struct Matrix {
  index_t rows = 0, cols = 0, row_stride = 0, col_stride = 0, shift = 0;
  std::vector<T> buffer;
  T& at(index_t i, index_t p) {
    return buffer[static_cast<size_t>(shift + i * row_stride + p * col_stride)];
  }
  double value(index_t i, index_t p) const {
    return static_cast<double>(
        static_cast<float>(buffer[static_cast<size_t>(shift + i * row_stride + p * col_stride)]));
  }
  GemmOperand<T> operand() const { return {buffer.data() + shift, row_stride, col_stride}; }
};

template <class T>
Matrix<T> lay_out(index_t rows, index_t cols, Storage s, index_t shift = 0) {
  Matrix<T> x;
  x.rows = rows, x.cols = cols, x.shift = shift;
  if (s == Storage::row_major) x.row_stride = cols + 3, x.col_stride = 1;
  if (s == Storage::col_major) x.row_stride = 1, x.col_stride = rows + 2;
  if (s == Storage::strided) x.row_stride = 2 * cols + 1, x.col_stride = 2;
  const index_t extent =
      rows > 0 && cols > 0 ? (rows - 1) * x.row_stride + (cols - 1) * x.col_stride + 1 : 0;
  x.buffer.assign(static_cast<size_t>(shift + extent + 7),
                  T(std::numeric_limits<float>::quiet_NaN()));
  return x;
}

/// ± (1 + f) · 2^e with e in [-8, 8]: magnitudes spanning 2^16, signs mixed.
float spread(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> frac(0.f, 1.f);
  std::uniform_int_distribution<int> exponent(-8, 8), sign(0, 1);
  return std::ldexp(1.f + frac(rng), exponent(rng)) * (sign(rng) ? -1.f : 1.f);
}

template <class T>
Matrix<T> random_matrix(std::mt19937_64& rng, index_t rows, index_t cols, Storage s,
                        index_t shift = 0) {
  auto x = lay_out<T>(rows, cols, s, shift);
  for (index_t i = 0; i < rows; ++i)
    for (index_t p = 0; p < cols; ++p) x.at(i, p) = T(spread(rng));
  return x;
}

template <class T>
Matrix<T> copy_as(const Matrix<T>& from, Storage s, index_t shift = 0) {
  auto x = lay_out<T>(from.rows, from.cols, s, shift);
  for (index_t i = 0; i < from.rows; ++i)
    for (index_t p = 0; p < from.cols; ++p)
      x.at(i, p) =
          from.buffer[static_cast<size_t>(from.shift + i * from.row_stride + p * from.col_stride)];
  return x;
}

/// C (m × n, leading dimension n + 5) holding C0; the padding columns hold a sentinel.
constexpr float kSentinel = 12345.f;
struct Output {
  index_t m, n, ldc;
  std::vector<float> c;
  float* data() { return c.data(); }
  float at(index_t i, index_t j) const { return c[static_cast<size_t>(i * ldc + j)]; }
};
Output make_output(std::mt19937_64& rng, index_t m, index_t n) {
  Output out{m, n, n + 5, {}};
  out.c.assign(static_cast<size_t>(std::max<index_t>(1, m * out.ldc)), kSentinel);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) out.c[static_cast<size_t>(i * out.ldc + j)] = spread(rng);
  return out;
}

/// Runs gemm (the dispatch or the scalar path) and checks every element against
/// the float64 reference with the tolerance rule; returns the number of failures.
template <class TA, class Run>
index_t check_against_reference(const Matrix<TA>& a, const Matrix<bf16>& b, const Output& c0,
                                bool accumulate, Run&& run) {
  const index_t m = a.rows, k = a.cols, n = b.cols;
  constexpr bool split = std::is_same<TA, float>::value;
  Output c = c0;
  run(m, n, k, a.operand(), b.operand(), c.data(), c.ldc, accumulate);
  index_t failures = 0;
  const double terms = static_cast<double>(split ? 2 * k : k) + 1;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < c.ldc; ++j) {
      const float got = c.at(i, j);
      if (j >= n) {  // padding of C: untouched
        if (got != kSentinel && failures++ < 3) CHECK(got == kSentinel);
        continue;
      }
      const double start = accumulate ? static_cast<double>(c0.at(i, j)) : 0.0;
      double want = start, products = 0;
      for (index_t p = 0; p < k; ++p) {
        const double t = a.value(i, p) * b.value(p, j);
        want += t;
        products += std::fabs(t);
      }
      const double scale = std::fabs(start) + products;
      const double tol = kTolC * terms * kU * scale + (split ? 0x1p-16 * products : 0.0);
      const double err = std::fabs(static_cast<double>(got) - want);
      if (!(err <= tol) && failures++ < 3) {
        INFO("C(" << i << ", " << j << ") = " << got << ", want " << want << ", error " << err
                  << ", tolerance " << tol);
        CHECK(err <= tol);
      }
    }
  }
  return failures;
}

template <class TA>
void dispatch(index_t m, index_t n, index_t k, GemmOperand<TA> a, GemmOperand<bf16> b, float* c,
              index_t ldc, bool accumulate) {
  kto::cpu::gemm_bf16(m, n, k, a, b, c, ldc, accumulate);
}
template <class TA>
void scalar(index_t m, index_t n, index_t k, GemmOperand<TA> a, GemmOperand<bf16> b, float* c,
            index_t ldc, bool accumulate) {
  kto::cpu::detail::gemm_bf16_scalar(m, n, k, a, b, c, ldc, accumulate);
}

struct Shape {
  index_t m, n, k;
};

std::vector<Shape> reference_shapes() {
  std::vector<Shape> shapes;
  const index_t small[] = {0, 1, 2, 3, 15, 16, 17, 31, 33, 47};
  for (index_t m : small)
    for (index_t n : small)
      for (index_t k : small) shapes.push_back({m, n, k});
  // Full tiles, several tiles, and the cache blocks' edges: m past kMC rows,
  // k past kKC pairs (bf16 and split), n past kNC columns.
  const Shape large[] = {{64, 64, 64},  {100, 64, 100},  {257, 33, 17},  {17, 257, 100},
                         {33, 47, 257}, {100, 100, 257}, {257, 257, 64}, {300, 70, 520},
                         {5, 1600, 40}, {16, 100, 1000}, {2, 3, 401}};
  shapes.insert(shapes.end(), std::begin(large), std::end(large));
  return shapes;
}

}  // namespace

TEMPLATE_TEST_CASE("gemm_bf16 matches a float64 reference in every layout", "[gemm_bf16]", bf16,
                   float) {
  using TA = TestType;
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  WARN("gemm_bf16 runs the " << path_name() << "; A is " << test::type_name<TA>());
  INFO("seed " << seed);
  index_t cases = 0, failures = 0;
  for (const Shape& s : reference_shapes()) {
    // Every pairing of A and B storage and both accumulate modes, spread over the shapes.
    const auto variant = cases++;
    const Storage sa = kStorages[variant % 3], sb = kStorages[(variant / 3) % 3];
    const bool accumulate = (variant / 9) % 2 == 1;
    INFO("m " << s.m << " n " << s.n << " k " << s.k << " A " << storage_name(sa) << " B "
              << storage_name(sb) << " accumulate " << accumulate);
    const auto a = random_matrix<TA>(rng, s.m, s.k, sa);
    const auto b = random_matrix<bf16>(rng, s.k, s.n, sb);
    const auto c0 = make_output(rng, s.m, s.n);
    failures += check_against_reference(a, b, c0, accumulate, dispatch<TA>);
    if (s.m * s.n * s.k <= 100000)  // the scalar path, wherever the kernel ran above
      failures += check_against_reference(a, b, c0, accumulate, scalar<TA>);
  }
  CHECK(cases > 1000);
  CHECK(failures == 0);
}

TEST_CASE("splitting a float A into hi + lo beats rounding it to bfloat16", "[gemm_bf16]") {
  // All-positive terms (no cancellation): rounding A to bf16 errs by ~2^-9 per
  // element, the split by ~2^-17, and the fp32 sum by ~k·2^-24 at worst.
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed << ", " << path_name());
  const index_t m = 16, n = 48, k = 256;
  std::uniform_real_distribution<float> unit(1.f, 2.f);
  auto a = lay_out<float>(m, k, Storage::row_major);
  auto a_rounded = lay_out<bf16>(m, k, Storage::row_major);
  auto b = lay_out<bf16>(k, n, Storage::row_major);
  for (index_t i = 0; i < m; ++i)
    for (index_t p = 0; p < k; ++p) a.at(i, p) = unit(rng), a_rounded.at(i, p) = bf16(a.at(i, p));
  for (index_t p = 0; p < k; ++p)
    for (index_t j = 0; j < n; ++j) b.at(p, j) = bf16(unit(rng));
  std::vector<float> c_split(static_cast<size_t>(m * n)), c_rounded(c_split.size());
  kto::cpu::gemm_bf16(m, n, k, a.operand(), b.operand(), c_split.data(), n, false);
  kto::cpu::gemm_bf16(m, n, k, a_rounded.operand(), b.operand(), c_rounded.data(), n, false);
  double err_split = 0, err_rounded = 0;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double want = 0;  // the exact product of the fp32 A
      for (index_t p = 0; p < k; ++p) want += a.value(i, p) * b.value(p, j);
      const auto at = static_cast<size_t>(i * n + j);
      err_split = std::max(err_split, std::fabs(c_split[at] - want) / want);
      err_rounded = std::max(err_rounded, std::fabs(c_rounded[at] - want) / want);
    }
  }
  INFO("max relative error: split " << err_split << ", bf16-rounded A " << err_rounded);
  CHECK(err_split <= 2 * (2 * k + 1) * kU + 0x1p-16);
  CHECK(err_split * 16 < err_rounded);
}

TEST_CASE("the hi/lo split represents a float to 2^-17", "[gemm_bf16]") {
  using kto::cpu::detail::bf16_value;
  using kto::cpu::detail::split_lane;
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  std::uniform_int_distribution<std::uint32_t> bits;
  index_t bad = 0;
  for (int t = 0; t < 100000; ++t) {
    std::uint32_t u = bits(rng);
    float a;
    std::memcpy(&a, &u, 4);
    if (!std::isnormal(a)) continue;
    const std::uint32_t lane = split_lane(a);
    const double hi = bf16_value(lane & 0xFFFFu), lo = bf16_value(lane >> 16);
    const double err = std::fabs(static_cast<double>(a) - hi - lo);
    // lo below 2^-126 is subnormal (flushed by the kernel): there the bound is absolute.
    // Past bf16's largest finite value hi is truncated: 2^-16 there.
    const double bound = (std::fabs(a) > 3.38e38f ? 0x1p-16 : 0x1p-17) * std::fabs(a) + 0x1p-133;
    if (!(err <= bound) && bad++ < 3) {
      INFO("a " << a << " hi " << hi << " lo " << lo);
      CHECK(err <= bound);
    }
  }
  CHECK(bad == 0);
  // Past bf16's largest finite value hi is truncated, not rounded to inf; inf keeps lo = 0.
  const float huge = std::numeric_limits<float>::max();
  const std::uint32_t lane = split_lane(huge);
  CHECK(std::isfinite(bf16_value(lane & 0xFFFFu)));
  CHECK(bf16_value(lane & 0xFFFFu) + static_cast<double>(bf16_value(lane >> 16)) ==
        Approx(huge).epsilon(1e-5));
  CHECK(split_lane(std::numeric_limits<float>::infinity()) == 0x7F80u);
  CHECK(split_lane(-std::numeric_limits<float>::infinity()) == 0xFF80u);
}

TEMPLATE_TEST_CASE("NaN and Inf in the inputs propagate like a GEMM", "[gemm_bf16]", bf16, float) {
  using TA = TestType;
  INFO(path_name());
  const index_t m = 20, n = 37, k = 33;
  for (int variant = 0; variant < 4; ++variant) {
    const auto run = variant < 2 ? dispatch<TA> : scalar<TA>;
    // Both packing routes of each operand: along rows and along columns.
    const Storage sa = variant % 2 ? Storage::col_major : Storage::row_major;
    const Storage sb = variant % 2 ? Storage::row_major : Storage::col_major;
    INFO((variant < 2 ? "gemm_bf16" : "scalar path")
         << ", A " << storage_name(sa) << ", B " << storage_name(sb));
    auto a = lay_out<TA>(m, k, sa);
    auto b = lay_out<bf16>(k, n, sb);
    for (index_t i = 0; i < m; ++i)
      for (index_t p = 0; p < k; ++p) a.at(i, p) = TA(0.25f + 0.01f * static_cast<float>(p));
    for (index_t p = 0; p < k; ++p)
      for (index_t j = 0; j < n; ++j) b.at(p, j) = bf16(1.f + 0.125f * static_cast<float>(j % 4));
    const float inf = std::numeric_limits<float>::infinity();
    a.at(3, 32) = TA(std::numeric_limits<float>::quiet_NaN());  // k's last, odd: a padded pair
    a.at(9, 7) = TA(inf);
    // Past bf16's largest value: inf as a bf16 A; finite as a float A (hi truncated, not inf).
    a.at(11, 0) = TA(3.4e38f);
    for (index_t j = 0; j < n; ++j) b.at(0, j) = bf16(0x1p-10f);
    b.at(5, 30) = bf16(-inf);
    std::vector<float> c(static_cast<size_t>(m * n), 1.f);
    run(m, n, k, a.operand(), b.operand(), c.data(), n, true);
    const bool row11_inf = !std::is_same<TA, float>::value;
    for (index_t i = 0; i < m; ++i) {
      for (index_t j = 0; j < n; ++j) {
        const float x = c[static_cast<size_t>(i * n + j)];
        INFO("C(" << i << ", " << j << ") = " << x);
        const bool positive_inf = i == 9 || (i == 11 && row11_inf);
        if (i == 3 || (j == 30 && positive_inf)) {
          CHECK(std::isnan(x));  // NaN · b, or inf − inf
        } else if (positive_inf) {
          CHECK((std::isinf(x) && x > 0));
        } else if (j == 30) {
          CHECK((std::isinf(x) && x < 0));
        } else if (i == 11) {
          CHECK((std::isfinite(x) && x > 3.3e35f));
        } else {
          CHECK(std::isfinite(x));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("the bits depend on neither the layout nor the alignment of the buffers",
                   "[gemm_bf16]", bf16, float) {
  using TA = TestType;
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed << ", " << path_name());
  for (const Shape s : {Shape{37, 70, 45}, Shape{200, 50, 401}, Shape{8, 48, 384}}) {
    INFO("m " << s.m << " n " << s.n << " k " << s.k);
    const auto a = random_matrix<TA>(rng, s.m, s.k, Storage::row_major);
    const auto b = random_matrix<bf16>(rng, s.k, s.n, Storage::row_major);
    const auto c0 = make_output(rng, s.m, s.n);
    Output first = c0;
    kto::cpu::gemm_bf16(s.m, s.n, s.k, a.operand(), b.operand(), first.data(), first.ldc, true);
    index_t variant = 0;
    for (const Storage sa : kStorages) {
      for (const Storage sb : kStorages) {
        const index_t shift = ++variant % 5;  // elements: off every alignment of the originals
        const auto a2 = copy_as(a, sa, shift);
        const auto b2 = copy_as(b, sb, 5 - shift);
        std::vector<float> c2(c0.c.size() + 3);
        std::copy(c0.c.begin(), c0.c.end(), c2.begin() + shift % 4);
        kto::cpu::gemm_bf16(s.m, s.n, s.k, a2.operand(), b2.operand(), c2.data() + shift % 4,
                            c0.ldc, true);
        INFO("A " << storage_name(sa) << " B " << storage_name(sb) << " shift " << shift);
        CHECK(std::memcmp(first.c.data(), c2.data() + shift % 4, first.c.size() * 4) == 0);
      }
    }
  }
}

TEMPLATE_TEST_CASE("the AVX512-BF16 kernel and the scalar path agree", "[gemm_bf16]", bf16, float) {
  using TA = TestType;
  if (!kto::cpu::bf16_gemm_supported()) {
    WARN("no AVX512-BF16 on this machine (or not built): only the scalar path was tested");
    return;
  }
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  index_t values = 0, identical = 0;
  for (const Shape s : {Shape{45, 100, 77}, Shape{9, 49, 300}, Shape{64, 32, 16}}) {
    INFO("m " << s.m << " n " << s.n << " k " << s.k);
    const auto a = random_matrix<TA>(rng, s.m, s.k, Storage::col_major);
    const auto b = random_matrix<bf16>(rng, s.k, s.n, Storage::row_major);
    const auto c0 = make_output(rng, s.m, s.n);
    Output fast = c0, slow = c0;
    dispatch<TA>(s.m, s.n, s.k, a.operand(), b.operand(), fast.data(), fast.ldc, true);
    scalar<TA>(s.m, s.n, s.k, a.operand(), b.operand(), slow.data(), slow.ldc, true);
    const double terms = static_cast<double>(std::is_same<TA, float>::value ? 2 * s.k : s.k) + 1;
    for (index_t i = 0; i < s.m; ++i) {
      for (index_t j = 0; j < s.n; ++j) {
        double scale = std::fabs(c0.at(i, j));
        for (index_t p = 0; p < s.k; ++p) scale += std::fabs(a.value(i, p) * b.value(p, j));
        const double diff = std::fabs(static_cast<double>(fast.at(i, j)) - slow.at(i, j));
        ++values;
        identical += fast.at(i, j) == slow.at(i, j);
        // Both are within the rule of the same float64 sum.
        if (!(diff <= 2 * kTolC * terms * kU * scale)) {
          INFO("C(" << i << ", " << j << ") kernel " << fast.at(i, j) << " scalar "
                    << slow.at(i, j));
          CHECK(diff <= 2 * kTolC * terms * kU * scale);
        }
      }
    }
  }
  WARN(identical << " of " << values << " values bit-identical between kernel and scalar path");
}
