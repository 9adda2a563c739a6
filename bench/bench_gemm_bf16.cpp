// bench_gemm_bf16 — the three GEMMs of the CPU fused lm-head step, one thread:
// kto::cpu::gemm_bf16 on the bf16 operands against Eigen's fp32 GEMM on widened
// copies (what ChunkEngine runs; the widening itself is not timed).
//
//   Z = H·Wᵀ     m × 256, k = D    A = H (bf16 rows), B = Wᵀ tile (k-contiguous columns)
//   dW += Gᵀ·H   256 × D, k = m    A = Gᵀ (float, split hi + lo), B = H
//   dH = G·W     32 × D,  k = V    A = G (float, split hi + lo), B = W
//
// GFLOP/s count 2·m·n·k. A float A is multiplied as hi + lo, so VDPBF16PS does
// twice that work there: its ceiling is half of the bf16 one. Each repetition
// takes the next vocabulary tile (or row tile), so operands come from memory
// as in the engine; the median of the repetitions is reported.
#include <kto/cpu/gemm_bf16.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using kto::index_t;
using bf16 = Eigen::bfloat16;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
using ConstMap = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;

constexpr index_t kVocab = 32000, kTile = 256, kRows = 32;

/// Median seconds of `reps` calls of f(rep).
template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <class T>
std::vector<T> random_vector(std::mt19937_64& rng, index_t n) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<T> v(static_cast<size_t>(n));
  for (auto& x : v) x = T(u(rng));
  return v;
}

std::vector<float> widened(const std::vector<bf16>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = static_cast<float>(x[i]);
  return y;
}

void report(const char* name, index_t m, index_t n, index_t k, index_t dim, double bf16_s,
            double eigen_s) {
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  char shape[64];
  std::snprintf(shape, sizeof shape, "%ldx%ldx%ld", static_cast<long>(m), static_cast<long>(n),
                static_cast<long>(k));
  std::printf("%-10s %5ld %-18s %8.1f %8.1f %7.2fx\n", name, static_cast<long>(dim), shape,
              flops / bf16_s * 1e-9, flops / eigen_s * 1e-9, eigen_s / bf16_s);
}

}  // namespace

int main() {
  if (!kto::cpu::bf16_gemm_supported()) {
    std::printf("no AVX512-BF16 on this CPU: gemm_bf16 would run its scalar path; nothing timed\n");
    return 0;
  }
  Eigen::setNbThreads(1);
  std::mt19937_64 rng(1);
  std::printf("one thread, V = %ld, vocab tile %ld, row tile %ld; GFLOP/s = 2mnk / median time\n",
              static_cast<long>(kVocab), static_cast<long>(kTile), static_cast<long>(kRows));
  std::printf("%-10s %5s %-18s %8s %8s %8s\n", "product", "D", "m x n x k", "bf16", "Eigen32",
              "speedup");
  const int reps = 9;
  for (const index_t dim : {index_t{256}, index_t{1024}}) {
    const auto w = random_vector<bf16>(rng, kVocab * dim);  // V × D
    const auto w32 = widened(w);
    bool dh_done = false;
    for (const index_t m : {index_t{384}, index_t{2048}}) {
      const auto h = random_vector<bf16>(rng, m * dim);      // m × D
      const auto g = random_vector<float>(rng, m * kVocab);  // m × V
      const auto h32 = widened(h);
      std::vector<float> z(static_cast<size_t>(m * kTile)), dw(static_cast<size_t>(kTile * dim));
      const index_t tiles = kVocab / kTile;

      // Z = H·Wᵀ over vocab tile t.
      const double z_bf16 = median_seconds(reps, [&](int r) {
        const bf16* tile = w.data() + (r % tiles) * kTile * dim;
        kto::cpu::gemm_bf16(m, kTile, dim, {h.data(), dim, 1}, {tile, 1, dim}, z.data(), kTile,
                            false);
      });
      const double z_eigen = median_seconds(reps, [&](int r) {
        ConstMap hm(h32.data(), m, dim, Eigen::OuterStride<>(dim));
        ConstMap wm(w32.data() + (r % tiles) * kTile * dim, kTile, dim, Eigen::OuterStride<>(dim));
        Map zm(z.data(), m, kTile, Eigen::OuterStride<>(kTile));
        zm.noalias() = hm * wm.transpose();
      });
      report("Z=H.Wt", m, kTile, dim, dim, z_bf16, z_eigen);

      // dW_tile += Gᵀ·H: A = the tile's columns of G, read down (row stride 1).
      const double dw_bf16 = median_seconds(reps, [&](int r) {
        const float* gt = g.data() + (r % tiles) * kTile;
        kto::cpu::gemm_bf16(kTile, dim, m, {gt, 1, kVocab}, {h.data(), dim, 1}, dw.data(), dim,
                            true);
      });
      const double dw_eigen = median_seconds(reps, [&](int r) {
        ConstMap gm(g.data() + (r % tiles) * kTile, m, kTile, Eigen::OuterStride<>(kVocab));
        ConstMap hm(h32.data(), m, dim, Eigen::OuterStride<>(dim));
        Map dwm(dw.data(), kTile, dim, Eigen::OuterStride<>(dim));
        dwm.noalias() += gm.transpose() * hm;
      });
      report("dW+=Gt.H", kTile, dim, m, dim, dw_bf16, dw_eigen);

      if (dh_done) continue;  // dH does not depend on m
      dh_done = true;
      std::vector<float> dh(static_cast<size_t>(kRows * dim));
      const double dh_bf16 = median_seconds(5, [&](int r) {
        const float* rows = g.data() + (r * kRows % (m - kRows + 1)) * kVocab;
        kto::cpu::gemm_bf16(kRows, dim, kVocab, {rows, kVocab, 1}, {w.data(), dim, 1}, dh.data(),
                            dim, false);
      });
      const double dh_eigen = median_seconds(5, [&](int r) {
        ConstMap gm(g.data() + (r * kRows % (m - kRows + 1)) * kVocab, kRows, kVocab,
                    Eigen::OuterStride<>(kVocab));
        ConstMap wm(w32.data(), kVocab, dim, Eigen::OuterStride<>(dim));
        Map dhm(dh.data(), kRows, dim, Eigen::OuterStride<>(dim));
        dhm.noalias() = gm * wm;
      });
      report("dH=G.W", kRows, dim, kVocab, dim, dh_bf16, dh_eigen);
    }
  }
  return 0;
}
