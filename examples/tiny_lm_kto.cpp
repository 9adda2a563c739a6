// tiny_lm_kto — train a tiny language model with KTO from binary feedback only.
//
// The model is a bigram LM over 8 tokens: logits(next | prev) = W[prev], an
// Eigen matrix. A reference copy of W samples completions; a rule labels each
// one desirable (no token repeated back to back) or undesirable, and no other
// signal is ever given. The dataset is cut to a 1:4 desirable:undesirable split
// and weighted with kto::propose_weights. Each step runs kto::cpu::kto_step on
// the policy logits of 16 target examples, with the KL reference point taken
// from 16 mismatched (prompt, completion) pairs as TRL builds them, and applies
// the returned logit gradient to W with Adam. The desirable rate of the
// policy's own samples is printed before, during and after training.
//
//   usage: tiny_lm_kto [--steps N] [--seed S]
#include <kto/kto.hpp>

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kVocab = 8;
constexpr int kCompletion = 6;  // tokens generated after the one-token prompt
const char* const kTokens[kVocab] = {"a", "b", "c", "d", "e", "f", "g", "h"};

using Matrix = Eigen::Matrix<float, kVocab, kVocab, Eigen::RowMajor>;

struct Example {
  int prompt;
  std::vector<int> completion;
};

bool is_desirable(const Example& e) {  // the only feedback: no immediate repeats
  int prev = e.prompt;
  for (int t : e.completion) {
    if (t == prev) return false;
    prev = t;
  }
  return true;
}

Example sample(const Matrix& W, int prompt, std::mt19937_64& rng) {
  Example e{prompt, {}};
  int prev = prompt;
  for (int i = 0; i < kCompletion; ++i) {
    Eigen::Array<float, kVocab, 1> p =
        (W.row(prev).transpose().array() - W.row(prev).maxCoeff()).exp();
    std::discrete_distribution<int> next(p.data(), p.data() + kVocab);
    prev = next(rng);
    e.completion.push_back(prev);
  }
  return e;
}

double desirable_rate(const Matrix& W, int samples, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> prompt(0, kVocab - 1);
  int good = 0;
  for (int i = 0; i < samples; ++i) good += is_desirable(sample(W, prompt(rng), rng));
  return double(good) / samples;
}

/// Rows of a batch: row t has context (prompt or previous token) and target.
struct Batch {
  std::vector<int> context;
  std::vector<kto::index_t> targets, offsets{0};
  void add(int prompt, const std::vector<int>& completion) {
    int prev = prompt;
    for (int t : completion) {
      context.push_back(prev);
      targets.push_back(t);
      prev = t;
    }
    offsets.push_back(static_cast<kto::index_t>(targets.size()));
  }
  kto::index_t rows() const { return static_cast<kto::index_t>(targets.size()); }
  kto::index_t count() const { return static_cast<kto::index_t>(offsets.size()) - 1; }
  std::vector<float> logits(const Matrix& W) const {
    std::vector<float> z(context.size() * kVocab);
    for (size_t r = 0; r < context.size(); ++r)
      for (int v = 0; v < kVocab; ++v) z[r * kVocab + v] = W(context[r], v);
    return z;
  }
  std::vector<float> logprobs(const Matrix& W, const kto::Options& o,
                              std::vector<kto::index_t>* tokens = nullptr) const {
    const std::vector<float> z = logits(W);
    auto f = kto::cpu::sequence_logprobs<float>(
        kto::logits_matrix<const float>(z.data(), rows(), kVocab),
        kto::targets_vector(targets.data(), rows()), kto::sequences(offsets.data(), count()), o);
    if (tokens) *tokens = f.num_tokens;
    return f.logp;
  }
};

struct Adam {
  Matrix m = Matrix::Zero(), v = Matrix::Zero();
  int t = 0;
  void step(Matrix& W, const Matrix& g, float lr) {
    ++t;
    m = 0.9f * m + 0.1f * g;
    v = 0.999f * v + 0.001f * g.cwiseProduct(g);
    const float c1 = 1.0f - std::pow(0.9f, float(t)), c2 = 1.0f - std::pow(0.999f, float(t));
    W.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + 1e-8f);
  }
};

}  // namespace

