// SPDX-License-Identifier: Apache-2.0
// One-pass fused preference losses against (a) the fp64 naive composite (matmul, log_softmax,
// gather, masked sums) with the losses written from their formulas (tests/reference/) and (b)
// the two-pass op (fused_logprobs, then the loss, then autograd), over chunk boundaries, odd
// sizes, packed and completion-mask input, all-masked pairs and every qualifying loss.
#include <c10/core/GradMode.h>
#include <prefopt/detail/cpu_gemm.h>
#include <prefopt/detail/rows.h>
#include <prefopt/fused_loss.h>
#include <prefopt/metrics.h>

#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <string>
#include <vector>

#include "memory.h"  // bench/: the tracking CPU allocator
#include "reference/logprobs_reference.h"
#include "reference/losses_reference.h"
#include "support.h"

namespace {

namespace F = prefopt::functional;
using prefopt::CPOLossOptions;
using prefopt::CPOLossType;
using prefopt::DPOLossOptions;
using prefopt::DPOLossType;
using prefopt::FDivergence;
using prefopt::FusedBackward;
using prefopt::FusedLogprobsOptions;
using prefopt::GatherBackend;
using prefopt::GatherLogprobsOptions;
using prefopt::HeadBatch;
using prefopt::LogitsMetric;
using prefopt::MetricAccumulator;
using prefopt::MetricsOptions;
using prefopt::MetricWindow;
using prefopt::PairInputs;
using prefopt_test::AllClose;
using prefopt_test::SeededTest;

constexpr int64_t kIgnore = -100;

/// A head and a batch of S = 2B sequences (chosen, then rejected) with random scored tokens;
/// pair 1 has nothing scored on either side and the chosen side of pair 2 is empty.
struct Batch {
  at::Tensor h, w, b, labels;
  int64_t B, T, H, V;
  Batch(int64_t B_, int64_t T_, int64_t H_, int64_t V_, bool bias, at::ScalarType st)
      : B(B_), T(T_), H(H_), V(V_) {
    h = (at::randn({2 * B, T, H}, at::kDouble)).to(st).requires_grad_();
    w = (at::randn({V, H}, at::kDouble) / std::sqrt(static_cast<double>(H)) * 2)
            .to(st)
            .requires_grad_();
    if (bias) b = (at::randn({V}, at::kDouble) * 0.5).to(st).requires_grad_();
    labels = at::randint(V, {2 * B, T}, at::kLong);
    labels.masked_fill_(at::rand({2 * B, T}) < 0.3, kIgnore);
    labels.narrow(1, 0, std::min<int64_t>(T, 2)).fill_(kIgnore);  // a prompt
    if (B > 1) labels[1].fill_(kIgnore), labels[B + 1].fill_(kIgnore);
    if (B > 2) labels[2].fill_(kIgnore);
  }
  HeadBatch head() const { return HeadBatch(h, w, b, labels); }
  std::vector<at::Tensor> params() const {
    std::vector<at::Tensor> p{h, w};
    if (b.defined()) p.push_back(b);
    return p;
  }
  /// fp64 leaf copies.
  Batch as_double() const {
    Batch d = *this;
    d.h = h.detach().to(at::kDouble).requires_grad_();
    d.w = w.detach().to(at::kDouble).requires_grad_();
    if (b.defined()) d.b = b.detach().to(at::kDouble).requires_grad_();
    return d;
  }
  /// Reference log-probs [B] per side: fixed random sums near the policy's scale.
  std::pair<at::Tensor, at::Tensor> reference() const {
    const auto n = (labels != kIgnore).sum(1).to(at::kDouble);
    const auto r = -n * 2.5 + at::randn({2 * B}, at::kDouble);
    return {r.narrow(0, 0, B).to(h.scalar_type()), r.narrow(0, B, B).to(h.scalar_type())};
  }
};

/// The reference's sums, said to be sums (FusedDpoLossWarnsWhenTheReferenceDoesNotSayItsForm
/// leaves the form unsaid).
PairInputs reference_sums(const at::Tensor& chosen, const at::Tensor& rejected) {
  return PairInputs().reference_chosen_logps(chosen).reference_rejected_logps(rejected).logps_form(
      prefopt::LogpsForm::kSum);
}

/// The fp64 naive composite's per-sequence log-probs (sums, counts).
/// Logits: the head, × the logit scale, the softcap, ÷ the temperature (the models' order).
prefopt_ref::Logprobs naive(const Batch& d, double temperature = 1.0, double softcap = 0.0,
                            double scale = 1.0) {
  auto z = at::matmul(d.h, d.w.t());
  if (d.b.defined()) z = z + d.b;
  z = z * scale;
  if (softcap > 0) z = softcap * at::tanh(z / softcap);
  return prefopt_ref::gather(z / temperature, d.labels, d.labels != kIgnore);
}

std::vector<at::Tensor> grads_of(const at::Tensor& loss, const std::vector<at::Tensor>& params) {
  return torch::autograd::grad({loss}, params);
}

void expect_grads(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want,
                  double rtol, double atol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  const char* names[] = {"dh", "dW", "db"};
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_TRUE(AllClose(got[i], want[i], rtol, atol)) << what << " " << names[i];
}

// 16-bit or fp32 gradients: in the parameters' dtype, within `tol` of the largest of each.
void expect_low_precision_grads(const std::vector<at::Tensor>& got,
                                const std::vector<at::Tensor>& want, at::ScalarType st, double tol,
                                const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].scalar_type(), st);
    const double scale = want[i].abs().max().item<double>();
    EXPECT_TRUE(AllClose(got[i], want[i], 0, tol * scale)) << what << " grad " << i;
  }
}

/// Budgets of one row (all rows but a pair's last stream twice), two and ten rows (pairs split:
/// the first rows streamed, the last ones kept; small pairs whole, several to a chunk), and
/// automatic (whole pairs).
std::vector<int64_t> budgets(const Batch& d, bool softcap = false) {
  const int64_t row = d.V * static_cast<int64_t>(d.h.element_size()) * (softcap ? 2 : 1);
  return {row, 2 * row, 10 * row, 0};
}

TEST_F(SeededTest, FusedDpoSigmoidMatchesTheFp64NaiveCompositeOverChunkBoundaries) {
  struct Transform {
    double scale, temperature, softcap;
  };
  for (bool bias : {false, true})
    for (const auto [scale, temperature, softcap] :
         {Transform{1, 1, 0}, Transform{0.5, 0.7, 0}, Transform{1, 1, 3}, Transform{1.5, 0.7, 3}}) {
      const Batch d(5, 9, 6, 13, bias, at::kDouble);
      const auto [rc, rr] = d.reference();
      // Expected: full logits, log_softmax, gather, sums, then −log σ(β[(π_c−π_r)−(r_c−r_r)])
      // from the formula.
      const auto lp = naive(d, temperature, softcap, scale);
      const auto pc = lp.sum.narrow(0, 0, d.B), pr = lp.sum.narrow(0, d.B, d.B);
      const auto expected =
          prefopt_ref::dpo_losses(prefopt_ref::DPORef{}, pc, pr, rc, rr, {}, {}).mean();
      const auto want = grads_of(expected, d.params());
      for (int64_t budget : budgets(d, softcap > 0)) {
        const auto opts = FusedLogprobsOptions()
                              .logit_scale(scale)
                              .temperature(temperature)
                              .softcap(softcap)
                              .chunk_bytes(budget);
        prefopt::detail::WarningCapture warnings;
        const auto out =
            F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions(), opts);
        const std::string what = "bias " + std::to_string(bias) + " s " + std::to_string(scale) +
                                 " T " + std::to_string(temperature) + " cap " +
                                 std::to_string(softcap) + " budget " + std::to_string(budget);
        EXPECT_TRUE(AllClose(out.result.loss, expected, 1e-12, 1e-12)) << what;
        EXPECT_TRUE(AllClose(out.result.chosen_logps, pc, 1e-12, 1e-12)) << what;
        EXPECT_TRUE(AllClose(out.policy.rejected.count, lp.count.narrow(0, d.B, d.B), 0, 0));
        expect_grads(grads_of(out.result.loss, d.params()), want, 1e-10, 1e-12, what);
      }
    }
}

/// The two-pass op: fused_logprobs, split_pairs, the loss, autograd.
struct TwoPass {
  at::Tensor loss;
  std::vector<at::Tensor> grads;
};

class EveryQualifyingLoss : public SeededTest {
 protected:
  void check(const std::string& what,
             const std::function<at::Tensor(const prefopt::PairLogprobs&)>& two_pass,
             const std::function<at::Tensor(const HeadBatch&, const FusedLogprobsOptions&)>& fused,
             bool bias = true, const FusedLogprobsOptions& two_pass_options = {}) {
    const Batch d(6, 8, 5, 17, bias, at::kDouble);
    const auto lp = F::fused_logprobs(d.h, d.w, d.b, d.labels, two_pass_options);
    const auto ref_loss = two_pass(F::split_pairs(lp));
    const auto want = grads_of(ref_loss, d.params());
    for (int64_t budget : budgets(d)) {
      const auto loss = fused(d.head(), FusedLogprobsOptions().chunk_bytes(budget));
      const std::string w = what + " budget " + std::to_string(budget);
      EXPECT_TRUE(AllClose(loss, ref_loss, 1e-12, 1e-12)) << w;
      expect_grads(grads_of(loss, d.params()), want, 1e-10, 1e-12, w);
    }
  }
};

