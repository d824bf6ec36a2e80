// SPDX-License-Identifier: Apache-2.0
// prefopt/losses/kto.h against the fp64 reference, torchtune's literals, empty sides and KL.
#include <prefopt/losses/kto.h>

#include <cmath>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
using prefopt::KTOInputs;
using prefopt::KTOLossOptions;
using prefopt_test::AllClose;

struct KTOLossTest : prefopt_test::SeededTest {};

TEST_F(KTOLossTest, MatchesReference) {
  const auto o = at::TensorOptions().dtype(at::kDouble);
  const auto pd = (-20 + 5 * at::randn({5}, o)).requires_grad_();
  const auto pu = (-25 + 5 * at::randn({3}, o)).requires_grad_();
  const auto rd = pd.detach() + at::randn({5}, o), ru = pu.detach() + at::randn({3}, o);
  const auto pkl = -20 + 3 * at::randn({8}, o), rkl = pkl - 0.5 + at::randn({8}, o);
  const auto in = KTOInputs()
                      .policy_chosen_logps(pd)
                      .policy_rejected_logps(pu)
                      .reference_chosen_logps(rd)
                      .reference_rejected_logps(ru)
                      .policy_KL_logps(pkl)
                      .reference_KL_logps(rkl);
  const auto r = F::kto_loss(in, KTOLossOptions().desirable_weight(1.33).undesirable_weight(0.7));
  const double z = std::max(0.0, (pkl - rkl).mean().item<double>());
  EXPECT_NEAR(r.kl.item<double>(), z, 1e-14);
  const auto ref = prefopt_ref::kto_losses(0.1, 1.33, 0.7, z, pd, rd, pu, ru);
  EXPECT_TRUE(AllClose(r.losses, ref, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.loss, ref.mean(), 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.chosen_rewards, 0.1 * (pd - rd), 1e-14, 0));
  EXPECT_TRUE(AllClose(r.rejected_rewards, 0.1 * (pu - ru), 1e-14, 0));
  const auto g = torch::autograd::grad({r.loss}, {pd, pu});
  const auto gr = torch::autograd::grad({ref.mean()}, {pd, pu});
  EXPECT_TRUE(AllClose(g[0], gr[0], 1e-10, 1e-14));
  EXPECT_TRUE(AllClose(g[1], gr[1], 1e-10, 1e-14));
  // apo_zero_unpaired: no KL.
  const auto apo =
      F::kto_loss(in, KTOLossOptions().loss_type(prefopt::KTOLossType::kAPOZeroUnpaired));
  EXPECT_TRUE(AllClose(apo.losses, prefopt_ref::kto_losses(0.1, 1, 1, 0, pd, rd, pu, ru, true),
                       1e-12, 1e-14));
  // A KL reduced elsewhere (e.g. across ranks) replaces the local estimate, clamped at 0.
  const auto given = F::kto_loss(KTOInputs(in).kl(at::tensor(-3.0, at::kDouble)));
  EXPECT_EQ(given.kl.item<double>(), 0.0);
  const auto given2 = F::kto_loss(KTOInputs(in).kl(at::tensor(0.4, at::kDouble)));
  EXPECT_TRUE(AllClose(given2.losses, prefopt_ref::kto_losses(0.1, 1, 1, 0.4, pd, rd, pu, ru),
                       1e-12, 1e-14));
}

// torchtune's KTOLoss(beta=0.1) expectation (KL clamps to 0 on its inputs).
TEST_F(KTOLossTest, TorchtuneLiteral) {
  const auto r = F::kto_loss(KTOInputs()
                                 .policy_chosen_logps(at::tensor({-0.5, -10.0, -1.0}))
                                 .policy_rejected_logps(at::tensor({-0.1, -30.0, -21.0}))
                                 .reference_chosen_logps(at::tensor({-0.5, -10.1, -0.1}))
                                 .reference_rejected_logps(at::tensor({-0.1, -20.1, -0.1}))
                                 .policy_KL_logps(at::tensor({-1.0, 0.25, 1.0}))
                                 .reference_KL_logps(at::tensor({0.4, 0.2, -0.2})));
  EXPECT_TRUE(
      AllClose(r.losses, at::tensor({0.5000, 0.4975, 0.5225, 0.5000, 0.2709, 0.1101}), 1e-5, 1e-4));
  EXPECT_TRUE(AllClose(r.chosen_rewards, at::tensor({0.0, 0.01, -0.09}), 1e-5, 1e-6));
  EXPECT_TRUE(AllClose(r.rejected_rewards, at::tensor({0.0, -0.99, -2.09}), 1e-5, 1e-6));
}

