// kto_vocab_parallel — the fused-linear KTO step with the lm_head sharded over
// the vocabulary (tensor parallel), one all-gather of two floats a row.
//
// Rank k holds rows [V·k/R, V·(k+1)/R) of W and b. kto::cpu::fused_linear_kto_step
// computes each row's (lse over the slice, target logit if owned) and calls
// back into MPI_Allgather; every rank then merges the same partials in rank
// order, so loss, z0 and g_s agree on all ranks without further traffic. dW
// and db come out as the rank's own slice; dH is a partial sum that the caller
// all-reduces, as for any vocab-parallel lm_head. Rank 0 also runs the
// unsharded step and compares (|a − b| ≤ rtol · max|b|, rtol 1e-12 in double,
// 1e-5 in float). Exit status 0 means they agree.
//
//   mpirun -np 2 build/examples/kto_vocab_parallel
#include <mpi.h>
#include <kto/kto.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using kto::index_t;

template <class T>
struct Batch {
  index_t B = 6, L = 7, D = 24, V = 203, kl_B = 6;
  std::vector<T> hidden, kl_hidden, weight, bias;
  std::vector<index_t> targets, kl_targets;
  std::vector<T> ref_logp, kl_ref_logp;
  std::vector<std::uint8_t> desirable;
  std::vector<index_t> offsets, kl_offsets;
};

template <class T>
Batch<T> make_batch() {
  Batch<T> b;
  std::mt19937_64 rng(2025);  // same on every rank
  std::normal_distribution<double> n01(0.0, 1.0), lp(-40.0, 4.0);
  std::uniform_int_distribution<index_t> tok(0, b.V - 1);
  auto fill = [&](std::vector<T>& v, index_t n, double scale) {
    for (index_t i = 0; i < n; ++i) v.push_back(static_cast<T>(scale * n01(rng)));
  };
  fill(b.hidden, b.B * b.L * b.D, 1.0);
  fill(b.kl_hidden, b.kl_B * b.L * b.D, 1.0);
  fill(b.weight, b.V * b.D, 2.0 / std::sqrt(double(b.D)));
  fill(b.bias, b.V, 0.3);
  for (index_t r = 0; r < b.B * b.L; ++r) b.targets.push_back(r % b.L < 2 ? -100 : tok(rng));
  for (index_t r = 0; r < b.kl_B * b.L; ++r) b.kl_targets.push_back(r % b.L < 2 ? -100 : tok(rng));
  for (index_t s = 0; s < b.B; ++s) {
    b.ref_logp.push_back(static_cast<T>(lp(rng)));
    b.desirable.push_back(static_cast<std::uint8_t>(s % 3 != 0));
  }
  for (index_t s = 0; s < b.kl_B; ++s) b.kl_ref_logp.push_back(static_cast<T>(lp(rng)));
  b.offsets = kto::padded_offsets(b.B, b.L);
  b.kl_offsets = kto::padded_offsets(b.kl_B, b.L);
  return b;
}

template <class T>
struct Grads {
  std::vector<T> d_hidden, d_weight, d_bias;
};

/// The step over weight rows [v0, v0 + nv); sharded when nv < V.
template <class T>
kto::cpu::StepResult<T> run(const Batch<T>& b, index_t v0, index_t nv, const kto::Options& o,
                            Grads<T>& g, const kto::cpu::FusedLinearHooks<T>& hooks) {
  const index_t N = b.B * b.L;
  kto::LinearHead<T> head;
  head.weight = kto::matrix_view<const T>(b.weight.data() + v0 * b.D, nv, b.D);
  head.bias = kto::make_span(b.bias.data() + v0, nv);
  head.vocab_begin = v0;
  head.vocab_total = b.V;
  kto::cpu::FusedLinearInputs<T> in;
  in.hidden = kto::matrix_view<const T>(b.hidden.data(), N, b.D);
  in.targets = kto::targets_vector(b.targets.data(), N);
  in.sequences = kto::sequences(b.offsets.data(), b.B);
  in.reference_logp = kto::reference_logp(b.ref_logp);
  in.desirable = kto::make_span(b.desirable);
  in.kl.hidden = kto::matrix_view<const T>(b.kl_hidden.data(), b.kl_B * b.L, b.D);
  in.kl.targets = kto::targets_vector(b.kl_targets.data(), b.kl_B * b.L);
  in.kl.sequences = kto::sequences(b.kl_offsets.data(), b.kl_B);
  in.kl.reference_logp = kto::reference_logp(b.kl_ref_logp);
  g.d_hidden.assign(N * b.D, NAN);
  g.d_weight.assign(nv * b.D, NAN);
  g.d_bias.assign(nv, NAN);
  kto::cpu::LinearGradients<T> grads;
  grads.d_hidden = kto::matrix_view(g.d_hidden.data(), N, b.D);
  grads.d_weight = kto::matrix_view(g.d_weight.data(), nv, b.D);
  grads.d_bias = kto::make_span(g.d_bias.data(), nv);
  kto::cpu::FusedLinearConfig cfg;
  cfg.chunk_bytes = 16 * sizeof(T) * static_cast<size_t>(nv + b.D);  // 16-row chunks
  return kto::cpu::fused_linear_kto_step<T>(in, head, o, grads, cfg, {}, hooks);
}