TEST_F(EveryQualifyingLoss, DpoFamilyMatchesTheTwoPassOp) {
  const auto types = std::vector<DPOLossType>{
      DPOLossType::kSigmoid, DPOLossType::kHinge,    DPOLossType::kIPO,
      DPOLossType::kRobust,  DPOLossType::kExoPair,  DPOLossType::kNCAPair,
      DPOLossType::kBCOPair, DPOLossType::kSPPOHard, DPOLossType::kAPOZero,
      DPOLossType::kAPODown, DPOLossType::kDiscoPOP, DPOLossType::kSigmoidNorm,
      DPOLossType::kSFT};
  const auto rc = at::randn({6}, at::kDouble) - 12, rr = at::randn({6}, at::kDouble) - 12;
  const auto weights = at::rand({6}, at::kDouble) + 0.5;
  std::vector<std::pair<std::string, DPOLossOptions>> cases;
  for (auto t : types) {
    auto o = DPOLossOptions().loss_type(t).beta(0.3);
    if (t == DPOLossType::kRobust || t == DPOLossType::kExoPair) o.label_smoothing(0.2);
    cases.emplace_back(prefopt::dpo_loss_type_name(t), o);
  }
  cases.emplace_back(
      "mpo sigmoid+bco+sft weighted",
      DPOLossOptions()
          .loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair, DPOLossType::kSFT})
          .loss_weights({0.8, 0.2, 1.0}));
  cases.emplace_back("rpo sequence-mean nll", DPOLossOptions().rpo_alpha(0.5).nll_normalization(
                                                  prefopt::NLLNormalization::kSequenceMean));
  cases.emplace_back("cdpo", DPOLossOptions().label_smoothing(0.1).cdpo(true));
  cases.emplace_back("ipo summed", DPOLossOptions()
                                       .loss_type(DPOLossType::kIPO)
                                       .ipo_normalization(prefopt::IPONormalization::kNone));
  for (auto f : {prefopt::FDivergence::kForwardKL, prefopt::FDivergence::kJSDivergence,
                 prefopt::FDivergence::kAlphaDivergence})
    cases.emplace_back(prefopt::f_divergence_name(f), DPOLossOptions().f_divergence_type(f));
  cases.emplace_back("sum reduction", DPOLossOptions(torch::kSum));
  for (const auto& c : cases) {
    // Not a structured binding: C++17 lambdas cannot capture those (clang rejects it).
    const std::string& name = c.first;
    const DPOLossOptions& o = c.second;
    for (bool weighted : {false, true}) {
      const auto given = [&] {
        auto in = reference_sums(rc, rr);
        if (weighted) in.weights(weights);
        return in;
      };
      check(
          name + (weighted ? " wpo" : ""),
          [&](const prefopt::PairLogprobs& p) {
            auto in = PairInputs(p).reference_chosen_logps(rc).reference_rejected_logps(rr);
            if (weighted) in.weights(weights);
            return F::dpo_loss(in, o).loss;
          },
          [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
            return F::fused_dpo_loss(b, given(), o, fo).result.loss;
          });
    }
  }
  // reference_free: the reference is optional.
  const auto o = DPOLossOptions().reference_free(true);
  check(
      "reference_free",
      [&](const prefopt::PairLogprobs& p) { return F::dpo_loss(PairInputs(p), o).loss; },
      [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
        return F::fused_dpo_loss(b, PairInputs(), o, fo).result.loss;
      });
  // A reference in per-token means: the policy reaches the loss in means too.
  const auto mean_in = [&](const prefopt::PairLogprobs& p) {
    return PairInputs()
        .policy_chosen_logps(p.chosen.mean)
        .policy_rejected_logps(p.rejected.mean)
        .chosen_lengths(p.chosen.count)
        .rejected_lengths(p.rejected.count)
        .reference_chosen_logps(rc / 4)
        .reference_rejected_logps(rr / 4)
        .logps_form(prefopt::LogpsForm::kMean);
  };
  check(
      "reference in means",
      [&](const prefopt::PairLogprobs& p) { return F::dpo_loss(mean_in(p)).loss; },
      [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
        return F::fused_dpo_loss(b,
                                 PairInputs()
                                     .reference_chosen_logps(rc / 4)
                                     .reference_rejected_logps(rr / 4)
                                     .logps_form(prefopt::LogpsForm::kMean),
                                 DPOLossOptions(), fo)
            .result.loss;
      });
}

TEST_F(EveryQualifyingLoss, CpoSimpoAlphapoOrpoKtoMatchTheTwoPassOp) {
  std::vector<std::pair<std::string, CPOLossOptions>> cases = {
      {"cpo sigmoid", CPOLossOptions()},
      {"cpo hinge", CPOLossOptions().loss_type(CPOLossType::kHinge)},
      {"cpo ipo", CPOLossOptions().loss_type(CPOLossType::kIPO)},
      {"simpo", CPOLossOptions().loss_type(CPOLossType::kSimPO).beta(2.0).cpo_alpha(0)},
      {"simpo + sequence-mean nll",
       CPOLossOptions()
           .loss_type(CPOLossType::kSimPO)
           .label_smoothing(0.1)
           .nll_normalization(prefopt::NLLNormalization::kSequenceMean)},
      {"alphapo", CPOLossOptions().loss_type(CPOLossType::kAlphaPO).alpha(0.25)},
      {"cpo sum", CPOLossOptions(torch::kSum)}};
  for (const auto& c : cases) {
    const std::string& name = c.first;  // not a structured binding: the lambdas capture it
    const CPOLossOptions& o = c.second;
    check(
        name, [&](const prefopt::PairLogprobs& p) { return F::cpo_loss(PairInputs(p), o).loss; },
        [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
          return F::fused_cpo_loss(b, o, fo).result.loss;
        });
  }
  // SimPOLossOptions (β 2, no NLL by default), plain, with the NLL and ε, and as AlphaPO.
  for (const auto& o :
       {prefopt::SimPOLossOptions(),
        prefopt::SimPOLossOptions().beta(2.5).simpo_gamma(1.4).label_smoothing(0.1).cpo_alpha(0.5),
        prefopt::SimPOLossOptions().alpha(0.25)}) {
    check(
        "simpo options",
        [&](const prefopt::PairLogprobs& p) { return F::simpo_loss(PairInputs(p), o).loss; },
        [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
          return F::fused_simpo_loss(b, o, fo).result.loss;
        });
  }
  for (auto norm :
       {prefopt::NLLNormalization::kTokenMean, prefopt::NLLNormalization::kSequenceMean}) {
    const auto o = prefopt::ORPOLossOptions().beta(0.2).nll_normalization(norm);
    check(
        "orpo", [&](const prefopt::PairLogprobs& p) { return F::orpo_loss(PairInputs(p), o).loss; },
        [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
          return F::fused_orpo_loss(b, o, fo).result.loss;
        });
  }
  // KTO: the 12 sequences are 12 examples, desirable or not; the KL estimate is an input.
  const auto desirable = at::rand({12}) < 0.5;
  const auto ref = at::randn({12}, at::kDouble) - 10;
  const auto kl_p = at::randn({4}, at::kDouble) - 9, kl_r = at::randn({4}, at::kDouble) - 10;
  for (auto type : {prefopt::KTOLossType::kKTO, prefopt::KTOLossType::kAPOZeroUnpaired}) {
    const auto o = prefopt::KTOLossOptions().loss_type(type).desirable_weight(1.3);
    const auto d_idx = desirable.nonzero().flatten(), u_idx = (~desirable).nonzero().flatten();
    check(
        prefopt::kto_loss_type_name(type),
        [&](const prefopt::PairLogprobs& p) {
          const auto all = at::cat({p.chosen.sum, p.rejected.sum});
          auto in = prefopt::KTOInputs()
                        .policy_chosen_logps(all.index_select(0, d_idx))
                        .policy_rejected_logps(all.index_select(0, u_idx))
                        .reference_chosen_logps(ref.index_select(0, d_idx))
                        .reference_rejected_logps(ref.index_select(0, u_idx));
          if (type == prefopt::KTOLossType::kKTO) in.policy_KL_logps(kl_p).reference_KL_logps(kl_r);
          return F::kto_loss(in, o).loss;
        },
        [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
          auto in = prefopt::FusedKTOInputs().desirable(desirable).reference_logps(ref);
          if (type == prefopt::KTOLossType::kKTO) in.policy_KL_logps(kl_p).reference_KL_logps(kl_r);
          return F::fused_kto_loss(b, in, o, fo).result.loss;
        });
  }
}

