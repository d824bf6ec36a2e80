// SPDX-License-Identifier: Apache-2.0
// Log-prob gathering against the fp64 naive reference (tests/reference/logprobs_reference.h).
#include <c10/core/GradMode.h>
#include <prefopt/detail/cpu_row_kernels.h>
#include <prefopt/logprobs.h>

#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "reference/logprobs_reference.h"
#include "support.h"

namespace {

namespace F = prefopt::functional;
using prefopt::GatherBackend;
using prefopt::GatherLogprobsOptions;
using prefopt_test::AllClose;
using prefopt_test::make_labels;
using prefopt_test::SeededTest;

constexpr int64_t kIgnore = -100;

/// Per-dtype tolerances against the fp64 reference evaluated on the same (rounded) logits: the
/// only error left is the accumulation dtype (fp32 for every non-fp64 input).
struct Tol {
  double rtol, atol;
};
Tol value_tol(at::ScalarType st) {
  switch (st) {
    case at::kDouble:
      return {1e-12, 1e-10};
    case at::kFloat:
      return {2e-5, 2e-4};
    default:
      return {5e-5, 5e-4};  // bf16/fp16: fp32 accumulation of exactly converted values
  }
}
Tol grad_tol(at::ScalarType st) {
  switch (st) {
    case at::kDouble:
      return {1e-12, 1e-12};
    case at::kFloat:
      return {1e-5, 1e-6};
    case at::kBFloat16:
      return {1e-2, 1e-4};  // the gradient is stored in bf16: 8 mantissa bits
    default:
      return {2e-3, 1e-5};  // fp16: 11 mantissa bits
  }
}

const char* backend_name(GatherBackend b) { return b == GatherBackend::kATen ? "aten" : "kernel"; }

struct Case {
  int64_t B, T, V;
};

class GatherGrid : public SeededTest, public ::testing::WithParamInterface<Case> {};

// Values, counts, statistics and gradients (through the log-probs and the entropies) for every
// dtype and both backends.
TEST_P(GatherGrid, MatchesFp64Reference) {
  const auto [B, T, V] = GetParam();
  const auto labels = make_labels(B, T, V);
  const auto base = at::randn({B, T, V}, at::kDouble) * 3;
  // Upstream gradients for sum, mean and the per-token values.
  const int64_t Tp = std::max<int64_t>(T - 1, 0);
  const auto g_sum = at::randn({B}, at::kDouble), g_mean = at::randn({B}, at::kDouble);
  const auto g_tok = at::randn({B, Tp}, at::kDouble), g_ent = at::randn({B}, at::kDouble);

  for (auto st : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    const auto logits_st = base.to(st);
    // The reference sees exactly the rounded values the op sees.
    const auto ref_in = logits_st.to(at::kDouble).requires_grad_();
    const auto ref = prefopt_ref::gather(ref_in, labels, labels != kIgnore);
    const auto ref_loss = (ref.sum * g_sum).sum() + (ref.mean * g_mean).sum() +
                          (ref.token_logps * g_tok).sum() + (ref.entropy_sum * g_ent).sum();
    const auto ref_grad = torch::autograd::grad({ref_loss}, {ref_in})[0];

    for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
      SCOPED_TRACE(::testing::Message() << "dtype " << st << ", backend " << backend_name(backend));
      const auto logits = logits_st.clone().requires_grad_();
      const auto opts = GatherLogprobsOptions()
                            .backend(backend)
                            .with_token_logps(true)
                            .with_logits_mean(true)
                            .with_logits_mean_unmasked(true)
                            .with_token_accuracy(true)
                            .with_entropy(true)
                            .with_wpo_weights(true);
      const auto lp = F::gather_logprobs(logits, labels, opts);
      const auto [rt, tol] = value_tol(st);
      const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
      EXPECT_EQ(lp.sum.scalar_type(), acc);
      EXPECT_TRUE(AllClose(lp.sum, ref.sum, rt, tol * std::max<int64_t>(T, 1)));
      EXPECT_TRUE(AllClose(lp.mean, ref.mean, rt, tol));
      EXPECT_TRUE(at::equal(lp.count, ref.count));
      EXPECT_TRUE(AllClose(lp.token_logps, ref.token_logps, rt, tol));
      EXPECT_TRUE(at::equal(lp.token_mask, ref.mask));
      EXPECT_TRUE(AllClose(lp.logits_sum, ref.logits_sum, rt, tol * std::max<int64_t>(T, 1)));
      EXPECT_TRUE(
          AllClose(lp.logits_sum_all, ref.logits_sum_all, rt, tol * std::max<int64_t>(T, 1)));
      EXPECT_TRUE(at::equal(lp.positions, at::full({B}, T, at::kLong)));
      EXPECT_TRUE(at::equal(lp.correct, ref.correct));
      EXPECT_TRUE(AllClose(lp.entropy_sum, ref.entropy_sum, rt, tol * std::max<int64_t>(T, 1)));
      EXPECT_TRUE(AllClose(lp.wpo_weights, ref.wpo_weights, 1e2 * rt, tol));

      const auto loss = (lp.sum.to(at::kDouble) * g_sum).sum() +
                        (lp.mean.to(at::kDouble) * g_mean).sum() +
                        (lp.token_logps.to(at::kDouble) * g_tok).sum() +
                        (lp.entropy_sum.to(at::kDouble) * g_ent).sum();
      const auto grad = torch::autograd::grad({loss}, {logits})[0];
      EXPECT_EQ(grad.scalar_type(), st);
      const auto [grt, gat] = grad_tol(st);
      EXPECT_TRUE(AllClose(grad, ref_grad, grt, gat));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(OddSizes, GatherGrid, ::testing::ValuesIn([] {
                           std::vector<Case> cases;
                           for (int64_t B : {1, 3, 17})
                             for (int64_t T : {1, 2, 33})
                               for (int64_t V : {1, 7, 1000, 50257}) cases.push_back({B, T, V});
                           return cases;
                         }()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "B" + std::to_string(info.param.B) + "_T" +
                                  std::to_string(info.param.T) + "_V" +
                                  std::to_string(info.param.V);
                         });

using Gather = SeededTest;

// The CPU row kernels' instruction set, printed for the ctest variants that force a lower one
// (logprobs.generic_isa: PREFOPT_CPU_ISA=generic runs the portable kernels on any machine).
TEST(RowKernels, InstructionSet) {
  const std::string isa = prefopt::detail::cpu::row_kernel_isa();
  std::cout << "row kernels: " << isa << std::endl;
  EXPECT_TRUE(isa == "generic" || isa == "avx2" || isa == "avx512") << isa;
  const char* want = std::getenv("PREFOPT_CPU_ISA");
  if (want != nullptr && std::string(want) == "generic") {
    EXPECT_EQ(isa, "generic");
  }
}

/// The op on `logits` (any strides) must equal the op on a contiguous copy, values and grads.
void expect_same_as_contiguous(const at::Tensor& view, const at::Tensor& labels) {
  for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
    SCOPED_TRACE(backend_name(backend));
    const auto opts =
        GatherLogprobsOptions().backend(backend).with_entropy(true).with_logits_mean_unmasked(true);
    const auto a = view.detach().requires_grad_();
    const auto b = view.detach().contiguous().requires_grad_();
    const auto la = F::gather_logprobs(a, labels, opts);
    const auto lb = F::gather_logprobs(b, labels, opts);
    EXPECT_TRUE(AllClose(la.sum, lb.sum, 1e-6, 1e-5));
    EXPECT_TRUE(AllClose(la.entropy_sum, lb.entropy_sum, 1e-6, 1e-5));
    EXPECT_TRUE(AllClose(la.logits_sum_all, lb.logits_sum_all, 1e-6, 1e-5));
    const auto w = at::randn({labels.size(0)});
    const auto ga = torch::autograd::grad({(la.sum * w).sum()}, {a})[0];
    const auto gb = torch::autograd::grad({(lb.sum * w).sum()}, {b})[0];
    EXPECT_TRUE(AllClose(ga, gb, 1e-6, 1e-7));
    const auto ref = prefopt_ref::gather(view.to(at::kDouble), labels, labels != kIgnore);
    EXPECT_TRUE(AllClose(la.sum, ref.sum, 1e-5, 1e-3));
  }
}

TEST_F(Gather, NonContiguousInputs) {
  const int64_t B = 3, T = 9, V = 1000;
  const auto labels = make_labels(B, T, V);
  // Slices: padded rows and a vocabulary window of a larger buffer.
  expect_same_as_contiguous(
      at::randn({B + 2, T + 3, V + 24}).slice(0, 1, B + 1).slice(1, 2, T + 2).slice(2, 5, V + 5),
      labels);
  // Transposed storage: a [T, B, V] buffer seen as [B, T, V].
  expect_same_as_contiguous(at::randn({T, B, V}).transpose(0, 1), labels);
  // Strided vocabulary: every other element, and vocabulary-major storage.
  expect_same_as_contiguous(at::randn({B, T, 2 * V}).slice(2, 0, 2 * V, 2), labels);
  expect_same_as_contiguous(at::randn({V, B, T}).permute({1, 2, 0}), labels);
  // bf16 slices go through the same kernels.
  expect_same_as_contiguous(at::randn({T, B, V}).to(at::kBFloat16).transpose(0, 1), labels);
}

TEST_F(Gather, AllMaskedRowsGiveZeroNotNaN) {
  const int64_t B = 4, T = 6, V = 50;
  const auto labels = at::full({B, T}, kIgnore, at::kLong);
  const auto logits = at::randn({B, T, V}).requires_grad_();
  const auto lp = F::gather_logprobs(
      logits, labels, GatherLogprobsOptions().with_token_logps(true).with_wpo_weights(true));
  EXPECT_TRUE(at::equal(lp.count, at::zeros({B}, at::kLong)));
  EXPECT_TRUE(at::equal(lp.sum, at::zeros({B})));
  EXPECT_TRUE(at::equal(lp.mean, at::zeros({B})));
  EXPECT_TRUE(at::equal(lp.wpo_weights, at::ones({B})));  // exp(0 / 1)
  EXPECT_EQ(lp.token_mask.sum().item<int64_t>(), 0);
  const auto grad = torch::autograd::grad({lp.mean.sum() + lp.sum.sum()}, {logits}, {}, {}, false,
                                          /*allow_unused=*/true)[0];
  EXPECT_TRUE(!grad.defined() || at::equal(grad, at::zeros_like(logits)));
}

TEST_F(Gather, CustomIgnoreIndex) {
  const int64_t B = 3, T = 8, V = 30;
  const auto labels_m1 = make_labels(B, T, V, /*ignore=*/-1);
  const auto labels_std = labels_m1.masked_fill(labels_m1 == -1, kIgnore);
  const auto logits = at::randn({B, T, V});
  const auto a = F::gather_logprobs(logits, labels_m1, GatherLogprobsOptions().ignore_index(-1));
  const auto b = F::gather_logprobs(logits, labels_std);
  EXPECT_TRUE(at::equal(a.sum, b.sum));
  EXPECT_TRUE(at::equal(a.count, b.count));
  // An ignore_index inside the vocabulary is honoured too (some collators mask with pad_id = 0).
  const auto labels_0 = labels_std.masked_fill(labels_std == kIgnore, 0);
  const auto c = F::gather_logprobs(logits, labels_0, GatherLogprobsOptions().ignore_index(0));
  const auto ref = prefopt_ref::gather(logits, labels_0, labels_0 != 0);
  EXPECT_TRUE(AllClose(c.sum, ref.sum, 1e-5, 1e-4));
  EXPECT_TRUE(at::equal(c.count, ref.count));
}

TEST_F(Gather, CompletionMaskFormEqualsLabelsForm) {
  const int64_t B = 5, T = 12, V = 64;
  const auto labels = make_labels(B, T, V);
  const auto mask = labels != kIgnore;
  // input_ids carry real tokens where the labels form has ignore_index.
  const auto input_ids = at::where(mask, labels, at::randint(V, {B, T}, at::kLong));
  const auto logits = at::randn({B, T, V});
  const auto opts = GatherLogprobsOptions().with_token_logps(true).with_token_accuracy(true);
  const auto a = F::gather_logprobs(logits, labels, opts);
  for (const auto& m : {mask, mask.to(at::kLong), mask.to(at::kInt)}) {
    const auto b = F::gather_logprobs(logits, input_ids, m, opts);
    EXPECT_TRUE(at::equal(a.sum, b.sum));
    EXPECT_TRUE(at::equal(a.count, b.count));
    EXPECT_TRUE(at::equal(a.token_logps, b.token_logps));
    EXPECT_TRUE(at::equal(a.correct, b.correct));
  }
  // The functor gives the same as the functional form.
  const prefopt::GatherLogprobs gather(opts);
  EXPECT_TRUE(at::equal(gather(logits, labels).sum, a.sum));
  EXPECT_TRUE(at::equal(gather(logits, input_ids, mask).sum, a.sum));
}

TEST_F(Gather, Int32LabelsAndNoShift) {
  const int64_t B = 2, T = 7, V = 40;
  const auto labels = make_labels(B, T, V);
  const auto logits = at::randn({B, T, V}, at::kDouble);
  EXPECT_TRUE(at::equal(F::gather_logprobs(logits, labels.to(at::kInt)).sum,
                        F::gather_logprobs(logits, labels).sum));
  const auto lp = F::gather_logprobs(logits, labels,
                                     GatherLogprobsOptions().shift(false).with_token_logps(true));
  const auto ref = prefopt_ref::gather(logits, labels, labels != kIgnore, /*shift=*/false);
  EXPECT_TRUE(AllClose(lp.sum, ref.sum, 1e-12, 1e-12));
  EXPECT_EQ(lp.token_logps.sizes(), (at::IntArrayRef{B, T}));
}

TEST_F(Gather, ExtremeLogits) {
  const int64_t B = 2, T = 5, V = 300;
  auto logits = at::randn({B, T, V}) * 1e4;  // fp32 overflow in any naive exp
  logits.index_put_({at::rand({B, T, V}) < 0.2}, -std::numeric_limits<float>::infinity());
  const auto labels = make_labels(B, T, V);
  // Scored targets get a finite logit (a −inf target gives log p = −inf, correctly, in both).
  const auto targets = labels.slice(1, 1).clamp_min(0).unsqueeze(2);
  logits.slice(1, 0, T - 1).scatter_(2, targets, at::randn(targets.sizes()) * 1e4);
  for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
    SCOPED_TRACE(backend_name(backend));
    const auto x = logits.clone().requires_grad_();
    const auto lp =
        F::gather_logprobs(x, labels, GatherLogprobsOptions().backend(backend).with_entropy(true));
    const auto ref = prefopt_ref::gather(logits, labels, labels != kIgnore);
    EXPECT_TRUE(AllClose(lp.sum, ref.sum, 1e-6, 1e-2));
    EXPECT_TRUE(AllClose(lp.entropy_sum, ref.entropy_sum, 1e-5, 1e-3));
    const auto g = torch::autograd::grad({lp.sum.sum() + lp.entropy_sum.sum()}, {x})[0];
    EXPECT_TRUE(at::isfinite(g).all().item<bool>());
  }
}

// Logits far from 0 (an offset of 3e4, as an unnormalised head may give): log p was z_y − lse
// with lse rounded to the accumulation dtype, ulp(3e4)/2 ≈ 1e-3 off per token in fp32; as
// (z_y − max) − log S it keeps the precision of log p itself.
TEST_F(Gather, LargeLogitOffsetsKeepLogProbPrecision) {
  const int64_t B = 3, T = 9, V = 500;
  const auto labels = make_labels(B, T, V);
  for (const double offset : {3e4, -3e4}) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      const auto logits = (at::randn({B, T, V}) * 3 + offset).to(dtype);
      const auto ref = prefopt_ref::gather(logits.to(at::kDouble), labels, labels != kIgnore);
      for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
        SCOPED_TRACE(std::string(backend_name(backend)) + " " + c10::toString(dtype) + " " +
                     std::to_string(offset));
        const auto lp =
            F::gather_logprobs(logits, labels, GatherLogprobsOptions().backend(backend));
        // ≤ 8 tokens of |log p| ≲ 20 each: fp32 rounding of ~1e-5 per sequence, not 1e-2.
        const double err = (lp.sum.to(at::kDouble) - ref.sum).abs().max().item<double>();
        EXPECT_LT(err, 1e-4);
      }
    }
  }
}

