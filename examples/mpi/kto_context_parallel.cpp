// kto_context_parallel — the KTO step with every sequence split over ranks by token
// (context / sequence parallel), one all-reduce of a few doubles a sequence.
//
// Rank k holds a contiguous slice of each sequence's tokens: its rows of the logits
// and targets, with offsets over its slices. kto::cpu::context_parallel_kto_step
// reduces the slice to per-sequence partial sums (log-prob, token count) and calls
// back into MPI_Allreduce; every rank then finishes the same whole sequences (loss,
// z0, g_s) and writes ∂L/∂logits for its own rows only — the backward needs no
// communication. With average_logprob the mean uses the whole sequence's count.
// Rank 0 gathers the gradient rows, runs the unsplit step and compares
// (|a − b| ≤ rtol · max|b|, rtol 1e-12 in double, 1e-5 in float). Exit status 0
// means they agree.
//
//   mpirun -np 2 build/examples/kto_context_parallel
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

/// A packed batch of sequences of ragged lengths and its KL log-probs (whole).
template <class T>
struct Batch {
  index_t B = 6, V = 203;
  std::vector<index_t> offsets{0}, targets;
  std::vector<T> logits, ref_logp, kl_policy, kl_reference;
  std::vector<std::uint8_t> desirable;
};

template <class T>
Batch<T> make_batch() {
  Batch<T> b;
  std::mt19937_64 rng(2026);  // same on every rank
  std::normal_distribution<double> n01(0.0, 1.0), lp(-40.0, 4.0);
  std::uniform_int_distribution<index_t> tok(0, b.V - 1), len(1, 13);
  for (index_t s = 0; s < b.B; ++s) {
    const index_t n = len(rng);
    for (index_t i = 0; i < n; ++i) b.targets.push_back(i < n / 3 ? -100 : tok(rng));  // prompt
    b.offsets.push_back(b.offsets.back() + n);
    b.ref_logp.push_back(static_cast<T>(lp(rng) / 4));
    b.desirable.push_back(static_cast<std::uint8_t>(s % 3 != 0));
    const double kl = lp(rng) / 4;
    b.kl_policy.push_back(static_cast<T>(kl));
    b.kl_reference.push_back(static_cast<T>(kl - 0.5 + 0.2 * n01(rng)));
  }
  for (index_t i = 0; i < b.offsets.back() * b.V; ++i)
    b.logits.push_back(static_cast<T>(2 * n01(rng)));
  return b;
}

/// The rows of this rank's slices, in batch order: [b + n·k/R, b + n·(k+1)/R) of each
/// sequence [b, b + n).
template <class T>
std::vector<index_t> rows_of(const Batch<T>& b, int k, int ranks, std::vector<index_t>& offsets) {
  std::vector<index_t> rows;
  offsets.assign(1, 0);
  for (index_t s = 0; s < b.B; ++s) {
    const index_t first = b.offsets[s], n = b.offsets[s + 1] - first;
    for (index_t r = first + n * k / ranks; r < first + n * (k + 1) / ranks; ++r) rows.push_back(r);
    offsets.push_back(static_cast<index_t>(rows.size()));
  }
  return rows;
}

template <class T>
MPI_Datatype mpi_type() {
  return std::is_same<T, double>::value ? MPI_DOUBLE : MPI_FLOAT;
}