TEST_F(SeededTest, FusedLossTakesPackedAndCompletionMaskBatches) {
  const Batch d(4, 7, 5, 11, true, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const auto padded = F::fused_dpo_loss(d.head(), given);
  const auto want = grads_of(padded.result.loss, d.params());
  // Completion-mask form: input ids with the ignored labels replaced by any token.
  const auto mask = d.labels != kIgnore;
  const auto ids = d.labels.masked_fill(~mask, 3);
  const auto masked = F::fused_dpo_loss(d.head().labels(ids).completion_mask(mask), given);
  EXPECT_TRUE(AllClose(masked.result.loss, padded.result.loss, 1e-13, 1e-13));
  expect_grads(grads_of(masked.result.loss, d.params()), want, 1e-12, 1e-13, "mask form");
  // Packed: the S sequences back to back, each of length T (the shift stays inside each).
  const auto h_packed = d.h.reshape({-1, d.H});
  const auto cu = at::arange(0, 2 * d.B * d.T + 1, d.T, at::kLong);
  for (int64_t budget : budgets(d)) {
    const auto packed =
        F::fused_dpo_loss(HeadBatch(h_packed, d.w, d.b, d.labels.flatten()).cu_seqlens(cu), given,
                          DPOLossOptions(), FusedLogprobsOptions().chunk_bytes(budget));
    EXPECT_TRUE(AllClose(packed.result.loss, padded.result.loss, 1e-13, 1e-13));
    expect_grads(grads_of(packed.result.loss, d.params()), want, 1e-12, 1e-13, "packed");
  }
}

TEST_F(SeededTest, FusedLossReturnsWhatTheMetricsOfTheTwoPassPathNeed) {
  const Batch d(5, 8, 6, 19, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto fo = FusedLogprobsOptions()
                      .with_token_accuracy(true)
                      .with_entropy(true)
                      .with_logits_mean(true)
                      .chunk_bytes(19 * 8 * 4);
  const auto o = DPOLossOptions().loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT});
  const auto out = F::fused_dpo_loss(d.head(), reference_sums(rc, rr), o, fo);
  const auto policy = F::split_pairs(F::fused_logprobs(d.h, d.w, d.b, d.labels, fo));
  const auto in = PairInputs(policy).reference_chosen_logps(rc).reference_rejected_logps(rr);
  const auto two = F::dpo_loss(in, o);
  EXPECT_TRUE(AllClose(out.result.losses, two.losses, 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(out.result.chosen_rewards, two.chosen_rewards, 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(out.result.rejected_rewards, two.rejected_rewards, 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(out.result.nll_loss, two.nll_loss, 1e-12, 1e-12));
  EXPECT_FALSE(out.result.losses.requires_grad());
  for (const auto* side : {&out.policy.chosen, &out.policy.rejected}) {
    const auto& want = side == &out.policy.chosen ? policy.chosen : policy.rejected;
    EXPECT_TRUE(AllClose(side->sum, want.sum, 1e-12, 1e-12));
    EXPECT_TRUE(AllClose(side->count, want.count, 0, 0));
    EXPECT_TRUE(AllClose(side->correct, want.correct, 0, 0));
    EXPECT_TRUE(AllClose(side->entropy_sum, want.entropy_sum, 1e-12, 1e-12));
    EXPECT_TRUE(AllClose(side->logits_sum, want.logits_sum, 1e-12, 1e-12));
  }
  prefopt::MetricAccumulator a, b;
  a.add(out.result, out.inputs, out.policy);
  b.add(two, in, policy);
  const auto ma = a.compute(), mb = b.compute();
  ASSERT_EQ(ma.size(), mb.size());
  for (const auto& [name, value] : mb) EXPECT_NEAR(ma.at(name), value, 1e-9) << name;
}

TEST_F(SeededTest, FusedLossInLowPrecisionIsCloseToTheFp64Reference) {
  // bf16 / fp16 / fp32 GEMMs in the input dtype (16-bit ones accumulate in fp32), log-softmax
  // statistics in fp32, against the fp64 composite on the same (rounded) inputs. Tolerances,
  // relative to the largest entry of each gradient (and to the loss): fp32 2e-6 (measured
  // 5e-7), bf16 1e-2 (measured 4e-3: the logits and their gradient are stored in bf16, as the
  // composite stores them), fp16 2e-3.
  for (auto [st, tol] : {std::make_pair(at::kFloat, 2e-6), std::make_pair(at::kBFloat16, 1e-2),
                         std::make_pair(at::kHalf, 2e-3)}) {
    if (st == at::kHalf && !prefopt::detail::fused::cpu_half_matmul()) {
      const Batch lo(1, 4, 4, 5, false, st);
      PREFOPT_EXPECT_THROWS_WITH(F::fused_cpo_loss(lo.head()), "no fp16 matrix product on CPU");
      continue;
    }
    const Batch lo(6, 16, 32, 301, true, st);
    const auto d = lo.as_double();
    const auto [rc, rr] = lo.reference();
    const auto lp = naive(d);
    const auto expected = prefopt_ref::dpo_losses(prefopt_ref::DPORef{}, lp.sum.narrow(0, 0, d.B),
                                                  lp.sum.narrow(0, d.B, d.B), rc.to(at::kDouble),
                                                  rr.to(at::kDouble), {}, {})
                              .mean();
    const auto want = grads_of(expected, d.params());
    for (int64_t budget : {int64_t{0}, int64_t{301 * 2 * 4 * 8}}) {
      const auto out = F::fused_dpo_loss(lo.head(), reference_sums(rc, rr), DPOLossOptions(),
                                         FusedLogprobsOptions().chunk_bytes(budget));
      const std::string what = std::string(c10::toString(st)) + " budget " + std::to_string(budget);
      EXPECT_TRUE(AllClose(out.result.loss, expected, tol, tol)) << what;
      expect_low_precision_grads(grads_of(out.result.loss, lo.params()), want, st, tol, what);
    }
  }
}

TEST_F(SeededTest, FusedLossSkipsWhatNeedsNoGradient) {
  const Batch d(3, 6, 4, 9, true, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const auto full = F::fused_dpo_loss(d.head(), given);
  const auto want = grads_of(full.result.loss, d.params());
  {
    c10::NoGradGuard no_grad;
    const auto eval = F::fused_dpo_loss(d.head(), given);
    EXPECT_FALSE(eval.result.loss.requires_grad());
    EXPECT_TRUE(AllClose(eval.result.loss, full.result.loss, 1e-14, 1e-14));
  }
  // A frozen head without bias (LoRA): only the hidden states get a gradient, the fp64 naive
  // composite's (FusedLossHoldsOneChunkOfLogitsAndTheGradients checks that no dW is made).
  Batch nb = d;
  nb.b = at::Tensor();
  const auto lp = naive(nb);
  const auto expected = prefopt_ref::dpo_losses(prefopt_ref::DPORef{}, lp.sum.narrow(0, 0, d.B),
                                                lp.sum.narrow(0, d.B, d.B), rc, rr, {}, {})
                            .mean();
  const auto out = F::fused_dpo_loss(HeadBatch(d.h, d.w.detach(), {}, d.labels), given);
  EXPECT_TRUE(
      AllClose(grads_of(out.result.loss, {d.h})[0], grads_of(expected, {d.h})[0], 1e-12, 1e-13));
  // A scaled loss scales every gradient (gradient accumulation divides the loss).
  const auto again = F::fused_dpo_loss(d.head(), given);
  const auto scaled = grads_of(again.result.loss * 0.25, d.params());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_TRUE(AllClose(scaled[i], want[i] * 0.25, 1e-14, 1e-15));
}

TEST_F(SeededTest, FusedLossScalesLowPrecisionGradientsInFp32AndRefusesASecondBackward) {
  const Batch d(3, 6, 4, 9, true, at::kBFloat16);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const auto once = grads_of(F::fused_dpo_loss(d.head(), given).result.loss, d.params());
  // loss / 3: each bf16 gradient is the fp32 product rounded once, not a product with a bf16
  // copy of 1/3 (0.333984...), which would bias every gradient by 0.2 %.
  const auto third = grads_of(F::fused_dpo_loss(d.head(), given).result.loss / 3, d.params());
  for (size_t i = 0; i < once.size(); ++i) {
    const auto want = (once[i].to(at::kFloat) * (1.0 / 3)).to(at::kBFloat16);
    EXPECT_TRUE(at::equal(third[i], want)) << i;
  }
  const auto out = F::fused_dpo_loss(d.head(), given);
  (void)torch::autograd::grad({out.result.loss}, {d.h}, {}, /*retain_graph=*/true);
  PREFOPT_EXPECT_THROWS_WITH(torch::autograd::grad({out.result.loss}, {d.h}),
                             "prefopt::fused_dpo_loss: a second backward through the same loss");
  const auto twice = F::fused_dpo_loss(d.head(), given);
  PREFOPT_EXPECT_THROWS_WITH(
      torch::autograd::grad({twice.result.loss}, {d.h}, {}, /*retain_graph=*/true,
                            /*create_graph=*/true),
      "prefopt::fused_dpo_loss: double backward (create_graph) is not supported");
}

TEST_F(SeededTest, FusedLossRefusesWhatItCannotComputeInOnePass) {
  const Batch d(3, 6, 4, 9, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), given, DPOLossOptions().loss_type(DPOLossType::kAOT)),
      "prefopt::fused_dpo_loss: aot sorts the log-ratios over the batch");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), given, DPOLossOptions().loss_type(DPOLossType::kAOTUnpaired)),
      "aot_unpaired sorts");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), given,
                        DPOLossOptions().loss_type(DPOLossType::kBCOPair).bco_running_mean(true)),
      "bco_running_mean");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), given, DPOLossOptions(torch::kNone)),
                             "reduction torch::kNone");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_cpo_loss(d.head(), CPOLossOptions(torch::kNone)),
                             "prefopt::fused_cpo_loss: the one-pass op differentiates a scalar");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_simpo_loss(d.head(), prefopt::SimPOLossOptions(torch::kNone)),
                             "prefopt::fused_simpo_loss: the one-pass op differentiates a scalar");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), PairInputs(given).policy_chosen_logps(rc)),
                             "the policy log-probs come from the pass");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), PairInputs(given).nll_loss(rc.sum())),
                             "explicit nll_loss");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), given, DPOLossOptions(),
                        FusedLogprobsOptions().backward(prefopt::FusedBackward::kTiles)),
      "expected FusedBackward::kAuto (the one-pass op has no separate backward pass to block; "
      "the option applies to fused_logprobs), got FusedBackward::kTiles");
  // The loss's own checks run before the pass.
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), reference_sums(rc.narrow(0, 0, 2), rr)),
                             "prefopt::dpo_loss: expected reference_chosen_logps of shape [3]");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), PairInputs()), "reference_chosen_logps");
  // An odd number of sequences is not a batch of pairs.
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_orpo_loss(HeadBatch(d.h.narrow(0, 0, 5), d.w, {}, d.labels.narrow(0, 0, 5))),
      "prefopt::fused_orpo_loss: expected an even number of sequences");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_cpo_loss(HeadBatch(d.h, d.w, {}, {})), "expected labels");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_kto_loss(d.head(), prefopt::FusedKTOInputs()
                                      .desirable(at::ones({5}, at::kBool))
                                      .reference_logps(at::zeros({6}, at::kDouble))),
      "prefopt::fused_kto_loss: expected desirable of shape [6]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_kto_loss(d.head(), prefopt::FusedKTOInputs().desirable(at::ones({6}, at::kBool))),
      "expected reference_logps [6]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_kto_loss(d.head(), prefopt::FusedKTOInputs()
                                      .desirable(at::full({6}, 2, at::kLong))
                                      .reference_logps(at::zeros({6}, at::kDouble))),
      "prefopt::fused_kto_loss: expected desirable flags of 0 or 1, got other values");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), given, DPOLossOptions(),
                                               FusedLogprobsOptions().temperature(INFINITY)),
                             "expected a finite temperature > 0");
}