// A NaN (or +inf) logit makes its row's log-prob and every gradient entry NaN, in both
// backends and in fp32 and fp64, as log_softmax's backward does; the other rows stay exact.
TEST_F(Gather, NanRowsGiveNanGradients) {
  const int64_t B = 2, T = 4, V = 37;
  auto labels = make_labels(B, T, V);
  labels.slice(1, 1).fill_(3);  // every row scored
  auto base = at::randn({B, T, V}, at::kDouble);
  base[0][1][5] = std::numeric_limits<double>::quiet_NaN();
  base[1][2][7] = std::numeric_limits<double>::infinity();
  for (auto st : {at::kDouble, at::kFloat})
    for (bool entropy : {false, true})
      for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
        SCOPED_TRACE(::testing::Message()
                     << st << " " << backend_name(backend) << " entropy " << entropy);
        const auto x = base.to(st).requires_grad_();
        const auto lp = F::gather_logprobs(
            x, labels, GatherLogprobsOptions().backend(backend).with_entropy(entropy));
        const auto loss = entropy ? lp.sum.sum() + lp.entropy_sum.sum() : lp.sum.sum();
        const auto grad = torch::autograd::grad({loss}, {x})[0];
        EXPECT_TRUE(at::isnan(grad[0][1]).all().item<bool>());
        EXPECT_TRUE(at::isnan(grad[1][2]).all().item<bool>());
        EXPECT_TRUE(at::isfinite(grad[0][0]).all().item<bool>());
        EXPECT_TRUE(at::isfinite(grad[1][1]).all().item<bool>());
      }
}

