// kto_data_parallel — KTO across MPI ranks with one all-reduce of two doubles.
//
// The KL reference point z0 is a batch-level estimate, so data-parallel ranks
// must agree on it. Each rank runs kto::cpu::kto_step on its shard of the
// target and KL batches; between the KL partial and the finish, the step calls
// back into MPI_Allreduce to sum (S, C) across ranks. With mean_denominator set
// to the global batch size the ranks' losses add up to, and their gradients
// equal, those of one process on the whole batch — which rank 0 also computes
// and compares against. Exit status 0 means they agree.
//
//   mpirun -np 2 build/examples/kto_data_parallel
#include <mpi.h>
#include <kto/kto.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using kto::index_t;

/// The global batch, identical on every rank (same seed).
struct Batch {
  index_t B, T, V;
  std::vector<double> logits;
  std::vector<index_t> targets;
  std::vector<double> ref_logp, kl_policy, kl_reference;
  std::vector<index_t> kl_tokens;
  std::vector<std::uint8_t> desirable;
};

Batch make_batch(index_t B, index_t T, index_t V) {
  Batch b{B, T, V, {}, {}, {}, {}, {}, {}, {}};
  std::mt19937_64 rng(2024);
  std::normal_distribution<double> z(0.0, 2.0), lp(-30.0, 4.0);
  std::uniform_int_distribution<index_t> tok(0, V - 1);
  b.logits.resize(B * T * V);
  for (auto& x : b.logits) x = z(rng);
  for (index_t r = 0; r < B * T; ++r) b.targets.push_back(r % T == 0 ? -100 : tok(rng));
  for (index_t s = 0; s < B; ++s) {
    b.ref_logp.push_back(lp(rng));
    b.desirable.push_back(static_cast<std::uint8_t>(s % 3 == 0));
    b.kl_policy.push_back(lp(rng));
    b.kl_reference.push_back(b.kl_policy.back() - 0.8 + 0.3 * z(rng));
    b.kl_tokens.push_back(s == 1 ? 0 : T - 1);
  }
  return b;
}

/// Runs the step on sequences [first, first + count) of the batch.
kto::cpu::StepResult<double> run_shard(const Batch& b, index_t first, index_t count,
                                       const kto::Options& o, std::vector<double>& grad,
                                       const kto::cpu::KlAllReduce& all_reduce) {
  const index_t rows = count * b.T;
  const auto offsets = kto::padded_offsets(count, b.T);
  grad.assign(rows * b.V, NAN);
  kto::cpu::StepInputs<double> in{
      kto::logits_matrix<const double>(b.logits.data() + first * b.T * b.V, rows, b.V),
      kto::targets_vector(b.targets.data() + first * b.T, rows),
      kto::sequences(offsets.data(), count),
      kto::make_span(b.ref_logp.data() + first, count),
      kto::make_span(b.desirable.data() + first, count),
      {kto::make_span(b.kl_policy.data() + first, count),
       kto::make_span(b.kl_reference.data() + first, count),
       kto::make_span(b.kl_tokens.data() + first, count)}};
  return kto::cpu::kto_step<double>(in, o, kto::logits_matrix<double>(grad.data(), rows, b.V), {},
                                    all_reduce);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const index_t per_rank = 3, B = per_rank * size;
  const Batch batch = make_batch(B, 5, 11);

  int failures = 0;
  for (auto estimator : {kto::KlEstimator::mean, kto::KlEstimator::nonempty_mean}) {
    kto::Options o;
    o.beta = 0.4;
    o.undesirable_weight = 1.2;
    o.kl_estimator = estimator;
    o.mean_denominator = B;  // gradients are summed, not averaged, across ranks
    std::vector<double> grad;
    const auto local = run_shard(batch, rank * per_rank, per_rank, o, grad, [](kto::KlPartial& p) {
      MPI_Allreduce(MPI_IN_PLACE, &p.sum, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    });
    double loss = 0.0;
    MPI_Reduce(&local.metrics.loss, &loss, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    std::vector<double> all_grad(rank == 0 ? batch.logits.size() : 0);
    MPI_Gather(grad.data(), static_cast<int>(grad.size()), MPI_DOUBLE, all_grad.data(),
               static_cast<int>(grad.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      std::vector<double> single_grad;
      const auto single = run_shard(batch, 0, B, o, single_grad, {});
      double worst = 0.0;
      for (size_t i = 0; i < all_grad.size(); ++i)
        worst = std::max(worst, std::fabs(all_grad[i] - single_grad[i]) /
                                    std::max(1e-300, std::fabs(single_grad[i])));
      const bool ok =
          std::fabs(loss - single.metrics.loss) <= 1e-12 * std::fabs(single.metrics.loss) &&
          std::fabs(local.metrics.kl - single.metrics.kl) <= 1e-14 && worst <= 1e-12;
      std::printf(
          "%d ranks, %s: z0 %.12f (single %.12f), loss %.12f (single %.12f), "
          "max rel grad diff %.2e -> %s\n",
          size, estimator == kto::KlEstimator::mean ? "mean" : "nonempty_mean", local.metrics.kl,
          single.metrics.kl, loss, single.metrics.loss, worst, ok ? "equal" : "DIFFERENT");
      failures += ok ? 0 : 1;
    }
  }
  MPI_Bcast(&failures, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
