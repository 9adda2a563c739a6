// kto_data_parallel — KTO across MPI ranks with one all-reduce of three doubles.
//
// The KL reference point z0 is a batch-level estimate, so data-parallel ranks
// must agree on it. Each rank runs kto::cpu::kto_step on its shard of the
// target and KL batches; between the KL partial and the finish, the step calls
// back into MPI_Allreduce to sum (S, C) across ranks. With mean_denominator set
// to the global batch size the ranks' losses add up to, and their gradients
// equal, those of one process on the whole batch — which rank 0 also computes
// and compares against. Exit status 0 means they agree.
//
// With --bad-rank K, rank K's logits hold a NaN: that rank raises its own
// error, every other rank raises kto::PeerError (the failure travels in the
// third double of the all-reduce), no rank waits forever, and rank 0 prints
// what each rank raised. Exit status 0 means every rank raised.
//
//   mpirun -np 2 build/examples/kto_data_parallel [--bad-rank 1]
#include <mpi.h>
#include <kto/kto.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
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
      kto::reference_logp(b.ref_logp.data() + first, count),
      kto::make_span(b.desirable.data() + first, count),
      {kto::policy_logp(b.kl_policy.data() + first, count),
       kto::reference_logp(b.kl_reference.data() + first, count),
       kto::make_span(b.kl_tokens.data() + first, count)}};
  return kto::cpu::kto_step<double>(in, o, kto::logits_matrix<double>(grad.data(), rows, b.V), {},
                                    all_reduce);
}

/// Sums (S, C, failures) across ranks: a failing rank still joins, so none waits.
void mpi_all_reduce(kto::KlPartial& p) {
  MPI_Allreduce(MPI_IN_PLACE, &p.sum, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

/// Every rank runs a step on a batch where rank `bad_rank` has a NaN logit;
/// rank 0 prints what each rank raised. Returns the number of ranks that did not raise.
int run_with_bad_rank(const Batch& clean, int rank, int size, int bad_rank) {
  Batch batch = clean;
  const index_t per_rank = batch.B / size;
  batch.logits[static_cast<size_t>((bad_rank * per_rank * batch.T + 2) * batch.V + 3)] = NAN;
  std::string raised = "nothing";
  try {
    std::vector<double> grad;
    run_shard(batch, rank * per_rank, per_rank, kto::Options{}, grad, mpi_all_reduce);
  } catch (const kto::PeerError& e) {
    raised = std::string("kto::PeerError: ") + e.what();
  } catch (const kto::Error& e) {
    raised = std::string("kto::Error: ") + e.what();
  }
  char mine[512] = {};
  std::strncpy(mine, raised.c_str(), sizeof(mine) - 1);
  std::vector<char> all(rank == 0 ? sizeof(mine) * static_cast<size_t>(size) : 0);
  MPI_Gather(mine, sizeof(mine), MPI_CHAR, all.data(), sizeof(mine), MPI_CHAR, 0, MPI_COMM_WORLD);
  int quiet = raised == "nothing" ? 1 : 0, total = 0;
  MPI_Allreduce(&quiet, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    for (int r = 0; r < size; ++r) std::printf("rank %d raised %s\n", r, &all[sizeof(mine) * r]);
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const index_t per_rank = 3, B = per_rank * size;
  const Batch batch = make_batch(B, 5, 11);
  if (argc == 3 && std::string(argv[1]) == "--bad-rank") {
    const int quiet = run_with_bad_rank(batch, rank, size, std::atoi(argv[2]) % size);
    MPI_Finalize();
    return quiet == 0 ? 0 : 1;
  }

  int failures = 0;
  for (auto estimator : {kto::KlEstimator::mean, kto::KlEstimator::nonempty_mean}) {
    kto::Options o;
    o.beta = 0.4;
    o.undesirable_weight = 1.2;
    o.kl_estimator = estimator;
    o.mean_denominator = B;  // gradients are summed, not averaged, across ranks
    std::vector<double> grad;
    const auto local = run_shard(batch, rank * per_rank, per_rank, o, grad, mpi_all_reduce);
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