// Token accuracy on degenerate rows is the same on every backend and dtype: a tie counts the
// first maximum (torch.argmax), a row with a NaN or an all −inf row never counts.
TEST_F(Gather, TokenAccuracyOnDegenerateRows) {
  const double inf = std::numeric_limits<double>::infinity();
  auto x = at::zeros({1, 4, 5}, at::kDouble);  // row t scores labels[t + 1]
  x[0][0].fill_(-inf);                         // all −inf, label 0: torch.argmax says 0
  x[0][1][2] = std::numeric_limits<double>::quiet_NaN();  // NaN at 2, label 0
  x[0][1][0] = 1.0;
  x[0][2][1] = x[0][2][2] = 3.0;  // tie at 1 and 2, label 1: the first wins
  const auto labels = at::tensor({-100, 0, 0, 1}, at::kLong).unsqueeze(0);
  for (auto st : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf})
    for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
      SCOPED_TRACE(::testing::Message() << st << " " << backend_name(backend));
      const auto lp = F::gather_logprobs(
          x.to(st), labels, GatherLogprobsOptions().backend(backend).with_token_accuracy(true));
      EXPECT_EQ(lp.count.item<int64_t>(), 3);
      EXPECT_EQ(lp.correct.item<int64_t>(), 1);
    }
}