TEST_F(SeededTest, FusedLossWarnsWhenAPairOutgrowsAnExplicitBudget) {
  const Batch d(3, 6, 4, 9, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  prefopt::detail::WarningCapture warnings;
  const int64_t one_row = 9 * 8 + 4 * 8;
  (void)F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions(),
                          FusedLogprobsOptions().chunk_bytes(one_row));
  EXPECT_TRUE(warnings.contains("are computed twice (one more GEMM on them)"));
  // Without gradients (evaluation, a frozen head and hidden states) every row streams once:
  // no warning of a second GEMM that does not run.
  prefopt::detail::WarningCapture quiet;
  {
    c10::NoGradGuard no_grad;
    (void)F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions(),
                            FusedLogprobsOptions().chunk_bytes(one_row));
  }
  (void)F::fused_kto_loss(HeadBatch(d.h.detach(), d.w.detach(), {}, d.labels),
                          prefopt::FusedKTOInputs()
                              .desirable(at::ones({6}, at::kBool))
                              .reference_logps(at::zeros({6}, at::kDouble)),
                          prefopt::KTOLossOptions(), FusedLogprobsOptions().chunk_bytes(one_row));
  EXPECT_FALSE(quiet.contains("computed twice"));
}

/// Scored rows of the widest pair (the shift drops each sequence's first label).
int64_t widest_pair_rows(const Batch& d) {
  const auto n = (d.labels.slice(1, 1) != kIgnore).sum(1);
  return (n.narrow(0, 0, d.B) + n.narrow(0, d.B, d.B)).max().item<int64_t>();
}

/// The fp64 naive composite of TRL's use_weighting for sigmoid DPO: per sequence
/// w = exp(Σ_t mask·(log p(y_t) − logsumexp(2·log p)) / max(n, 1)) (dpo_trainer.py), detached,
/// and mean(w_c·w_r ⊙ −log σ(β[(π_c−π_r)−(r_c−r_r)])).
struct WpoComposite {
  at::Tensor loss, pair_weights;
  prefopt_ref::Logprobs lp;
};
WpoComposite wpo_composite(const Batch& d, const at::Tensor& rc, const at::Tensor& rr,
                           double softcap = 0) {
  WpoComposite c;
  c.lp = naive(d, 1.0, softcap);
  const auto& w = c.lp.wpo_weights;
  c.pair_weights = w.narrow(0, 0, d.B) * w.narrow(0, d.B, d.B);
  c.loss = (prefopt_ref::dpo_losses(prefopt_ref::DPORef{}, c.lp.sum.narrow(0, 0, d.B),
                                    c.lp.sum.narrow(0, d.B, d.B), rc.to(at::kDouble),
                                    rr.to(at::kDouble), {}, {}) *
            c.pair_weights)
               .mean();
  return c;
}

// with_wpo_weights weights fused_dpo_loss in the pass (TRL's use_weighting): each chunk's
// weights are complete before its gradient, over every chunking: one row (every pair split),
// two rows, the widest pair (one pair to a chunk), ten rows, the whole batch and automatic.
// Pair 1 has nothing scored (weight 1) and pair 2's chosen side is empty. The row kernels and
// the ATen path (CUDA builds without the kernels) both form log Σ p².
TEST_F(SeededTest, FusedDpoAppliesItsWpoWeightsInThePass) {
  for (bool bias : {false, true})
    for (double softcap : {0.0, 3.0}) {
      const auto backend = bias ? GatherBackend::kATen : GatherBackend::kAuto;
      const Batch d(5, 9, 6, 13, bias, at::kDouble);
      const auto [rc, rr] = d.reference();
      const auto c = wpo_composite(d, rc, rr, softcap);
      const auto want = grads_of(c.loss, d.params());
      // The composite's weights are not all 1 (the test would not see them otherwise).
      ASSERT_GT((c.pair_weights - 1).abs().max().item<double>(), 0.1);
      const int64_t row = d.V * 8 * (softcap > 0 ? 2 : 1);  // one row of fp64 logits
      for (int64_t budget :
           {row, 2 * row, widest_pair_rows(d) * row, 10 * row, 1000 * row, int64_t{0}}) {
        const std::string what = "bias " + std::to_string(bias) + " cap " +
                                 std::to_string(softcap) + " budget " + std::to_string(budget);
        prefopt::detail::WarningCapture warnings;
        const auto out = F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions(),
                                           FusedLogprobsOptions()
                                               .softcap(softcap)
                                               .chunk_bytes(budget)
                                               .backend(backend)
                                               .with_wpo_weights(true));
        EXPECT_TRUE(AllClose(out.result.loss, c.loss, 1e-12, 1e-12)) << what;
        ASSERT_TRUE(out.inputs.weights().defined()) << what;
        EXPECT_TRUE(AllClose(out.inputs.weights(), c.pair_weights, 1e-12, 1e-12)) << what;
        EXPECT_TRUE(AllClose(out.policy.chosen.wpo_weights, c.lp.wpo_weights.narrow(0, 0, d.B),
                             1e-12, 1e-12))
            << what;
        expect_grads(grads_of(out.result.loss, d.params()), want, 1e-10, 1e-12, what);
        EXPECT_FALSE(warnings.contains("with_wpo_weights")) << what;
      }
      // Without gradients (evaluation) the same weighted loss.
      c10::NoGradGuard no_grad;
      const auto eval =
          F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions(),
                            FusedLogprobsOptions().softcap(softcap).with_wpo_weights(true));
      EXPECT_TRUE(AllClose(eval.result.loss, c.loss, 1e-12, 1e-12));
    }
}

TEST_F(EveryQualifyingLoss, DpoWithWpoWeightsMatchesTheTwoPassOp) {
  // The two-pass op: fused_logprobs with the WPO weights, wpo_pair_weights, dpo_loss.
  const auto rc = at::randn({6}, at::kDouble) - 12, rr = at::randn({6}, at::kDouble) - 12;
  std::vector<std::pair<std::string, DPOLossOptions>> cases = {
      {"sigmoid sum", DPOLossOptions(torch::kSum)},
      {"ipo", DPOLossOptions().loss_type(DPOLossType::kIPO)},
      {"sigmoid_norm", DPOLossOptions().loss_type(DPOLossType::kSigmoidNorm)},
      {"mpo sigmoid+bco weighted", DPOLossOptions()
                                       .loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair})
                                       .loss_weights({0.8, 0.2})},
      {"rpo sequence-mean nll",
       DPOLossOptions().rpo_alpha(0.5).nll_normalization(prefopt::NLLNormalization::kSequenceMean)},
      {"sft sequence-mean nll", DPOLossOptions()
                                    .loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                                    .nll_normalization(prefopt::NLLNormalization::kSequenceMean)},
      {"js divergence", DPOLossOptions().f_divergence_type(FDivergence::kJSDivergence)}};
  for (const auto& c : cases) {
    const std::string& name = c.first;  // not a structured binding: the lambdas capture it
    const DPOLossOptions& o = c.second;
    check(
        name + " wpo",
        [&](const prefopt::PairLogprobs& p) {
          return F::dpo_loss(
                     PairInputs(p).reference_chosen_logps(rc).reference_rejected_logps(rr).weights(
                         F::wpo_pair_weights(p)),
                     o)
              .loss;
        },
        [&](const HeadBatch& b, const FusedLogprobsOptions& fo) {
          return F::fused_dpo_loss(b, reference_sums(rc, rr), o,
                                   FusedLogprobsOptions(fo).with_wpo_weights(true))
              .result.loss;
        },
        /*bias=*/true, FusedLogprobsOptions().with_wpo_weights(true));
  }
}