TEST_F(KTOLossTest, EmptySides) {
  const auto e = at::zeros({0}, at::kDouble);
  const auto x = at::tensor({-3.0, -4.0}, at::kDouble).requires_grad_();
  const auto rx = at::tensor({-3.5, -3.0}, at::kDouble);
  const auto only_desirable = F::kto_loss(KTOInputs()
                                              .policy_chosen_logps(x)
                                              .policy_rejected_logps(e)
                                              .reference_chosen_logps(rx)
                                              .reference_rejected_logps(e));
  EXPECT_EQ(only_desirable.losses.numel(), 2);
  EXPECT_EQ(only_desirable.rejected_rewards.numel(), 0);
  EXPECT_TRUE(AllClose(only_desirable.loss,
                       prefopt_ref::kto_losses(0.1, 1, 1, 0, x, rx, e, e).mean(), 1e-14, 0));
  const auto only_undesirable = F::kto_loss(KTOInputs()
                                                .policy_chosen_logps(e)
                                                .policy_rejected_logps(x)
                                                .reference_chosen_logps(e)
                                                .reference_rejected_logps(rx));
  EXPECT_TRUE(at::isfinite(only_undesirable.loss).item<bool>());
  const auto nothing = F::kto_loss(KTOInputs()
                                       .policy_chosen_logps(e)
                                       .policy_rejected_logps(e)
                                       .reference_chosen_logps(e)
                                       .reference_rejected_logps(e)
                                       .policy_KL_logps(e)
                                       .reference_KL_logps(e));
  EXPECT_EQ(nothing.loss.item<double>(), 0.0);  // TRL's nanmean would give NaN
  EXPECT_EQ(nothing.kl.item<double>(), 0.0);
}

TEST_F(KTOLossTest, Errors) {
  const auto x = at::zeros({2}, at::kDouble);
  const auto in = KTOInputs()
                      .policy_chosen_logps(x)
                      .policy_rejected_logps(x)
                      .reference_chosen_logps(x)
                      .reference_rejected_logps(x);
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(in, KTOLossOptions().beta(-0.1)),
                             "prefopt::kto_loss: expected beta > 0, got -0.1");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(in, KTOLossOptions().desirable_weight(-1)),
                             "prefopt::kto_loss: expected desirable_weight >= 0, got -1");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(in, KTOLossOptions().undesirable_weight(NAN)),
                             "expected undesirable_weight >= 0");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).reference_chosen_logps(at::zeros({3}))),
                             "prefopt::kto_loss: expected reference_chosen_logps of shape [2]");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).policy_chosen_logps(at::Tensor())),
                             "expected policy_chosen_logps (the desirable examples");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).policy_KL_logps(x)),
                             "prefopt::kto_loss: expected both policy_KL_logps and "
                             "reference_KL_logps for the KL estimate, got only policy_KL_logps");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).kl(x)), "expected kl to be a scalar");
  // #20 item 16: a complex or integer kl was cast silently (dropping the imaginary part); a
  // NaN kl turned every loss into NaN.
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).kl(at::ones({}, at::kComplexDouble))),
                             "prefopt::kto_loss: expected kl to be floating point, got "
                             "ComplexDouble");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).kl(at::ones({}, at::kLong))),
                             "prefopt::kto_loss: expected kl to be floating point, got Long");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).kl(at::full({}, NAN, at::kDouble))),
                             "prefopt::kto_loss: expected a finite kl, got nan");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::kto_loss_type_from_name("kto_pair"),
                             "unknown KTO loss type 'kto_pair'");
  // Integer (or complex) KL log-probs were cast silently, like the kl above.
  PREFOPT_EXPECT_THROWS_WITH(
      F::kto_loss(
          KTOInputs(in).policy_KL_logps(at::tensor({-3, -4}, at::kLong)).reference_KL_logps(x)),
      "prefopt::kto_kl: expected policy_KL_logps to be floating point (fp64/fp32/bf16/fp16), "
      "got Long");
  PREFOPT_EXPECT_THROWS_WITH(
      F::kto_kl(x, at::ones({2}, at::kComplexDouble)),
      "prefopt::kto_kl: expected reference_KL_logps to be floating point (fp64/fp32/bf16/fp16), "
      "got ComplexDouble");
}