// A loss of the entropies alone (no log-prob gradient reaches the op), with −inf logits: the
// gradient −p_v·(log p_v + H) per row, 0 where p_v = 0, against the fp64 composite's.
TEST_F(Gather, EntropyAloneCarriesItsGradient) {
  const int64_t B = 3, T = 9, V = 77;
  const auto labels = make_labels(B, T, V);
  auto base = at::randn({B, T, V}, at::kDouble) * 2;
  base.index_put_({at::rand({B, T, V}) < 0.1}, -std::numeric_limits<double>::infinity());
  base.select(2, 0).fill_(0);  // every row keeps finite logits (and a finite entropy)
  const auto targets = labels.slice(1, 1).clamp_min(0).unsqueeze(2);
  base.slice(1, 0, T - 1).scatter_(2, targets, at::randn(targets.sizes(), at::kDouble));
  const auto w = at::randn({B}, at::kDouble);
  for (auto st : {at::kDouble, at::kFloat}) {
    const auto ref_in = base.to(st).to(at::kDouble).requires_grad_();
    const auto ref = prefopt_ref::gather(ref_in, labels, labels != kIgnore);
    const auto ref_grad = torch::autograd::grad({(ref.entropy_sum * w).sum()}, {ref_in})[0];
    ASSERT_TRUE(at::isfinite(ref_grad).all().item<bool>());
    for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
      SCOPED_TRACE(::testing::Message() << st << " " << backend_name(backend));
      const auto x = base.to(st).requires_grad_();
      const auto lp = F::gather_logprobs(
          x, labels, GatherLogprobsOptions().backend(backend).with_entropy(true));
      EXPECT_TRUE(lp.entropy_sum.requires_grad());
      const auto grad = torch::autograd::grad({(lp.entropy_sum.to(at::kDouble) * w).sum()}, {x})[0];
      const auto [grt, gat] = grad_tol(st);
      EXPECT_TRUE(AllClose(grad, ref_grad, grt, gat));
      // Unscored rows (the last position, ignored labels) get exact zeros.
      EXPECT_EQ(grad.select(1, T - 1).abs().max().item<double>(), 0.0);
      const auto ignored = (labels.slice(1, 1) == kIgnore).unsqueeze(2);
      ASSERT_GT(ignored.sum().item<int64_t>(), 0);
      EXPECT_EQ(grad.slice(1, 0, T - 1).masked_select(ignored).abs().max().item<double>(), 0.0);
    }
  }
}

TEST_F(Gather, MaskedVocabularyEntriesInTheLogitsMean) {
  // V = 23: whole blocks and a tail at every kernel width (16, 8 and 4 lanes: tails of 7, 7
  // and 3). Row 0 has a −inf in the first block, row 1 in the tail (entry 21), row 2 none: the
  // vocabulary mean is −inf, −inf, finite, on both backends.
  auto logits = at::randn({1, 4, 23});
  logits[0][0][3] = -std::numeric_limits<float>::infinity();
  logits[0][1][21] = -std::numeric_limits<float>::infinity();
  const auto labels = at::tensor({0, 1, 2, 5}, at::kLong).view({1, 4});
  for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
    SCOPED_TRACE(backend_name(backend));
    const auto opts = GatherLogprobsOptions().backend(backend).with_token_logps(true);
    for (int64_t t = 0; t < 3; ++t) {
      // One scored position at a time, so logits_sum is that row's vocabulary mean.
      auto one = at::full_like(labels, kIgnore);
      one[0][t + 1] = labels[0][t + 1];
      const auto lp =
          F::gather_logprobs(logits, one, GatherLogprobsOptions(opts).with_logits_mean(true));
      const float mean = logits[0][t].mean().item<float>();
      if (t < 2) {
        EXPECT_TRUE(std::isinf(lp.logits_sum[0].item<float>()) &&
                    lp.logits_sum[0].item<float>() < 0)
            << t;
      } else {
        EXPECT_NEAR(lp.logits_sum[0].item<float>(), mean, 1e-5);
      }
    }
  }
}

TEST_F(Gather, ChunkBoundariesOfTheATenPath) {
  const int64_t B = 3, T = 11, V = 257;
  const auto labels = make_labels(B, T, V);
  const auto logits = at::randn({B, T, V}, at::kDouble);
  const auto ref = prefopt_ref::gather(logits, labels, labels != kIgnore);
  // One row per chunk, a few rows, and everything at once.
  for (int64_t bytes : {int64_t{1}, int64_t{V * 24 * 5}, int64_t{1} << 30}) {
    const auto lp = F::gather_logprobs(logits, labels,
                                       GatherLogprobsOptions()
                                           .backend(GatherBackend::kATen)
                                           .chunk_bytes(bytes)
                                           .with_logits_mean_unmasked(true));
    EXPECT_TRUE(AllClose(lp.sum, ref.sum, 1e-12, 1e-12)) << bytes;
    EXPECT_TRUE(AllClose(lp.logits_sum_all, ref.logits_sum_all, 1e-12, 1e-12)) << bytes;
  }
}