TEST_F(SeededTest, FusedDpoWithWpoWeightsTakesPackedMaskedAndEmptyBatches) {
  const Batch d(4, 7, 5, 11, true, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const auto c = wpo_composite(d, rc, rr);
  const auto want = grads_of(c.loss, d.params());
  const auto wpo = FusedLogprobsOptions().with_wpo_weights(true);
  // Completion-mask form: input ids with the ignored labels replaced by any token.
  const auto mask = d.labels != kIgnore;
  const auto ids = d.labels.masked_fill(~mask, 3);
  const auto masked =
      F::fused_dpo_loss(d.head().labels(ids).completion_mask(mask), given, DPOLossOptions(), wpo);
  EXPECT_TRUE(AllClose(masked.result.loss, c.loss, 1e-12, 1e-12));
  expect_grads(grads_of(masked.result.loss, d.params()), want, 1e-10, 1e-12, "mask form");
  // Packed: the S sequences back to back, each of length T (the shift stays inside each).
  const auto h_packed = d.h.reshape({-1, d.H});
  const auto cu = at::arange(0, 2 * d.B * d.T + 1, d.T, at::kLong);
  for (int64_t budget : budgets(d)) {
    const auto packed =
        F::fused_dpo_loss(HeadBatch(h_packed, d.w, d.b, d.labels.flatten()).cu_seqlens(cu), given,
                          DPOLossOptions(), FusedLogprobsOptions(wpo).chunk_bytes(budget));
    const std::string what = "packed budget " + std::to_string(budget);
    EXPECT_TRUE(AllClose(packed.result.loss, c.loss, 1e-12, 1e-12)) << what;
    expect_grads(grads_of(packed.result.loss, d.params()), want, 1e-10, 1e-12, what);
  }
  // Nothing scored: every weight is exp(0) = 1 and no gradient reaches the head.
  Batch e = d;
  e.labels = at::full_like(d.labels, kIgnore);
  const auto ce = wpo_composite(e, rc, rr);
  EXPECT_TRUE(AllClose(ce.pair_weights, at::ones({d.B}, at::kDouble), 0, 0));
  const auto empty = F::fused_dpo_loss(e.head(), given, DPOLossOptions(), wpo);
  EXPECT_TRUE(AllClose(empty.result.loss, ce.loss, 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(empty.inputs.weights(), ce.pair_weights, 0, 0));
  if (empty.result.loss.requires_grad()) {
    for (const auto& g : grads_of(empty.result.loss, e.params()))
      EXPECT_TRUE(AllClose(g, at::zeros_like(g), 0, 0));
  }
}

TEST_F(SeededTest, FusedDpoWithWpoWeightsInLowPrecisionIsCloseToTheFp64Reference) {
  // As FusedLossInLowPrecisionIsCloseToTheFp64Reference, with the weights: fp32 2e-6, bf16
  // 1e-2 of the largest entry of each gradient (and of the loss).
  for (auto [st, tol] : {std::make_pair(at::kFloat, 2e-6), std::make_pair(at::kBFloat16, 1e-2)}) {
    const Batch lo(6, 16, 32, 301, true, st);
    const auto d = lo.as_double();
    const auto [rc, rr] = lo.reference();
    const auto c = wpo_composite(d, rc, rr);
    const auto want = grads_of(c.loss, d.params());
    // Automatic, 8 rows and one row (every pair split) of logits.
    const int64_t row = 301 * static_cast<int64_t>(lo.h.element_size());
    for (int64_t budget : {int64_t{0}, 8 * row, row}) {
      const auto out =
          F::fused_dpo_loss(lo.head(), reference_sums(rc, rr), DPOLossOptions(),
                            FusedLogprobsOptions().chunk_bytes(budget).with_wpo_weights(true));
      const std::string what = std::string(c10::toString(st)) + " budget " + std::to_string(budget);
      EXPECT_TRUE(AllClose(out.result.loss, c.loss, tol, tol)) << what;
      EXPECT_TRUE(AllClose(out.inputs.weights(), c.pair_weights, tol, tol)) << what;
      expect_low_precision_grads(grads_of(out.result.loss, lo.params()), want, st, tol, what);
    }
  }
}

// What the pass cannot weight: given weights as well (they would multiply), and a token-mean
// NLL term, whose weighted gradient needs every pair's weight before the first chunk's.
TEST_F(SeededTest, FusedDpoRefusesWhatItsWpoWeightsCannotWeightInThePass) {
  const Batch d(3, 6, 4, 9, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto wpo = FusedLogprobsOptions().with_wpo_weights(true);
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), reference_sums(rc, rr).weights(at::ones({3}, at::kDouble)),
                        DPOLossOptions(), wpo),
      "prefopt::fused_dpo_loss: with_wpo_weights weights each pair by the pass's WPO weights "
      "w_c·w_r; got inputs.weights too");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), reference_sums(rc, rr), DPOLossOptions().rpo_alpha(0.5), wpo),
      "prefopt::fused_dpo_loss: with_wpo_weights and a token-mean NLL term (rpo_alpha)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_dpo_loss(d.head(), reference_sums(rc, rr),
                        DPOLossOptions().loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT}),
                        wpo),
      "with_wpo_weights and a token-mean NLL term (sft)");
  // Without with_wpo_weights, given weights and a token-mean NLL stay as they were.
  (void)F::fused_dpo_loss(d.head(), reference_sums(rc, rr).weights(at::ones({3}, at::kDouble)),
                          DPOLossOptions().rpo_alpha(0.5));
}

TEST_F(SeededTest, FusedLossHoldsOneChunkOfLogitsAndTheGradients) {
  // fp32, 4 pairs of 32 tokens, V = 4096: the logits would be 4 MiB. With a 1 MiB budget (64
  // rows, more than a pair's 60) pairs stay whole; with 256 KiB (16 rows) each pair is split.
  // Either way, beside the inputs: the gradients, one budget of buffers and O(n) per-row state.
  auto& meter = prefopt_bench::TrackingAllocator::install();
  const Batch d(4, 32, 32, 4096, false, at::kFloat);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const int64_t n = (d.labels != kIgnore).sum().item<int64_t>();
  const int64_t grads = (8 * 32 * 32 + 4096 * 32) * 4;
  const auto want = grads_of(
      F::fused_dpo_loss(d.head(), given, DPOLossOptions(), FusedLogprobsOptions()).result.loss,
      {d.h, d.w});
  for (const int64_t budget : {int64_t{1} << 20, int64_t{256} << 10}) {
    std::vector<at::Tensor> g;
    prefopt::detail::WarningCapture warnings;  // the split budget warns: not the point here
    meter.reset_peak();
    const int64_t before = meter.live();
    {
      const auto out = F::fused_dpo_loss(d.head(), given, DPOLossOptions(),
                                         FusedLogprobsOptions().chunk_bytes(budget));
      g = grads_of(out.result.loss, {d.h, d.w});
    }
    const int64_t extra = meter.peak() - before;
    EXPECT_GT(extra, grads);
    EXPECT_LE(extra, grads + budget + n * 96 + (64 << 10))
        << "budget " << budget << " B, gradients " << grads << " B, n = " << n;
    expect_grads(g, want, 1e-5, 1e-7, "budget " + std::to_string(budget));
  }
  // A frozen head: no [V, H] buffer at all, only dh (32 KiB) beside the budget.
  const int64_t budget = int64_t{1} << 20;
  meter.reset_peak();
  const int64_t before = meter.live();
  {
    const auto out =
        F::fused_dpo_loss(HeadBatch(d.h, d.w.detach(), {}, d.labels), given, DPOLossOptions(),
                          FusedLogprobsOptions().chunk_bytes(budget));
    (void)grads_of(out.result.loss, {d.h});
  }
  EXPECT_LE(meter.peak() - before, 8 * 32 * 32 * 4 + budget + n * 96 + (64 << 10));
}

/// The CPU bytes allocated at the peak of `loss()` and its gradients with respect to `params`,
/// beyond what was live before (the gradients returned included), and those gradients.
std::pair<int64_t, std::vector<at::Tensor>> peak_and_grads(prefopt_bench::TrackingAllocator& meter,
                                                           const std::function<at::Tensor()>& loss,
                                                           const std::vector<at::Tensor>& params) {
  meter.reset_peak();
  const int64_t before = meter.live();
  auto g = grads_of(loss(), params);
  return {meter.peak() - before, std::move(g)};
}

TEST_F(SeededTest, FusedLossTakesOneChunkWhereTheDwAccumulatorWouldCostMore) {
  // bf16, a trained head, V = 8192, 4 pairs of 64 tokens (about 3.5 MiB of logits). Several
  // chunks need the fp32 accumulator of dW (4·V·H bytes), one chunk none. At H = 512 (16 MiB)
  // one chunk costs less, so the automatic chunking takes it: the same GEMMs and gradients as
  // an explicit budget of the whole batch. At H = 32 (1 MiB) chunks of whole pairs and the
  // accumulator cost less than one chunk, so it keeps them. Either way its peak is at most one
  // chunk's, and its gradients are the two-pass op's within the bf16 tolerance of
  // FusedLossInLowPrecisionIsCloseToTheFp64Reference. At H = 64 one chunk's extra logits
  // (about 1.6 MiB) fall between its own 16-bit dW (2·V·H = 1 MiB) and the accumulator
  // (2 MiB): counting the dW, chunks of pairs cost less, and the automatic peak is at most
  // theirs (a budget of one pair's logits). That band is checked where 16-bit products run on
  // fp32 blocks: where libtorch's 16-bit GEMM serves (PREFOPT_CPU_GEMM16=rounded, or timed
  // fast), its per-block temporaries, which the rule does not count, move the balance.
  auto& meter = prefopt_bench::TrackingAllocator::install();
  const int64_t V = 8192;
  for (const int64_t H : {512, 64, 32}) {
    const Batch d(4, 64, H, V, false, at::kBFloat16);
    const auto [rc, rr] = d.reference();
    const auto given = reference_sums(rc, rr);
    const int64_t n = (d.labels != kIgnore).sum().item<int64_t>();
    const auto run = [&](int64_t budget) {
      return peak_and_grads(meter,
                            [&] {
                              return F::fused_dpo_loss(d.head(), given, DPOLossOptions(),
                                                       FusedLogprobsOptions().chunk_bytes(budget))
                                  .result.loss;
                            },
                            {d.h, d.w});
    };
    (void)run(0);  // the process's first 16-bit GEMMs check libtorch's (cpu_mm16_fast)
    const auto automatic = run(0);
    const auto one_chunk = run(n * V * 2);
    const auto pairs = run(2 * 64 * V * 2);
    const std::string what = "H = " + std::to_string(H) + ": automatic " +
                             std::to_string(automatic.first) + " B, one chunk " +
                             std::to_string(one_chunk.first) + " B, pair chunks " +
                             std::to_string(pairs.first) + " B";
    std::cout << what << "\n";
    if (H != 64 || !prefopt::detail::fused::cpu_mm16_fast(at::kBFloat16)) {
      EXPECT_LE(automatic.first, std::min(one_chunk.first, pairs.first) + (64 << 10)) << what;
      if (H == 64) {
        EXPECT_LT(pairs.first, one_chunk.first) << what;
      }
    }
    if (H == 512) {
      for (size_t i = 0; i < 2; ++i)
        EXPECT_TRUE(at::equal(automatic.second[i], one_chunk.second[i]));
    } else if (H == 32) {
      EXPECT_LT(automatic.first + 2 * V * H, one_chunk.first) << what;
    }
    const auto two_pass =
        F::dpo_loss(PairInputs(F::split_pairs(F::fused_logprobs(d.h, d.w, {}, d.labels)))
                        .reference_chosen_logps(rc)
                        .reference_rejected_logps(rr));
    const auto want = grads_of(two_pass.loss, {d.h, d.w});
    for (size_t i = 0; i < 2; ++i) {
      const double scale = want[i].abs().max().item<double>();
      EXPECT_TRUE(AllClose(automatic.second[i], want[i], 0, 1e-2 * scale)) << what << " " << i;
    }
  }
}

