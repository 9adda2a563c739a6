// Builds against the installed kto package and checks one tiny step.
#include <kto/kto.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  std::vector<float> logits = {1.f, 2.f, 3.f, 0.f, 0.f, 0.f};  // 2 rows, V = 3
  std::vector<kto::index_t> targets = {2, 0}, offsets = {0, 2};
  std::vector<float> ref = {-2.f}, kl_policy = {-1.f}, kl_ref = {-1.f};
  std::vector<std::uint8_t> desirable = {1};
  std::vector<float> grad(6);
  kto::cpu::StepInputs<float> in{kto::logits_matrix<const float>(logits.data(), 2, 3),
                                 kto::targets_vector(targets.data(), 2),
                                 kto::sequences(offsets.data(), 1),
                                 kto::reference_logp(ref),
                                 kto::make_span(desirable),
                                 {kto::policy_logp(kl_policy), kto::reference_logp(kl_ref), {}}};
  kto::Options opt;
  opt.beta = 1.0;
  const auto r = kto::cpu::kto_step<float>(in, opt, kto::logits_matrix<float>(grad.data(), 2, 3));
  // logp = (3 − lse(1,2,3)) + (0 − log 3); ρ = logp + 2; loss = 1 − σ(ρ).
  const double lse = 3.0 + std::log(1.0 + std::exp(-1.0) + std::exp(-2.0));
  const double rho = (3.0 - lse) + (-std::log(3.0)) + 2.0;
  const double want = 1.0 / (1.0 + std::exp(rho));
  std::printf("installed kto %d.%d: loss %.7f (want %.7f)\n", KTO_VERSION_MAJOR, KTO_VERSION_MINOR,
              r.metrics.loss, want);
  return std::fabs(r.metrics.loss - want) < 1e-6 ? 0 : 1;
}