TEST_F(Gather, NoGraphWithoutGrad) {
  const auto logits = at::randn({2, 4, 10}).requires_grad_();
  const auto labels = make_labels(2, 4, 10);
  {
    c10::NoGradGuard guard;
    const auto lp = F::gather_logprobs(logits, labels);
    EXPECT_FALSE(lp.sum.requires_grad());
    EXPECT_FALSE(lp.sum.grad_fn());
  }
  const auto frozen = F::gather_logprobs(logits.detach(), labels);
  EXPECT_FALSE(frozen.sum.requires_grad());
  const auto live = F::gather_logprobs(
      logits, labels, GatherLogprobsOptions().with_entropy(true).with_logits_mean(true));
  EXPECT_TRUE(live.sum.requires_grad());
  EXPECT_TRUE(live.entropy_sum.requires_grad());  // the entropy is differentiable too
  EXPECT_FALSE(live.logits_sum.requires_grad());
  EXPECT_FALSE(live.count.requires_grad());
}

// ---- packed (padding-free) batches ----

struct Packed {
  at::Tensor logits, labels, mask, cu_seqlens;
};

/// Packs the first lengths[s] positions of each padded row back to back.
Packed pack(const at::Tensor& logits, const at::Tensor& labels,
            const std::vector<int64_t>& lengths) {
  std::vector<at::Tensor> z, y;
  std::vector<int64_t> cu{0};
  for (size_t s = 0; s < lengths.size(); ++s) {
    z.push_back(logits[s].slice(0, 0, lengths[s]));
    y.push_back(labels[s].slice(0, 0, lengths[s]));
    cu.push_back(cu.back() + lengths[s]);
  }
  Packed p;
  p.logits = at::cat(z);
  p.labels = at::cat(y);
  p.mask = p.labels != kIgnore;
  p.cu_seqlens = at::tensor(cu, at::kLong);
  return p;
}

// Double backward (create_graph): the row kernels write the gradient outside autograd, so it
// is refused by name; kKernel gave a gradient without a graph (a silently missing second
// derivative) and kATen an unnamed in-place error. A plain backward still works after it.
TEST_F(Gather, DoubleBackwardIsRefused) {
  const auto logits = at::randn({2, 5, 9}, at::kDouble).requires_grad_();
  const auto labels = make_labels(2, 5, 9);
  for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
    const auto o = GatherLogprobsOptions().backend(backend);
    const auto lp = F::gather_logprobs(logits, labels, o);
    PREFOPT_EXPECT_THROWS_WITH(
        torch::autograd::grad({lp.sum.sum()}, {logits}, {}, /*retain_graph=*/true,
                              /*create_graph=*/true),
        "prefopt::gather_logprobs: double backward (create_graph) is not supported");
    const auto p = pack(logits, labels, {5, 3});
    const auto packed = F::gather_packed_logprobs(p.logits, p.labels, p.cu_seqlens, o);
    PREFOPT_EXPECT_THROWS_WITH(
        torch::autograd::grad({packed.sum.sum()}, {logits}, {}, /*retain_graph=*/true,
                              /*create_graph=*/true),
        "prefopt::gather_packed_logprobs: double backward (create_graph) is not supported");
    const auto g = torch::autograd::grad({lp.sum.sum()}, {logits})[0];
    const auto z = logits.detach().clone().requires_grad_();
    const auto ref = prefopt_ref::gather(z, labels, labels != kIgnore);
    const auto want = torch::autograd::grad({ref.sum.sum()}, {z})[0];
    EXPECT_TRUE(AllClose(g, want, 1e-12, 1e-12)) << backend_name(backend);
  }
}

TEST_F(Gather, PackedEqualsPadded) {
  const std::vector<int64_t> lengths{7, 1, 12, 0, 5};  // includes a 1-token and an empty sequence
  const int64_t B = lengths.size(), T = 12, V = 97;
  auto labels = make_labels(B, T, V);
  for (int64_t s = 0; s < B; ++s) labels[s].slice(0, lengths[s]).fill_(kIgnore);  // right padding
  for (auto st : {at::kDouble, at::kBFloat16}) {
    for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
      SCOPED_TRACE(::testing::Message() << st << " " << backend_name(backend));
      const auto padded_logits = at::randn({B, T, V}, at::kDouble).to(st).requires_grad_();
      const auto opts = GatherLogprobsOptions()
                            .backend(backend)
                            .with_token_logps(true)
                            .with_logits_mean(true)
                            .with_token_accuracy(true)
                            .with_entropy(true)
                            .with_wpo_weights(true);
      const auto padded = F::gather_logprobs(padded_logits, labels, opts);
      const auto p = pack(padded_logits.detach(), labels, lengths);
      const auto packed_logits = p.logits.clone().requires_grad_();
      for (const auto& packed :
           {F::gather_packed_logprobs(packed_logits, p.labels, p.cu_seqlens, opts),
            F::gather_packed_logprobs(packed_logits.unsqueeze(0), p.labels.unsqueeze(0),
                                      p.cu_seqlens, opts),
            F::gather_packed_logprobs(packed_logits, p.labels, p.mask, p.cu_seqlens.to(at::kInt),
                                      opts)}) {
        EXPECT_TRUE(AllClose(packed.sum, padded.sum, 1e-6, 1e-6));
        EXPECT_TRUE(at::equal(packed.count, padded.count));
        EXPECT_TRUE(AllClose(packed.mean, padded.mean, 1e-6, 1e-6));
        EXPECT_TRUE(AllClose(packed.logits_sum, padded.logits_sum, 1e-6, 1e-5));
        EXPECT_TRUE(at::equal(packed.correct, padded.correct));
        EXPECT_TRUE(AllClose(packed.entropy_sum, padded.entropy_sum, 1e-6, 1e-5));
        EXPECT_TRUE(AllClose(packed.wpo_weights, padded.wpo_weights, 1e-6, 1e-6));
        EXPECT_EQ(packed.token_logps.sizes(), (at::IntArrayRef{p.logits.size(0)}));
        EXPECT_TRUE(AllClose(packed.token_logps.sum(), padded.token_logps.sum(), 1e-6, 1e-5));
      }
      // Gradients: packed grads are the padded grads at the packed positions.
      const auto w = at::randn({B}, at::kDouble);
      const auto packed = F::gather_packed_logprobs(packed_logits, p.labels, p.cu_seqlens, opts);
      const auto g_packed =
          torch::autograd::grad({(packed.sum.to(at::kDouble) * w).sum()}, {packed_logits})[0];
      const auto g_padded =
          torch::autograd::grad({(padded.sum.to(at::kDouble) * w).sum()}, {padded_logits})[0];
      EXPECT_TRUE(AllClose(g_packed, pack(g_padded, labels, lengths).logits, 1e-9, 1e-9));
    }
  }
}