TEST_F(SeededTest, FusedLossOnTheAtenRowPathKeepsItsTemporariesWithinTheBudget) {
  // GatherBackend::kATen (also the path of CUDA builds without the row kernels) computes the
  // row statistics and the logits' gradient with ATen operations on fp32 copies of rows:
  // within chunk_bytes (rows_per_chunk), not three copies of the whole chunk of logits. fp32,
  // a frozen head, a 2 MiB budget (64 rows: pairs split): beside dh and O(n) per-row state,
  // the logits buffer and those temporaries take at most two budgets, in the one-pass op and
  // in the two-pass one (forward and kTiles backward). The results are kAuto's (the CPU row
  // kernels), up to fp32 summation order.
  auto& meter = prefopt_bench::TrackingAllocator::install();
  const int64_t V = 8192, budget = int64_t{2} << 20;
  const Batch d(4, 64, 32, V, false, at::kFloat);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const int64_t n = (d.labels != kIgnore).sum().item<int64_t>();
  const int64_t bound = static_cast<int64_t>(d.h.numel()) * 4 + 2 * budget + n * 96 + (64 << 10);
  const HeadBatch frozen(d.h, d.w.detach(), {}, d.labels);
  std::vector<at::Tensor> loss, sums;
  std::vector<std::vector<at::Tensor>> one_pass, two_pass;
  for (const auto backend : {GatherBackend::kAuto, GatherBackend::kATen}) {
    const std::string what = backend == GatherBackend::kATen ? "kATen" : "kAuto";
    const auto opts = FusedLogprobsOptions().chunk_bytes(budget).backend(backend);
    prefopt::detail::WarningCapture warnings;  // the pairs outgrow the budget
    const auto one = peak_and_grads(meter,
                                    [&] {
                                      const auto out =
                                          F::fused_dpo_loss(frozen, given, DPOLossOptions(), opts);
                                      loss.push_back(out.result.loss.detach());
                                      return out.result.loss;
                                    },
                                    {d.h});
    EXPECT_LE(one.first, bound) << what << " one pass: " << one.first << " B";
    one_pass.push_back(one.second);
    const auto two = peak_and_grads(
        meter,
        [&] {
          const auto s = F::fused_logprobs(d.h, d.w.detach(), {}, d.labels, opts).sum;
          sums.push_back(s.detach());
          return (s * at::linspace(-1, 1, s.size(0), s.options())).sum();
        },
        {d.h});
    EXPECT_LE(two.first, bound) << what << " two passes: " << two.first << " B";
    two_pass.push_back(two.second);
  }
  EXPECT_TRUE(AllClose(loss[1], loss[0], 1e-5, 1e-6));
  EXPECT_TRUE(AllClose(sums[1], sums[0], 1e-5, 1e-3));
  for (const auto* g : {&one_pass, &two_pass}) {
    const double scale = (*g)[0][0].abs().max().item<double>();
    EXPECT_TRUE(AllClose((*g)[1][0], (*g)[0][0], 0, 1e-5 * scale));
  }
}