int main(int argc, char** argv) {
  int steps = 120;
  uint64_t seed = 7;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--steps"))
      steps = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seed"))
      seed = std::strtoull(argv[i + 1], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--seed S]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937_64 rng(seed);

  // Reference model: random bigram logits that like repeating the last token.
  Matrix ref;
  std::normal_distribution<float> init(0.f, 0.5f);
  for (int i = 0; i < kVocab; ++i)
    for (int j = 0; j < kVocab; ++j) ref(i, j) = init(rng) + (i == j ? 1.0f : 0.0f);

  // Binary-feedback dataset from the reference model, cut to 1 desirable : 4 undesirable.
  std::vector<Example> good, bad;
  std::uniform_int_distribution<int> prompt(0, kVocab - 1);
  while (good.size() < 300 || bad.size() < 1200) {
    Example e = sample(ref, prompt(rng), rng);
    auto& side = is_desirable(e) ? good : bad;
    if (side.size() < (&side == &good ? 300u : 1200u)) side.push_back(e);
  }
  std::vector<std::pair<Example, bool>> data;
  for (auto& e : good) data.push_back({e, true});
  for (auto& e : bad) data.push_back({e, false});

  kto::Options opt;
  opt.beta = 0.1;
  const kto::ClassWeights w = kto::propose_weights(300, 1200);
  opt.desirable_weight = w.desirable;
  opt.undesirable_weight = w.undesirable;
  std::printf("KTO on a bigram LM (V=%d, %d-token completions), binary feedback only\n", kVocab,
              kCompletion);
  std::printf(
      "dataset: %zu desirable, %zu undesirable (1:4); weights lambda_D=%.2f lambda_U=%.2f"
      " -> %s\n",
      good.size(), bad.size(), w.desirable, w.undesirable,
      kto::check_weights(w.desirable, w.undesirable, 300, 1200).message.c_str());

  Matrix W = ref;
  const double rate_before = desirable_rate(W, 4000, 99);
  std::printf("desirable rate before training: %.3f\n", rate_before);

  Adam adam;
  const int batch = 16;
  std::uniform_int_distribution<size_t> pick(0, data.size() - 1);
  for (int step = 1; step <= steps; ++step) {
    Batch target, kl;
    std::vector<uint8_t> desirable;
    std::vector<const Example*> chosen;
    for (int i = 0; i < batch; ++i) {
      const auto& d = data[pick(rng)];
      chosen.push_back(&d.first);
      target.add(d.first.prompt, d.first.completion);
      desirable.push_back(d.second ? 1 : 0);
    }
    // KL batch: prompt i with completion i+1, as TRL rotates them.
    for (int i = 0; i < batch; ++i) kl.add(chosen[i]->prompt, chosen[(i + 1) % batch]->completion);

    const std::vector<float> ref_logp = target.logprobs(ref, opt);
    std::vector<kto::index_t> kl_tokens;
    const std::vector<float> kl_policy = kl.logprobs(W, opt, &kl_tokens);
    const std::vector<float> kl_ref = kl.logprobs(ref, opt);

    std::vector<float> z = target.logits(W);
    kto::cpu::StepInputs<float> in{
        kto::logits_matrix<const float>(z.data(), target.rows(), kVocab),
        kto::targets_vector(target.targets.data(), target.rows()),
        kto::sequences(target.offsets.data(), target.count()),
        kto::reference_logp(ref_logp),
        kto::make_span(desirable),
        {kto::policy_logp(kl_policy), kto::reference_logp(kl_ref), kto::make_span(kl_tokens)}};
    // In place: the logits buffer becomes dL/dlogits.
    const auto r = kto::cpu::kto_step<float>(
        in, opt, kto::logits_matrix<float>(z.data(), target.rows(), kVocab));

    Matrix grad = Matrix::Zero();
    for (size_t row = 0; row < target.context.size(); ++row)
      for (int v = 0; v < kVocab; ++v) grad(target.context[row], v) += z[row * kVocab + v];
    adam.step(W, grad, 0.05f);

    if (step == 1 || step % 10 == 0 || step == steps) {
      // As TRL, a side with no example in the batch is left out, not printed as NaN.
      char chosen[48] = "", rejected[48] = "";
      if (r.metrics.count_chosen > 0)
        std::snprintf(chosen, sizeof(chosen), "  rewards/chosen %+.3f", r.metrics.rewards_chosen);
      if (r.metrics.count_rejected > 0)
        std::snprintf(rejected, sizeof(rejected), "  rewards/rejected %+.3f",
                      r.metrics.rewards_rejected);
      std::printf("step %4d/%d  loss %.4f  z0 %.4f%s%s  desirable rate %.3f\n", step, steps,
                  r.metrics.loss, r.metrics.kl, chosen, rejected,
                  desirable_rate(W, 1000, 1000 + step));
    }
  }
  const double rate_after = desirable_rate(W, 4000, 99);
  std::printf("desirable rate after training:  %.3f (before %.3f)\n", rate_after, rate_before);
  std::printf("sample completions: ");
  std::mt19937_64 show(3);
  for (int i = 0; i < 4; ++i) {
    const Example e = sample(W, i, show);
    std::printf("[%s|", kTokens[e.prompt]);
    for (int t : e.completion) std::printf("%s", kTokens[t]);
    std::printf("] ");
  }
  std::printf("\n");
  if (!(rate_after > rate_before)) {
    std::fprintf(stderr, "training did not raise the desirable rate\n");
    return 1;
  }
  return 0;
}