TEST_F(Gather, PackedShiftNeverCrossesABoundary) {
  // Two sequences of 3 tokens, every label scored: position 2 of sequence 0 must not score
  // the first token of sequence 1.
  const auto logits = at::randn({6, 5}, at::kDouble);
  const auto labels = at::tensor({1, 2, 3, 4, 0, 1}, at::kLong);
  const auto lp = F::gather_packed_logprobs(logits, labels, at::tensor({0, 3, 6}, at::kLong),
                                            GatherLogprobsOptions().with_token_logps(true));
  EXPECT_TRUE(at::equal(lp.count, at::tensor({2, 2}, at::kLong)));
  const auto ls = at::log_softmax(logits, -1);
  const double expect0 = ls[0][2].item<double>() + ls[1][3].item<double>();
  EXPECT_NEAR(lp.sum[0].item<double>(), expect0, 1e-12);
  EXPECT_FALSE(lp.token_mask[2].item<bool>());
  EXPECT_FALSE(lp.token_mask[5].item<bool>());
}

TEST_F(Gather, PackedUnmaskedLogitsMean) {
  const auto logits = at::randn({9, 11}, at::kDouble);
  const auto labels = at::randint(11, {9}, at::kLong);
  const auto lp =
      F::gather_packed_logprobs(logits, labels, at::tensor({0, 4, 9}, at::kLong),
                                GatherLogprobsOptions().with_logits_mean_unmasked(true));
  const auto means = logits.mean(1);
  EXPECT_NEAR(lp.logits_sum_all[0].item<double>(), means.slice(0, 0, 4).sum().item<double>(),
              1e-12);
  EXPECT_NEAR(lp.logits_sum_all[1].item<double>(), means.slice(0, 4).sum().item<double>(), 1e-12);
  EXPECT_TRUE(at::equal(lp.positions, at::tensor({4, 5}, at::kLong)));
}

// ---- pair helpers ----

TEST_F(Gather, SplitPairs) {
  const int64_t B = 3, T = 6, V = 20;
  const auto logits = at::randn({2 * B, T, V});
  const auto labels = make_labels(2 * B, T, V);
  const auto all = F::gather_logprobs(
      logits, labels, GatherLogprobsOptions().with_token_logps(true).with_entropy(true));
  const auto [chosen, rejected] = F::split_pairs(all);
  EXPECT_TRUE(at::equal(chosen.sum, all.sum.slice(0, 0, B)));
  EXPECT_TRUE(at::equal(rejected.sum, all.sum.slice(0, B)));
  EXPECT_TRUE(at::equal(rejected.token_logps, all.token_logps.slice(0, B)));
  EXPECT_TRUE(at::equal(rejected.entropy_sum, all.entropy_sum.slice(0, B)));
  EXPECT_FALSE(chosen.wpo_weights.defined());
}

TEST_F(Gather, LdLogpsCountsPositionsWithinTheCompletion) {
  const int64_t B = 4, T = 10, V = 15;
  auto labels = make_labels(2 * B, T, V);
  labels[1].fill_(kIgnore);  // an empty chosen completion: nothing shared, nothing scaled
  const auto logits = at::randn({2 * B, T, V}, at::kDouble).requires_grad_();
  const auto pair = F::split_pairs(
      F::gather_logprobs(logits, labels, GatherLogprobsOptions().with_token_logps(true)));
  const double alpha = 0.3;
  const auto ld = F::ld_logps(pair, alpha);
  // Independent loop: the k-th scored token (1-based) of each side counts fully when
  // k <= min(n_c, n_r), else by alpha.
  const auto lp = at::log_softmax(logits.detach(), -1);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n_shared =
        std::min(pair.chosen.count[i].item<int64_t>(), pair.rejected.count[i].item<int64_t>());
    for (int side = 0; side < 2; ++side) {
      const int64_t row = i + side * B;
      double expect = 0;
      int64_t k = 0;
      for (int64_t t = 0; t + 1 < T; ++t) {
        const int64_t y = labels[row][t + 1].item<int64_t>();
        if (y == kIgnore) continue;
        ++k;
        expect += (k <= n_shared ? 1.0 : alpha) * lp[row][t][y].item<double>();
      }
      EXPECT_NEAR((side ? ld.rejected : ld.chosen)[i].item<double>(), expect, 1e-10) << i << side;
    }
  }
  EXPECT_TRUE(ld.chosen.requires_grad());
  const auto plain = F::ld_logps(pair, 1.0);
  EXPECT_TRUE(AllClose(plain.chosen, pair.chosen.sum, 1e-12, 1e-12));
}

TEST_F(Gather, WpoPairWeights) {
  const int64_t B = 3, T = 8, V = 12;
  const auto labels = make_labels(2 * B, T, V);
  const auto logits = at::randn({2 * B, T, V}, at::kDouble) * 0.2;  // flat: weights near 1
  const auto pair = F::split_pairs(
      F::gather_logprobs(logits, labels, GatherLogprobsOptions().with_wpo_weights(true)));
  const auto ref = prefopt_ref::gather(logits, labels, labels != kIgnore);
  const auto expect = ref.wpo_weights.slice(0, 0, B) * ref.wpo_weights.slice(0, B);
  EXPECT_TRUE(AllClose(F::wpo_pair_weights(pair), expect, 1e-10, 1e-12));
  EXPECT_TRUE(AllClose(F::wpo_pair_weights(pair, /*clamp_max_one=*/true), expect.clamp_max(1),
                       1e-10, 1e-12));
  EXPECT_GT(F::wpo_pair_weights(pair).max().item<double>(), 1.0);  // so the clamp is exercised
}

// ---- errors ----