TEST_F(SeededTest, FusedDpoLossWarnsWhenTheReferenceDoesNotSayItsForm) {
  // As dpo_loss: a reference whose form is unsaid is taken as sums, with a warning.
  const Batch d(3, 6, 4, 9, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  at::Tensor unsaid_loss;
  {
    prefopt::detail::WarningCapture warnings;
    unsaid_loss =
        F::fused_dpo_loss(d.head(),
                          PairInputs().reference_chosen_logps(rc).reference_rejected_logps(rr))
            .result.loss;
    EXPECT_TRUE(warnings.contains(
        "prefopt::fused_dpo_loss: PairInputs does not say whether its log-probs are sums or "
        "per-token means; taking them as sums"));
  }
  prefopt::detail::WarningCapture warnings;
  const auto said = F::fused_dpo_loss(d.head(), reference_sums(rc, rr));
  EXPECT_TRUE(AllClose(unsaid_loss, said.result.loss, 0, 0));
  // Nothing to say without a reference: the policy's side comes from the pass.
  (void)F::fused_dpo_loss(d.head(), PairInputs(), DPOLossOptions().reference_free(true));
  (void)F::fused_cpo_loss(d.head());
  EXPECT_FALSE(warnings.contains("does not say"));
}

/// The fp32 accumulator of a 16-bit dW (one-pass op; two-pass kTokenChunks/kTiles) on
/// `device`: its cast at the end writes the [V, H] result into the accumulator's own storage,
/// block by block. With h the identity, each add puts zᵀ into rows [v0, v0 + vb) exactly, on
/// every GEMM path, so the result must equal the blocks exactly. V is odd; the blocks lie
/// wholly in the top half, across the halves (at 4104: ⌈V/2⌉ rounded up to 8) and wholly in
/// the bottom half, whose GEMMs read column slices of z in place. With `meter` (CPU), the
/// cast allocates at most 1 Mi elements (2 MiB): not the 2·V·H bytes of a separate cast, nor
/// the V·H of casting the top half at once (4.2 MB here).
void expect_dw_accumulator_casts_in_place(const at::Device& device,
                                          prefopt_bench::TrackingAllocator* meter) {
  const int64_t V = 8193, H = 512;
  const std::vector<int64_t> edges{0, 1000, 5000, V};
  const auto opts = at::TensorOptions(at::kFloat).device(device);
  for (auto st : {at::kBFloat16, at::kHalf}) {
    if (st == at::kHalf && device.is_cpu() && !prefopt::detail::fused::cpu_half_matmul()) continue;
    const auto eye = at::eye(H, opts).to(st);
    std::vector<at::Tensor> blocks;
    prefopt::detail::fused::DwAccumulator acc(V, H, opts);
    for (size_t i = 0; i + 1 < edges.size(); ++i) {
      const auto z = at::randn({H, edges[i + 1] - edges[i]}, opts).to(st);
      acc.add(edges[i], z, eye);
      acc.add(edges[i], z, eye);  // 2·zᵀ: still exact
      blocks.push_back(z.t() * 2);
    }
    int64_t before = 0;
    if (meter != nullptr) meter->reset_peak(), before = meter->live();
    const auto dw = acc.finish(st);
    if (meter != nullptr) {
      const int64_t extra = meter->peak() - before;
      EXPECT_LE(extra, 2 * (int64_t{1} << 20) + (64 << 10)) << c10::toString(st);
      EXPECT_LT(extra, V * H) << c10::toString(st);
    }
    ASSERT_EQ(dw.sizes(), (std::vector<int64_t>{V, H}));
    EXPECT_EQ(dw.scalar_type(), st);
    EXPECT_EQ(dw.device().type(), device.type());  // kCUDA means the current device
    EXPECT_TRUE(dw.is_contiguous());
    EXPECT_TRUE(at::equal(dw, at::cat(blocks))) << c10::toString(st);
  }
}

TEST_F(SeededTest, DwAccumulatorCastsInItsOwnStorage) {
  expect_dw_accumulator_casts_in_place(at::kCPU, &prefopt_bench::TrackingAllocator::install());
}

TEST_F(SeededTest, MixedPrecisionCpuGemmAccumulatesInFp32) {
  // add_mm: c (fp32) += op(a)·b for 16-bit a, b, by cpu::gemm16_path: the process's
  // oneDNN/MKL (the error is fp32 rounding, far below one bf16 rounding of entries near 6);
  // libtorch's 16-bit GEMM per block (PREFOPT_CPU_GEMM16=rounded, the ctest
  // fused_loss.gemm16_rounded, and the default on non-Intel AVX512-BF16 CPUs): the product
  // rounded once to 16 bits, then summed into c in fp32; fp32 copies of blocks (=off, the
  // ctest fused_loss.gemm16_fallback): fp32 throughout.
  namespace cpu = prefopt::detail::cpu;
  for (auto st : {at::kBFloat16, at::kHalf}) {
    const auto type = st == at::kBFloat16 ? cpu::Gemm16::kBFloat16 : cpu::Gemm16::kHalf;
    // The rounded path takes libtorch's 16-bit GEMM only where that sums in fp32.
    const auto rounded_for = [&](bool trans_a) {
      return cpu::gemm16_path(type) == cpu::Gemm16Path::kRounded &&
             prefopt::detail::fused::cpu_mm16_usable(st, trans_a, /*trans_b=*/false);
    };
    // Rounding to nearest: at most half an ulp, which is at most 2^-7 (bf16) or 2^-10 (fp16)
    // of the value.
    const double ulp = st == at::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;
    // m = 53 rows, then 8 MiB / n rows per block: several blocks for the wide case.
    for (auto [trans_a, n] : {std::pair{true, int64_t{29}}, std::pair{false, int64_t{29}},
                              std::pair{true, int64_t{300000}}}) {
      const bool rounded = rounded_for(trans_a);
      const auto a = trans_a ? at::randn({37, 53}).to(st) : at::randn({53, 37}).to(st);
      const auto b = at::randn({37, n}).to(st);
      auto c = at::randn({53, n});
      const auto a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
      const auto product = at::mm(trans_a ? a64.t() : a64, b64);
      const auto want = c.to(at::kDouble) + product;
      prefopt::detail::fused::add_mm(c, a, trans_a, b);
      // fp32: a few fp32 roundings of sums of 37 terms (entries up to about 25).
      const double fp32 = 2e-6 * want.abs().max().item<double>();
      const double tol = fp32 + (rounded ? product.abs().max().item<double>() * ulp / 2 : 0.0);
      const double err = (c.to(at::kDouble) - want).abs().max().item<double>();
      EXPECT_LE(err, tol) << c10::toString(st) << " trans_a " << trans_a << " n " << n;
      if (rounded) {
        // And no better than fp32: the product really went through 16 bits.
        EXPECT_GT(err, fp32) << c10::toString(st) << " trans_a " << trans_a << " n " << n;
      }
    }
    {
      // One-row operands whose row stride ATen leaves at 1 (they count as contiguous): the
      // leading dimension handed to BLAS must be the row length, not that stride.
      const auto row = [&](int64_t len) {
        return at::randn({len}).to(st).as_strided({1, len}, {1, 1});
      };
      const auto a = row(53), b = row(29);  // op(a) = aᵀ [53, 1], b [1, 29]
      auto c = at::zeros({53, 29});
      prefopt::detail::fused::add_mm(c, a, /*trans_a=*/true, b);
      const auto want = at::mm(a.to(at::kDouble).t(), b.to(at::kDouble));
      EXPECT_LE((c.to(at::kDouble) - want).abs().max().item<double>(),
                want.abs().max().item<double>() * ulp)
          << c10::toString(st) << " one-row operands";
    }
    std::cout << c10::toString(st) << " mixed GEMM: "
              << (prefopt::detail::fused::cpu_mm16_fast(st) ? cpu::gemm16_path_name(type)
                                                            : "none (fallback)")
              << "; libtorch's 16-bit mm at " << prefopt::detail::fused::cpu_mm16_speed(st)
              << "x its fp32 rate\n";
  }
}

TEST_F(SeededTest, SixteenBitGemmRoundsOnceOnEveryLayout) {
  // set_mm (the fused ops' 16-bit dh and dW GEMMs) and chunk_logits (their logits): fp32
  // accumulation, one rounding of the result, on every layout. Debian's libtorch 1.13 on
  // CPUs without AVX-512 sums its own 16-bit GEMM in 16 bits in three of the four layouts
  // (errors of 25-30× one rounding at k = 3000); there cpu_mm16_usable routes them through
  // fp32 blocks.
  namespace fu = prefopt::detail::fused;
  const int64_t m = 53, k = 3000, n = 70;
  for (auto st : {at::kBFloat16, at::kHalf}) {
    if (st == at::kHalf && !fu::cpu_half_matmul()) continue;
    const double ulp = st == at::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;
    for (bool trans_a : {false, true}) {
      const auto a = trans_a ? at::randn({k, m}).to(st) : at::randn({m, k}).to(st);
      const auto b = at::randn({k, n}).to(st);
      const auto want =
          at::mm(trans_a ? a.to(at::kDouble).t() : a.to(at::kDouble), b.to(at::kDouble));
      auto c = at::empty({m, n}, at::TensorOptions().dtype(st));
      fu::set_mm(c, a, trans_a, b);
      // Half an ulp of each entry (rounding) plus fp32 summation noise.
      const auto err = (c.to(at::kDouble) - want).abs() - want.abs() * (ulp / 2);
      EXPECT_LE(err.max().item<double>(), 1e-4 * want.abs().max().item<double>())
          << c10::toString(st) << " trans_a " << trans_a
          << " (libtorch's own GEMM sums in fp32: " << fu::cpu_mm16_usable(st, trans_a, false)
          << ")";
    }
    // dh = dz · W with W column-major (a weight stored [H, V] and passed as its transpose).
    {
      const auto a = at::randn({m, k}).to(st), b = at::randn({n, k}).to(st).t();
      const auto want = at::mm(a.to(at::kDouble), b.to(at::kDouble));
      auto c = at::empty({m, n}, at::TensorOptions().dtype(st));
      fu::set_mm(c, a, /*trans_a=*/false, b);
      const auto err = (c.to(at::kDouble) - want).abs() - want.abs() * (ulp / 2);
      EXPECT_LE(err.max().item<double>(), 1e-4 * want.abs().max().item<double>())
          << c10::toString(st)
          << " column-major b (libtorch's own GEMM used: " << fu::cpu_mm16_usable(st, false, true)
          << ")";
    }
    // The logits: h · Wᵀ (+ b) with W stored [V, H], and with W a transposed [H, V] tensor.
    for (bool w_col_major : {false, true}) {
      const auto h = at::randn({m, k}).to(st);
      const auto w = w_col_major ? at::randn({k, n}).to(st).t() : at::randn({n, k}).to(st);
      const auto bias = at::randn({n}).to(st);
      const auto want = at::addmm(bias.to(at::kDouble), h.to(at::kDouble), w.to(at::kDouble).t());
      auto z = at::empty({m, n}, at::TensorOptions().dtype(st));
      fu::chunk_logits(h, w, bias, fu::HeadSpec{}, z);
      // One ulp: libtorch's addmm may round the product and the sum with the bias separately.
      const auto err = (z.to(at::kDouble) - want).abs() - want.abs() * ulp;
      EXPECT_LE(err.max().item<double>(), 1e-4 * want.abs().max().item<double>())
          << c10::toString(st) << " logits, W column-major " << w_col_major;
    }
  }
}

TEST_F(SeededTest, Fp32BlocksOverEveryDimensionAndLayout) {
  // mm_fp32_blocks, the 16-bit GEMMs' fallback (CPUs without AVX-512, PREFOPT_CPU_GEMM16=off,
  // a layout whose libtorch GEMM sums in 16 bits): blocks of 16 MiB in fp32 over m, n and k,
  // operands of either layout, against fp64. Shapes from its blocking rule: k = 9000 > 4096
  // with n = 2000 gives 3 blocks of k and 2 of n; k = 300, n = 15000 gives 2 blocks of n and
  // 3 of m (700 rows, 300 per block).
  namespace fu = prefopt::detail::fused;
  struct Shape {
    int64_t m, k, n;
  };
  for (const Shape sh : {Shape{53, 9000, 2000}, Shape{700, 300, 15000}}) {
    const auto a_rows = at::randn({sh.m, sh.k}).to(at::kBFloat16);
    const auto b_rows = at::randn({sh.k, sh.n}).to(at::kBFloat16);
    const auto bias = at::randn({sh.n}).to(at::kBFloat16);
    const auto product = at::mm(a_rows.to(at::kDouble), b_rows.to(at::kDouble));
    const double scale = product.abs().max().item<double>();
    for (int layout = 0; layout < 4; ++layout) {
      const bool a_cm = (layout & 1) != 0, b_cm = (layout & 2) != 0;
      // The same values stored column-major.
      const auto a = a_cm ? a_rows.t().contiguous().t() : a_rows;
      const auto b = b_cm ? b_rows.t().contiguous().t() : b_rows;
      ASSERT_EQ(fu::col_major(a), a_cm);
      ASSERT_EQ(fu::col_major(b), b_cm);
      const std::string what = "m " + std::to_string(sh.m) + " k " + std::to_string(sh.k) +
                               " layout " + std::to_string(layout);
      // fp32 c accumulating: fp32 roundings only (sums of up to 9000 terms).
      auto c32 = at::randn({sh.m, sh.n});
      const auto want32 = c32.to(at::kDouble) + product;
      fu::mm_fp32_blocks(c32, a, b, /*accumulate=*/true);
      EXPECT_LE((c32.to(at::kDouble) - want32).abs().max().item<double>(), 1e-5 * scale) << what;
      // 16-bit c, set with a bias: the bias added in fp32, then one rounding (half an ulp).
      auto c16 = at::empty({sh.m, sh.n}, at::TensorOptions().dtype(at::kBFloat16));
      const auto want16 = product + bias.to(at::kDouble);
      fu::mm_fp32_blocks(c16, a, b, /*accumulate=*/false, bias);
      const auto err16 = (c16.to(at::kDouble) - want16).abs() - want16.abs() / 256;
      EXPECT_LE(err16.max().item<double>(), 1e-5 * scale) << what << " (bf16 result)";
      if (layout == 0) {
        // 16-bit c accumulating: its old value enters the fp32 sum, one rounding at the end.
        auto acc = at::randn({sh.m, sh.n}).to(at::kBFloat16);
        const auto want = acc.to(at::kDouble) + product;
        fu::mm_fp32_blocks(acc, a, b, /*accumulate=*/true);
        const auto err = (acc.to(at::kDouble) - want).abs() - want.abs() / 256;
        EXPECT_LE(err.max().item<double>(), 1e-5 * scale) << what << " (bf16 accumulate)";
      }
    }
  }
  // k = 0: the set forms give the bias (or zeros); accumulating leaves c alone.
  const auto a0 = at::empty({4, 0}, at::TensorOptions().dtype(at::kBFloat16));
  const auto b0 = at::empty({0, 3}, at::TensorOptions().dtype(at::kBFloat16));
  auto c0 = at::full({4, 3}, 7.0, at::TensorOptions().dtype(at::kBFloat16));
  fu::mm_fp32_blocks(c0, a0, b0, /*accumulate=*/false);
  EXPECT_TRUE(at::equal(c0, at::zeros_like(c0)));
  auto c1 = at::full({4, 3}, 7.0);
  fu::mm_fp32_blocks(c1, a0, b0, /*accumulate=*/true);
  EXPECT_TRUE(at::equal(c1, at::full({4, 3}, 7.0)));
}

TEST(ColMajor, FollowsAtensGemmLayoutRule) {
  // Which of cpu_mm16_usable's layout checks applies: ATen's CPU GEMM takes a matrix as
  // column-major when its row stride is 1 and its column stride at least the row count, as
  // row-major likewise (that first, for the row-major outputs the fused ops write), and
  // multiplies anything else from a row-major copy.
  namespace fu = prefopt::detail::fused;
  const auto store = at::arange(64, at::TensorOptions().dtype(at::kFloat));
  const auto view = [&](int64_t r, int64_t c, int64_t s0, int64_t s1) {
    return store.as_strided({r, c}, {s0, s1});
  };
  EXPECT_FALSE(fu::col_major(view(4, 3, 3, 1)));  // contiguous
  EXPECT_FALSE(fu::col_major(view(4, 3, 5, 1)));  // rows 5 apart (a padded buffer)
  EXPECT_TRUE(fu::col_major(view(4, 3, 1, 4)));   // a transposed contiguous [3, 4]
  EXPECT_TRUE(fu::col_major(view(4, 3, 1, 6)));   // columns 6 apart
  EXPECT_FALSE(fu::col_major(view(4, 3, 1, 2)));  // overlapping columns: copied row-major
  EXPECT_FALSE(fu::col_major(view(4, 3, 2, 2)));  // neither: copied row-major
  EXPECT_FALSE(fu::col_major(view(4, 1, 1, 1)));  // one column: passes as row-major first
  EXPECT_TRUE(fu::col_major(view(4, 1, 1, 4)));
  EXPECT_FALSE(fu::col_major(store.view({4, 4, 4})));  // not a matrix
}

using FusedLossCuda = prefopt_test::CudaTest;

TEST_F(FusedLossCuda, DwAccumulatorCastsInItsOwnStorage) {
  // cuBLAS gets the halves' column slices of z with their leading dimension (gemm_f32acc).
  expect_dw_accumulator_casts_in_place(at::kCUDA, nullptr);
}

TEST_F(FusedLossCuda, MatchesCpu) {
  // The one-pass op on CUDA against the same op on CPU, fp32 and bf16 (16-bit GEMMs on both
  // sides, dW in the fp32 accumulator over several chunks), over a budget that splits pairs
  // (10 rows), one that keeps a pair per chunk (about two pairs' rows) and the automatic one.
  // V odd: the accumulator's halves split the logits at an unaligned column.
  const int64_t B = 4, T = 40, H = 64, V = 5003;
  for (auto st : {at::kFloat, at::kBFloat16}) {
    const Batch cpu(B, T, H, V, /*bias=*/true, st);
    const auto [rc, rr] = cpu.reference();
    const auto in = reference_sums(rc, rr);
    Batch gpu = cpu;
    gpu.h = cpu.h.detach().cuda().requires_grad_();
    gpu.w = cpu.w.detach().cuda().requires_grad_();
    gpu.b = cpu.b.detach().cuda().requires_grad_();
    gpu.labels = cpu.labels.cuda();
    const auto in_gpu = reference_sums(rc.cuda(), rr.cuda());
    const int64_t row = V * static_cast<int64_t>(cpu.h.element_size());
    for (int64_t budget : {10 * row, 2 * T * row, int64_t{0}}) {
      const std::string what = std::string(c10::toString(st)) + " budget " + std::to_string(budget);
      prefopt::detail::WarningCapture warnings;
      const auto opts = FusedLogprobsOptions().chunk_bytes(budget);
      const auto a = F::fused_dpo_loss(cpu.head(), in, DPOLossOptions(), opts);
      const auto g = F::fused_dpo_loss(gpu.head(), in_gpu, DPOLossOptions(), opts);
      const double tol = st == at::kFloat ? 1e-4 : 5e-2;
      EXPECT_TRUE(AllClose(g.result.loss.cpu(), a.result.loss, tol, tol)) << what;
      EXPECT_TRUE(AllClose(g.result.chosen_logps.cpu(), a.result.chosen_logps, tol, tol * T))
          << what;
      const auto ga = grads_of(a.result.loss, cpu.params());
      const auto gg = grads_of(g.result.loss, gpu.params());
      for (size_t i = 0; i < ga.size(); ++i) {
        EXPECT_EQ(gg[i].scalar_type(), st) << what;
        EXPECT_TRUE(AllClose(gg[i].cpu(), ga[i], 2e-2, tol * ga[i].abs().max().item<double>()))
            << what << " gradient " << i;
      }
    }
  }
}

TEST_F(FusedLossCuda, RunsOnANonCurrentDevice) {
  // Inputs on cuda:1 while cuda:0 is current: the one-pass op computes its gradients in the
  // forward pass, where no autograd engine sets the device, so the row kernels and the
  // mixed-precision GEMMs (bf16 over several chunks: dW in the fp32 accumulator, cuBLAS through
  // gemm_f32acc) must take the inputs' device, handle and stream.
  if (at::getNumGPUs() < 2) GTEST_SKIP() << "needs two GPUs";
  const int64_t B = 3, T = 24, H = 32, V = 1001;
  const at::Device dev(at::kCUDA, 1);
  const Batch cpu(B, T, H, V, /*bias=*/true, at::kBFloat16);
  const auto [rc, rr] = cpu.reference();
  Batch gpu = cpu;
  gpu.h = cpu.h.detach().to(dev).requires_grad_();
  gpu.w = cpu.w.detach().to(dev).requires_grad_();
  gpu.b = cpu.b.detach().to(dev).requires_grad_();
  gpu.labels = cpu.labels.to(dev);
  const auto opts = FusedLogprobsOptions().chunk_bytes(10 * V * 2);  // several chunks
  const auto a = F::fused_dpo_loss(cpu.head(), reference_sums(rc, rr), DPOLossOptions(), opts);
  const auto g =
      F::fused_dpo_loss(gpu.head(), reference_sums(rc.to(dev), rr.to(dev)), DPOLossOptions(), opts);
  EXPECT_EQ(g.result.loss.device(), dev);
  EXPECT_TRUE(AllClose(g.result.loss.cpu(), a.result.loss, 5e-2, 5e-2));
  const auto ga = grads_of(a.result.loss, cpu.params());
  const auto gg = grads_of(g.result.loss, gpu.params());
  for (size_t i = 0; i < ga.size(); ++i) {
    EXPECT_EQ(gg[i].device(), dev) << "gradient " << i;
    EXPECT_TRUE(AllClose(gg[i].cpu(), ga[i], 2e-2, 5e-2 * ga[i].abs().max().item<double>()))
        << "gradient " << i;
  }
}

}  // namespace

