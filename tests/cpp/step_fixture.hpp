// step_fixture.hpp — a small valid logits-level step (Fixture) that each
// error test breaks in one place.
#pragma once

#include "support.hpp"

namespace {

using kto::index_t;
using test::expect_error;

/// A small valid step that each test breaks in one place.
struct Fixture {
  index_t V = 5, rows = 6;
  std::vector<float> Z = std::vector<float>(30, 0.5f);
  std::vector<float> G = std::vector<float>(30, 0.0f);
  std::vector<index_t> targets = {0, 1, 2, 3, 4, -100};
  std::vector<index_t> offsets = {0, 3, 6};
  std::vector<float> ref = {-4.f, -5.f};
  std::vector<uint8_t> desirable = {1, 0};
  std::vector<float> klp = {-3.f, -2.f}, klr = {-3.5f, -2.5f};
  std::vector<index_t> kln = {2, 3};
  kto::Options o;

  kto::cpu::StepInputs<float> inputs() const {
    return {kto::logits_matrix<const float>(Z.data(), rows, V),
            kto::targets_vector(targets.data(), rows),
            kto::sequences(offsets.data(), 2),
            kto::reference_logp(ref),
            kto::make_span(desirable),
            {kto::policy_logp(klp), kto::reference_logp(klr), kto::make_span(kln)}};
  }
  kto::LogitsView<float> grad() { return kto::logits_matrix<float>(G.data(), rows, V); }
  void run(const kto::cpu::StepInputs<float>& in) { kto::cpu::kto_step<float>(in, o, grad()); }
  void run() { run(inputs()); }
};

}  // namespace