template <class T>
int check(int rank, int size) {
  const Batch<T> b = make_batch<T>();
  const double rtol = std::is_same<T, double>::value ? 1e-12 : 1e-5;
  kto::Options o;
  o.beta = 0.2;
  o.average_logprob = std::is_same<T, float>::value;  // each type its own variant

  // This rank's slices, copied contiguous.
  std::vector<index_t> offsets;
  const std::vector<index_t> rows = rows_of(b, rank, size, offsets);
  const index_t n = static_cast<index_t>(rows.size());
  std::vector<T> logits;
  std::vector<index_t> targets;
  for (index_t r : rows) {
    logits.insert(logits.end(), b.logits.begin() + r * b.V, b.logits.begin() + (r + 1) * b.V);
    targets.push_back(b.targets[static_cast<size_t>(r)]);
  }
  kto::cpu::StepInputs<T> in;
  in.policy_logits = kto::logits_matrix<const T>(logits.data(), n, b.V);
  in.targets = kto::targets_vector(targets.data(), n);
  in.sequences = kto::sequences(offsets.data(), b.B);
  in.reference_logp = kto::reference_logp(b.ref_logp);
  in.desirable = kto::make_span(b.desirable);
  in.kl = {kto::policy_logp(b.kl_policy), kto::reference_logp(b.kl_reference), {}};
  std::vector<T> grad(logits.size());
  const kto::cpu::SequenceAllReduce all_reduce = [](double* values, index_t count) {
    MPI_Allreduce(MPI_IN_PLACE, values, static_cast<int>(count), MPI_DOUBLE, MPI_SUM,
                  MPI_COMM_WORLD);
  };
  const auto local = kto::cpu::context_parallel_kto_step<T>(
      in, o, kto::logits_matrix<T>(grad.data(), n, b.V), all_reduce);

  // Rank 0 gathers each rank's gradient rows and their batch rows.
  std::vector<int> counts(static_cast<size_t>(size)), displs(static_cast<size_t>(size));
  const int mine = static_cast<int>(n);
  MPI_Gather(&mine, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  for (int k = 1; k < size; ++k) displs[k] = displs[k - 1] + counts[k - 1];
  const index_t total = b.offsets.back();
  std::vector<long long> all_rows(rank == 0 ? total : 0), my_rows(rows.begin(), rows.end());
  MPI_Gatherv(my_rows.data(), mine, MPI_LONG_LONG, all_rows.data(), counts.data(), displs.data(),
              MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  for (int k = 0; k < size; ++k) {
    counts[k] *= static_cast<int>(b.V);
    displs[k] *= static_cast<int>(b.V);
  }
  std::vector<T> gathered(rank == 0 ? total * b.V : 0);
  MPI_Gatherv(grad.data(), mine * static_cast<int>(b.V), mpi_type<T>(), gathered.data(),
              counts.data(), displs.data(), mpi_type<T>(), 0, MPI_COMM_WORLD);
  // Every rank got the same loss.
  double loss_max = local.metrics.loss, loss_min = local.metrics.loss;
  MPI_Allreduce(MPI_IN_PLACE, &loss_max, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &loss_min, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);

  int failures = 0;
  if (rank == 0) {
    kto::cpu::StepInputs<T> whole = in;
    whole.policy_logits = kto::logits_matrix<const T>(b.logits.data(), total, b.V);
    whole.targets = kto::targets_vector(b.targets.data(), total);
    whole.sequences = kto::sequences(b.offsets.data(), b.B);
    std::vector<T> want_grad(b.logits.size());
    const auto want =
        kto::cpu::kto_step<T>(whole, o, kto::logits_matrix<T>(want_grad.data(), total, b.V));
    double dg = 0, gmax = 0;
    for (index_t i = 0; i < total; ++i) {
      const index_t r = static_cast<index_t>(all_rows[static_cast<size_t>(i)]);
      for (index_t v = 0; v < b.V; ++v) {
        const double w = want_grad[static_cast<size_t>(r * b.V + v)];
        gmax = std::max(gmax, std::fabs(w));
        dg = std::max(dg, std::fabs(double(gathered[static_cast<size_t>(i * b.V + v)]) - w));
      }
    }
    dg /= gmax;
    const double dl = std::fabs(local.metrics.loss - want.metrics.loss);
    const double dz = std::fabs(local.metrics.kl - want.metrics.kl);
    const double dr = std::fabs(local.metrics.rewards_chosen - want.metrics.rewards_chosen);
    const bool ok =
        loss_max == loss_min && dl <= rtol * std::max(1.0, std::fabs(want.metrics.loss)) &&
        dz <= rtol * std::max(1.0, std::fabs(want.metrics.kl)) &&
        dr <= rtol * std::max(1.0, std::fabs(want.metrics.rewards_chosen)) && dg <= rtol;
    std::printf(
        "%d ranks, %s%s: loss %.9g (unsplit %.9g), z0 %.9g (%.9g), rel. max diff dlogits %.1e "
        "-> %s\n",
        size, std::is_same<T, double>::value ? "double" : "float",
        o.average_logprob ? " (average_logprob)" : "", local.metrics.loss, want.metrics.loss,
        local.metrics.kl, want.metrics.kl, dg, ok ? "equal" : "DIFFERENT");
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