TEST_F(Gather, ErrorsNameTheFunctionAndStateExpectedVsActual) {
  const auto logits = at::randn({2, 4, 10});
  const auto labels = at::randint(10, {2, 4}, at::kLong);
  const char* fn = "prefopt::gather_logprobs: ";
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_logprobs(at::randn({8, 10}), labels),
      std::string(fn) + "expected logits of rank 3 [B, T, V], got shape [8, 10]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_logprobs(at::ones({2, 4, 10}, at::kLong), labels),
      "expected floating logits (float64, float32, bfloat16 or float16), got Long");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, labels.to(at::kFloat)),
                             "expected integer labels (int64 or int32), got Float");
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_logprobs(logits, labels.slice(1, 0, 3)),
      "expected labels of shape [2, 4] to match the logits [2, 4, 10], got [2, 3]");
  auto bad = labels.clone();
  bad[1][2] = 10;
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, bad),
                             "expected labels in [0, 10) or equal to ignore_index = -100, got 10 "
                             "at labels[1, 2]");  // the label's own index, not the logits row's
  bad[1][2] = -5;
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, bad), "got -5 at labels[1, 2]");
  // Integer types that cannot hold ignore_index, and masks other than 0/1, are refused.
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, labels.to(at::kByte)),
                             "expected integer labels (int64 or int32), got Byte");
  auto mask = at::ones({2, 4}, at::kLong);
  mask[0][3] = 2;
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, labels, mask),
                             "expected completion_mask of bool or integer 0/1 values, got 2 at "
                             "completion_mask[0, 3]");
  auto ids = labels.clone();
  ids[1][3] = 11;
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, ids, at::ones({2, 4}, at::kBool)),
                             "expected input_ids in [0, 10) wherever completion_mask is set, got "
                             "11 at input_ids[1, 3]");
  // An out-of-range label at position 0 is never scored with the shift: no error.
  auto unscored = labels.clone();
  unscored[0][0] = 12345;
  EXPECT_NO_THROW(F::gather_logprobs(logits, unscored));
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, labels, at::ones({2, 4})),
                             "expected completion_mask of bool or integer 0/1 values, got Float");
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_logprobs(logits, labels, at::ones({2, 4}, at::kComplexFloat)),
      "prefopt::gather_logprobs: expected completion_mask of bool or integer 0/1 values, got "
      "ComplexFloat");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(logits, labels, at::ones({2, 5}, at::kBool)),
                             "expected completion_mask of shape [2, 4]");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(at::randn({2, 4, 0}), labels),
                             "expected a vocabulary of at least 1 entry, got V = 0");

  const char* pfn = "prefopt::gather_packed_logprobs: ";
  const auto z = at::randn({6, 10});
  const auto y = at::randint(10, {6}, at::kLong);
  PREFOPT_EXPECT_THROWS_WITH(F::gather_packed_logprobs(z, y, at::tensor({1, 6}, at::kLong)),
                             std::string(pfn) + "expected cu_seqlens to start at 0, got 1");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_packed_logprobs(z, y, at::tensor({0, 4, 3, 6}, at::kLong)),
                             "expected non-decreasing cu_seqlens, got 4 then 3 at index 2");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_packed_logprobs(z, y, at::tensor({0, 3, 5}, at::kLong)),
                             "expected cu_seqlens to end at the token count N = 6, got 5");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_packed_logprobs(z, y, at::tensor({0.0, 6.0})),
                             "expected integer cu_seqlens, got Double");
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_packed_logprobs(z, y, at::tensor({0.0, 6.0}).to(at::kComplexDouble)),
      std::string(pfn) + "expected integer cu_seqlens, got ComplexDouble");
  PREFOPT_EXPECT_THROWS_WITH(
      F::gather_packed_logprobs(z.unsqueeze(0).expand({2, 6, 10}), y, at::tensor({0, 6})),
      "expected packed logits of shape [N, V] or [1, N, V], got [2, 6, 10]");
  PREFOPT_EXPECT_THROWS_WITH(F::gather_packed_logprobs(z, y.slice(0, 0, 5), at::tensor({0, 6})),
                             "expected labels of shape [6]");

  const auto odd = F::gather_logprobs(at::randn({3, 4, 10}), at::randint(10, {3, 4}, at::kLong));
  PREFOPT_EXPECT_THROWS_WITH(
      F::split_pairs(odd),
      "prefopt::split_pairs: expected an even number of sequences [chosen..., rejected...], got 3");
  const auto pair = F::split_pairs(F::gather_logprobs(logits, labels));
  PREFOPT_EXPECT_THROWS_WITH(F::ld_logps(pair, 1.5),
                             "prefopt::ld_logps: expected ld_alpha in [0, 1], got 1.5");
  PREFOPT_EXPECT_THROWS_WITH(F::ld_logps(pair, 0.5),
                             "expected per-token log-probs (gather with with_token_logps(true))");
  PREFOPT_EXPECT_THROWS_WITH(
      F::wpo_pair_weights(pair),
      "prefopt::wpo_pair_weights: expected WPO weights (gather with with_wpo_weights(true))");
}

// ---- CUDA: same op on the GPU, compared with the CPU kernels. Skips only without a GPU. ----

using GatherCuda = prefopt_test::CudaTest;

TEST_F(GatherCuda, MatchesCpuValuesAndGradients) {
  for (auto st : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    for (int64_t V : {7, 1000, 50257}) {
      SCOPED_TRACE(::testing::Message() << st << " V=" << V);
      const int64_t B = 3, T = 33;
      const auto labels = make_labels(B, T, V);
      const auto cpu = (at::randn({B, T, V}) * 3).to(st).requires_grad_();
      const auto gpu = cpu.detach().cuda().requires_grad_();
      const auto opts =
          GatherLogprobsOptions().with_token_accuracy(true).with_entropy(true).with_wpo_weights(
              true);
      const auto a = F::gather_logprobs(cpu, labels, opts);
      const auto b = F::gather_logprobs(gpu, labels.cuda(), opts);
      EXPECT_TRUE(b.sum.is_cuda());
      const auto [rt, tol] = value_tol(st);
      EXPECT_TRUE(AllClose(b.sum, a.sum, rt, tol * T));
      EXPECT_TRUE(at::equal(b.count.cpu(), a.count));
      EXPECT_TRUE(AllClose(b.entropy_sum, a.entropy_sum, rt, tol * T));
      // The entropies' gradient takes the ATen path on CUDA; the log-probs' the kernels.
      const auto ga = torch::autograd::grad({a.sum.sum() + 0.5 * a.entropy_sum.sum()}, {cpu})[0];
      const auto gb = torch::autograd::grad({b.sum.sum() + 0.5 * b.entropy_sum.sum()}, {gpu})[0];
      const auto [grt, gat] = grad_tol(st);
      EXPECT_TRUE(AllClose(gb, ga, grt, gat));
    }
  }
}