// Issue #16, bug 1: a reference computed with autograd on gets no gradient and its graph is
// not kept alive through the loss. Also: the rejected and reference tensors' dtype is checked.
TEST_F(KTOLossTest, ReferenceGetsNoGradientAndDtypesAreChecked) {
  const auto leaf = at::tensor({-4.0, -6.0, -5.0}, at::kDouble).requires_grad_();
  const auto ref = leaf * 1.0;  // a graph hangs off it
  const auto pd = at::tensor({-3.0, -7.0}, at::kDouble).requires_grad_();
  const auto pu = at::tensor({-2.0}, at::kDouble).requires_grad_();
  const auto in = KTOInputs()
                      .policy_chosen_logps(pd)
                      .policy_rejected_logps(pu)
                      .reference_chosen_logps(ref.narrow(0, 0, 2))
                      .reference_rejected_logps(ref.narrow(0, 2, 1));
  const auto r = F::kto_loss(in);
  const auto g = torch::autograd::grad({r.loss}, {pd, pu, leaf}, {}, false, false, true);
  EXPECT_TRUE(g[0].defined() && g[1].defined());
  EXPECT_FALSE(g[2].defined());
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).policy_rejected_logps(at::tensor({1}))),
                             "prefopt::kto_loss: expected policy_rejected_logps to be floating");
  PREFOPT_EXPECT_THROWS_WITH(F::kto_loss(KTOInputs(in).reference_chosen_logps(at::tensor({1, 2}))),
                             "prefopt::kto_loss: expected reference_chosen_logps to be floating");
}

// The kto type without kl or KL log-probs uses z = 0 (legal), but warns: TRL always estimates
// the KL, so a missing input is most likely forgotten.
TEST_F(KTOLossTest, KtoWithoutAnyKlInputWarns) {
  const auto d = at::tensor({-3.0}, at::kDouble), u = at::tensor({-2.0}, at::kDouble);
  const auto in = KTOInputs()
                      .policy_chosen_logps(d)
                      .policy_rejected_logps(u)
                      .reference_chosen_logps(d - 1)
                      .reference_rejected_logps(u + 1);
  prefopt::detail::WarningCapture warnings;
  const auto r = F::kto_loss(in);
  EXPECT_TRUE(
      warnings.contains("prefopt::kto_loss: the kto loss got neither kl nor KL "
                        "log-probs; it uses z = 0"));
  EXPECT_EQ(r.kl.item<double>(), 0.0);
  const double s = 1 / (1 + std::exp(-0.1));  // z = 0: both terms 1 − σ(β·1), β = 0.1
  EXPECT_NEAR(r.loss.item<double>(), 1 - s, 1e-15);
}

// apo_zero_unpaired has no KL term: a KL given to it is ignored with a warning, and kl is 0.
TEST_F(KTOLossTest, ApoZeroUnpairedWarnsAboutAnUnusedKl) {
  const auto d = at::tensor({-3.0}, at::kDouble), u = at::tensor({-2.0}, at::kDouble);
  const auto in = KTOInputs()
                      .policy_chosen_logps(d)
                      .policy_rejected_logps(u)
                      .reference_chosen_logps(d - 1)
                      .reference_rejected_logps(u + 1)
                      .kl(at::scalar_tensor(0.7, at::kDouble));
  prefopt::detail::WarningCapture warnings;
  const auto r =
      F::kto_loss(in, KTOLossOptions().loss_type(prefopt::KTOLossType::kAPOZeroUnpaired));
  EXPECT_EQ(r.kl.item<double>(), 0.0);
  EXPECT_TRUE(warnings.contains("apo_zero_unpaired uses no KL estimate"));
  // (1 − σ(β·1) + σ(β·(−1))) / 2 with β = 0.1: the KL of 0.7 plays no part.
  const double s = 1 / (1 + std::exp(-0.1));
  EXPECT_NEAR(r.loss.item<double>(), ((1 - s) + (1 - s)) / 2, 1e-15);
}