// #20 item 16: an enum value cast from an integer outside the enum (a config file, a C API)
// gets a named error, not an out-of-bounds read (the one-pass op used to index a name table
// with it) nor a silent fallback.
TEST_F(SeededTest, OutOfRangeEnumValuesAreNamedErrors) {
  const Batch d(2, 5, 4, 7, false, at::kDouble);
  const auto [rc, rr] = d.reference();
  const auto given = reference_sums(rc, rr);
  const auto logits = at::randn({2, 5, 7}, at::kDouble);
  const auto labels = at::zeros({2, 5}, at::kLong);
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_logprobs(logits, labels,
                         GatherLogprobsOptions().backend(static_cast<GatherBackend>(9))),
      "prefopt::gather_logprobs: backend is not a GatherBackend value (got 9)");
  const auto bad_backward = FusedLogprobsOptions().backward(static_cast<FusedBackward>(9));
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(at::randn({2, 5, 4}, at::kDouble), at::randn({7, 4}, at::kDouble), {},
                        labels, bad_backward),
      "prefopt::fused_logprobs: backward is not a FusedBackward value (got 9)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(at::randn({2, 5, 4}, at::kDouble), at::randn({7, 4}, at::kDouble), {},
                        labels, FusedLogprobsOptions().backend(static_cast<GatherBackend>(9))),
      "prefopt::fused_logprobs: backend is not a GatherBackend value (got 9)");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_dpo_loss(d.head(), given, {}, bad_backward),
                             "prefopt::fused_dpo_loss: backward is not a FusedBackward value");
  PREFOPT_EXPECT_THROWS_WITH(
      MetricAccumulator(MetricsOptions().window(static_cast<MetricWindow>(9))),
      "prefopt::MetricAccumulator: window is not a MetricWindow value (got 9)");
  PREFOPT_EXPECT_THROWS_WITH(
      MetricAccumulator(MetricsOptions().logits(static_cast<LogitsMetric>(9))),
      "prefopt::MetricAccumulator: logits is not a LogitsMetric value (got 9)");
  // The losses' own enums (checked before this issue; kept here with the rest).
  const auto in = PairInputs(given).policy_chosen_logps(rc).policy_rejected_logps(rr);
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().loss_type(static_cast<DPOLossType>(99))),
      "prefopt::dpo_loss: loss_type holds a value that is not a DPOLossType (99)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().f_divergence_type(static_cast<FDivergence>(99))),
      "prefopt::dpo_loss: f_divergence_type is not an FDivergence value (got 99)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::cpo_loss(in, CPOLossOptions().loss_type(static_cast<CPOLossType>(99))),
      "prefopt::cpo_loss: loss_type is not a CPOLossType value (got 99)");
}