TEST_F(GatherCuda, PackedAndErrors) {
  const auto z = at::randn({6, 10}, at::kCUDA);
  const auto y = at::randint(10, {6}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  const auto lp = F::gather_packed_logprobs(z, y, at::tensor({0, 2, 6}, at::kLong));
  const auto cpu = F::gather_packed_logprobs(z.cpu(), y.cpu(), at::tensor({0, 2, 6}, at::kLong));
  EXPECT_TRUE(AllClose(lp.sum, cpu.sum, 1e-5, 1e-5));
  PREFOPT_EXPECT_THROWS_WITH(F::gather_logprobs(z.view({2, 3, 10}), y.cpu().view({2, 3})),
                             "expected labels on cuda:0 like the logits, got cpu");
  if (!prefopt::has_cuda_kernels())
    PREFOPT_EXPECT_THROWS_WITH(
        F::gather_logprobs(z.view({2, 3, 10}), y.view({2, 3}),
                           GatherLogprobsOptions().backend(GatherBackend::kKernel)),
        "backend kKernel needs CPU logits, or CUDA logits and a build with CUDA kernels, got "
        "cuda:0");
}

/// The CUDA row kernels against the ATen path on the GPU (itself checked against the CPU above):
/// every dtype,
/// vocabularies that leave scalar heads and tails, rows that start off a 16-byte boundary,
/// -inf/+inf/NaN rows, and the gradient in every row (scored or not).
TEST_F(GatherCuda, KernelsMatchATen) {
  if (!prefopt::has_cuda_kernels()) GTEST_SKIP() << "built without the CUDA row kernels";
  for (auto st : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    for (int64_t V : {1, 7, 1000, 50257, 128256}) {
      for (int64_t pad : {0, 3}) {  // pad: rows at odd offsets, unit vocabulary stride
        SCOPED_TRACE(::testing::Message() << st << " V=" << V << " pad=" << pad);
        const int64_t B = 3, T = 17;
        auto labels = make_labels(B, T, V);
        auto full = (at::randn({B, T, V + pad}, at::kCUDA) * 4).to(st);
        if (V > 2) {  // scored rows of sequence 2: a -inf entry, all -inf, +inf, NaN
          labels[2].slice(0, 5, 9).fill_(2);
          full[2][4][1] = -INFINITY;
          full[2][5].fill_(-INFINITY);
          full[2][6][0] = INFINITY;
          full[2][7][V - 1] = NAN;
        }
        labels = labels.cuda();
        const auto logits = full.narrow(2, 0, V).requires_grad_(false);
        auto opts = GatherLogprobsOptions()
                        .with_token_logps(true)
                        .with_logits_mean(true)
                        .with_token_accuracy(true)
                        .with_entropy(true)
                        .with_wpo_weights(true);
        std::vector<prefopt::SequenceLogprobs> res;
        std::vector<at::Tensor> grads;
        for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
          const auto x = logits.detach().clone().requires_grad_();
          const auto x_in = pad ? at::constant_pad_nd(x, {0, pad}).narrow(2, 0, V) : x;
          res.push_back(F::gather_logprobs(x_in, labels, opts.backend(backend)));
          // Upstream weights 0 for sequence 2 (its NaN would reach every gradient).
          const auto w = at::tensor({0.7, -1.3, 0.0}, res.back().sum.options());
          grads.push_back(torch::autograd::grad({(res.back().sum * w).sum()}, {x})[0]);
        }
        const auto [rt, tol] = value_tol(st);
        const auto& k = res[0];
        const auto& a = res[1];
        EXPECT_TRUE(AllClose(k.token_logps, a.token_logps, rt, tol));
        EXPECT_TRUE(AllClose(k.sum, a.sum, rt, tol * T));
        EXPECT_TRUE(at::equal(k.count, a.count));
        EXPECT_TRUE(AllClose(k.logits_sum, a.logits_sum, rt, tol * T * 4));
        EXPECT_TRUE(AllClose(k.entropy_sum, a.entropy_sum, rt, tol * T * 4));
        EXPECT_TRUE(AllClose(k.wpo_weights, a.wpo_weights, rt * 10, tol * 10));
        // Sequence 2's NaN and all -inf rows: ATen's argmax picks an index, the kernels none.
        EXPECT_TRUE(at::equal(k.correct.slice(0, 0, 2), a.correct.slice(0, 0, 2)));
        const auto [grt, gat] = grad_tol(st);
        EXPECT_TRUE(AllClose(grads[0].slice(0, 0, 2), grads[1].slice(0, 0, 2), grt, gat));
        EXPECT_TRUE(grads[0][2].eq(0).all().item<bool>());  // g = 0: zeros, not NaN
      }
    }
  }
}

/// A NaN logit makes that row's logit mean NaN in the kernels as on the CPU and in ATen (the
/// CUDA kernel once left it out of the sum). KernelsMatchATen cannot see it: its NaN row shares
/// a sequence with a −inf and a +inf row, whose means already sum to NaN.
TEST_F(GatherCuda, NanLogitMakesTheLogitMeanNaN) {
  if (!prefopt::has_cuda_kernels()) GTEST_SKIP() << "built without the CUDA row kernels";
  for (auto st : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    SCOPED_TRACE(::testing::Message() << st);
    const int64_t V = 1000;
    auto logits = at::randn({2, 3, V}).to(st);
    logits[0][1][V / 2] = NAN;  // sequence 0 only
    const auto labels = at::randint(V, {2, 3}, at::kLong);
    auto opts = GatherLogprobsOptions().shift(false).with_logits_mean(true);
    const auto c = F::gather_logprobs(logits, labels, opts);
    for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
      const auto g = F::gather_logprobs(logits.cuda(), labels.cuda(), opts.backend(backend));
      EXPECT_TRUE(std::isnan(g.logits_sum[0].item<double>())) << static_cast<int>(backend);
      EXPECT_TRUE(AllClose(g.logits_sum, c.logits_sum, 1e-3, 1e-3)) << static_cast<int>(backend);
    }
  }
}

}  // namespace