template <class T>
MPI_Datatype mpi_type() {
  return std::is_same<T, double>::value ? MPI_DOUBLE : MPI_FLOAT;
}

template <class T>
double max_abs(const std::vector<T>& v) {
  double m = 0;
  for (T x : v) m = std::max(m, std::fabs(double(x)));
  return m;
}
template <class T>
double max_diff(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

template <class T>
int check(int rank, int size) {
  const Batch<T> b = make_batch<T>();
  const double rtol = std::is_same<T, double>::value ? 1e-12 : 1e-5;
  const index_t v0 = b.V * rank / size, v1 = b.V * (rank + 1) / size;
  kto::Options o;
  o.beta = 0.2;
  o.undesirable_weight = 1.3;

  kto::cpu::FusedLinearHooks<T> hooks;
  hooks.gather_partials = [&](const std::vector<kto::RowPartial<T>>& local,
                              std::vector<kto::RowPartial<T>>& all) {
    all.resize(local.size() * static_cast<size_t>(size));
    const int n = static_cast<int>(local.size() * 2);  // two scalars a row
    MPI_Allgather(local.data(), n, mpi_type<T>(), all.data(), n, mpi_type<T>(), MPI_COMM_WORLD);
  };
  Grads<T> g;
  const auto local = run(b, v0, v1 - v0, o, g, hooks);
  // dH: partial sums over the slices. dW, db: gather the slices on rank 0.
  MPI_Allreduce(MPI_IN_PLACE, g.d_hidden.data(), static_cast<int>(g.d_hidden.size()), mpi_type<T>(),
                MPI_SUM, MPI_COMM_WORLD);
  std::vector<int> counts(size), displs(size), bcounts(size), bdispls(size);
  for (int k = 0; k < size; ++k) {
    const index_t a = b.V * k / size, e = b.V * (k + 1) / size;
    counts[k] = static_cast<int>((e - a) * b.D);
    displs[k] = static_cast<int>(a * b.D);
    bcounts[k] = static_cast<int>(e - a);
    bdispls[k] = static_cast<int>(a);
  }
  std::vector<T> d_weight(rank == 0 ? b.V * b.D : 0), d_bias(rank == 0 ? b.V : 0);
  MPI_Gatherv(g.d_weight.data(), static_cast<int>(g.d_weight.size()), mpi_type<T>(),
              d_weight.data(), counts.data(), displs.data(), mpi_type<T>(), 0, MPI_COMM_WORLD);
  MPI_Gatherv(g.d_bias.data(), static_cast<int>(g.d_bias.size()), mpi_type<T>(), d_bias.data(),
              bcounts.data(), bdispls.data(), mpi_type<T>(), 0, MPI_COMM_WORLD);
  // Every rank got the same loss.
  double loss_max = local.metrics.loss, loss_min = local.metrics.loss;
  MPI_Allreduce(MPI_IN_PLACE, &loss_max, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &loss_min, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);

  int failures = 0;
  if (rank == 0) {
    Grads<T> single;
    const auto want = run(b, 0, b.V, o, single, {});
    const double dl = std::fabs(local.metrics.loss - want.metrics.loss);
    const double dz = std::fabs(local.metrics.kl - want.metrics.kl);
    const double dh = max_diff(g.d_hidden, single.d_hidden) / max_abs(single.d_hidden);
    const double dw = max_diff(d_weight, single.d_weight) / max_abs(single.d_weight);
    const double db = max_diff(d_bias, single.d_bias) / max_abs(single.d_bias);
    const bool ok = loss_max == loss_min &&
                    dl <= rtol * std::max(1.0, std::fabs(want.metrics.loss)) &&
                    dz <= rtol * std::max(1.0, std::fabs(want.metrics.kl)) && dh <= rtol &&
                    dw <= rtol && db <= rtol;
    std::printf(
        "%d ranks, %s: loss %.9g (unsharded %.9g), z0 %.9g (%.9g), rel. max diff dH %.1e dW %.1e "
        "db %.1e -> %s\n",
        size, std::is_same<T, double>::value ? "double" : "float", local.metrics.loss,
        want.metrics.loss, local.metrics.kl, want.metrics.kl, dh, dw, db,
        ok ? "equal" : "DIFFERENT");
    failures = ok ? 0 : 1;
  }
  MPI_Bcast(&failures, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int failures = check<double>(rank, size) + check<float>(rank, size);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
