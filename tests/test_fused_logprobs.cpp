// SPDX-License-Identifier: Apache-2.0
// Fused LM-head log-probs against the naive composite (matmul, temperature, softcap,
// log_softmax, gather, masked sum) evaluated in fp64 by tests/reference/logprobs_reference.h.
#include <c10/core/GradMode.h>
#include <prefopt/detail/rows.h>
#include <prefopt/fused_logprobs.h>

#include <torch/csrc/autograd/autograd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "memory.h"  // bench/: the tracking CPU allocator
#include "reference/logprobs_reference.h"
#include "support.h"

namespace {

namespace F = prefopt::functional;
namespace fs = std::filesystem;
using prefopt::FusedBackward;
using prefopt::FusedLogprobsOptions;
using prefopt::GatherBackend;
using prefopt_test::AllClose;
using prefopt_test::make_labels;
using prefopt_test::SeededTest;

constexpr int64_t kIgnore = -100;

/// The naive composite's logits: the head, × the logit scale, the softcap, ÷ the temperature
/// (the order of the models' forward and of TRL).
at::Tensor naive_logits(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                        double temperature, double softcap, double scale = 1.0) {
  auto z = at::matmul(h, w.t());
  if (b.defined()) z = z + b;
  z = z * scale;
  if (softcap > 0) z = softcap * at::tanh(z / softcap);
  return z / temperature;
}

/// Logit transforms of the grid: none, scale with temperature, softcap, all three.
struct Transform {
  double scale, temperature, softcap;
};
constexpr Transform kTransforms[] = {
    {1.0, 1.0, 0.0}, {0.5, 0.7, 0.0}, {1.0, 1.0, 4.0}, {1.5, 0.7, 4.0}};

struct Head {
  at::Tensor h, w, b;
  Head(int64_t B, int64_t T, int64_t H, int64_t V, bool bias, at::ScalarType st) {
    h = (at::randn({B, T, H}, at::kDouble)).to(st).requires_grad_();
    w = (at::randn({V, H}, at::kDouble) / std::sqrt(static_cast<double>(H)) * 2)
            .to(st)
            .requires_grad_();
    if (bias) b = (at::randn({V}, at::kDouble) * 0.5).to(st).requires_grad_();
  }
  std::vector<at::Tensor> params() const {
    std::vector<at::Tensor> p{h, w};
    if (b.defined()) p.push_back(b);
    return p;
  }
  /// fp64 leaf copies for the reference.
  Head as_double() const {
    Head d = *this;
    d.h = h.detach().to(at::kDouble).requires_grad_();
    d.w = w.detach().to(at::kDouble).requires_grad_();
    if (b.defined()) d.b = b.detach().to(at::kDouble).requires_grad_();
    return d;
  }
};

struct Shape {
  int64_t B, T, H, V;
};

class FusedGrid : public SeededTest, public ::testing::WithParamInterface<Shape> {};

TEST_P(FusedGrid, ValuesAndGradientsMatchTheNaiveCompositeInFp64) {
  const auto [B, T, H, V] = GetParam();
  const auto labels = make_labels(B, T, V);
  const auto g_sum = at::randn({B}, at::kDouble), g_mean = at::randn({B}, at::kDouble);
  const auto g_ent = at::randn({B}, at::kDouble);
  const int64_t row = V * 8;  // one row of fp64 logits buffer
  for (bool bias : {false, true})
    for (const auto [scale, temperature, softcap] : kTransforms) {
      const Head head(B, T, H, V, bias, at::kDouble);
      const auto ref_head = head.as_double();
      const auto z = naive_logits(ref_head.h, ref_head.w, ref_head.b, temperature, softcap, scale);
      const auto ref = prefopt_ref::gather(z, labels, labels != kIgnore);
      // The gradients through the log-probs and the entropies.
      const auto ref_grads = torch::autograd::grad(
          {(ref.sum * g_sum).sum() + (ref.mean * g_mean).sum() + (ref.entropy_sum * g_ent).sum()},
          ref_head.params());
      // Chunks: one row, three rows (N rarely a multiple), everything at once.
      const int64_t bytes_softcap = softcap > 0 ? 2 : 1;
      // Backward in vocabulary blocks: the same budgets give blocks of about V / N columns
      // (several, the last one partial) and one block.
      for (auto bwd :
           {FusedBackward::kTokenChunks, FusedBackward::kVocabBlocks, FusedBackward::kTiles})
        for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{1} << 20})
          for (auto backend : {GatherBackend::kKernel, GatherBackend::kATen}) {
            SCOPED_TRACE(::testing::Message()
                         << "bias " << bias << " scale " << scale << " temperature " << temperature
                         << " softcap " << softcap << " chunk rows " << rows << " backend "
                         << static_cast<int>(backend) << " backward " << static_cast<int>(bwd));
            const auto opts =
                FusedLogprobsOptions()
                    .logit_scale(scale)
                    .temperature(temperature)
                    .softcap(softcap)
                    .chunk_bytes(std::min<int64_t>(rows * row * bytes_softcap, int64_t{1} << 40))
                    .backend(backend)
                    .backward(bwd)
                    .with_token_logps(true)
                    .with_logits_mean(true)
                    .with_token_accuracy(true)
                    .with_entropy(true)
                    .with_wpo_weights(true);
            const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels, opts);
            EXPECT_TRUE(AllClose(lp.sum, ref.sum, 1e-11, 1e-11));
            EXPECT_TRUE(AllClose(lp.mean, ref.mean, 1e-11, 1e-11));
            EXPECT_TRUE(at::equal(lp.count, ref.count));
            EXPECT_TRUE(AllClose(lp.token_logps, ref.token_logps, 1e-11, 1e-11));
            EXPECT_TRUE(AllClose(lp.logits_sum, ref.logits_sum, 1e-11, 1e-11));
            EXPECT_TRUE(at::equal(lp.correct, ref.correct));
            EXPECT_TRUE(AllClose(lp.entropy_sum, ref.entropy_sum, 1e-11, 1e-11));
            EXPECT_TRUE(AllClose(lp.wpo_weights, ref.wpo_weights, 1e-10, 1e-12));
            const auto grads =
                torch::autograd::grad({(lp.sum * g_sum).sum() + (lp.mean * g_mean).sum() +
                                       (lp.entropy_sum * g_ent).sum()},
                                      head.params());
            for (size_t i = 0; i < grads.size(); ++i)
              EXPECT_TRUE(AllClose(grads[i], ref_grads[i], 1e-10, 1e-11)) << "parameter " << i;
          }
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedGrid,
                         ::testing::Values(Shape{1, 1, 4, 5}, Shape{2, 9, 16, 37},
                                           Shape{3, 17, 8, 1000}, Shape{4, 33, 24, 257}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           // A stream, not "B" + to_string(...): GCC 12 warns falsely
                           // (-Wrestrict, GCC bug 105329) on that chain under C++20.
                           const auto& s = info.param;
                           std::ostringstream name;
                           name << "B" << s.B << "_T" << s.T << "_H" << s.H << "_V" << s.V;
                           return name.str();
                         });

using Fused = SeededTest;

/// The fp64 composite on a head's (rounded) values, with the transform `t` (none by default):
/// the gathering and the gradients of the sum of the sequence sums.
auto fp64_sums(const Head& head, const at::Tensor& labels, Transform t = kTransforms[0]) {
  const auto d = head.as_double();
  auto ref = prefopt_ref::gather(naive_logits(d.h, d.w, d.b, t.temperature, t.softcap, t.scale),
                                 labels, labels != kIgnore);
  auto grads = torch::autograd::grad({ref.sum.sum()}, d.params());
  return std::make_pair(std::move(ref), std::move(grads));
}

/// Gradients in the inputs' dtype `st`, each within `rel` of the largest reference entry.
void expect_grads_close(const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& ref_grads, at::ScalarType st, double rel) {
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_EQ(grads[i].scalar_type(), st);
    EXPECT_TRUE(grads[i].is_contiguous());
    const double scale = ref_grads[i].abs().max().item<double>();
    EXPECT_TRUE(AllClose(grads[i], ref_grads[i], 0, rel * scale)) << "parameter " << i;
  }
}

// Low precision against the fp64 composite on the same (rounded) inputs. The op's logits are
// rounded to the input dtype once (the chunk matmul's output), as any bf16 LM head's are; the
// log-softmax and every accumulation are fp32. Stated tolerances: fp32 1e-4 per token;
// bf16 about 2⁻⁸·|z| per token, so 3e-2 on per-token log-probs and 1e-2 relative on the
// weight gradient at these magnitudes.
// The same with scale 1.25, softcap 3 and temperature 0.8, so that the cap bites (|x| of a few
// units here): f'(x) is formed in fp32 from x and rounded once, in 16 bits too.
TEST_F(Fused, LowPrecisionInputsAgainstFp64) {
  const int64_t B = 4, T = 24, H = 64, V = 3000;
  const auto labels = make_labels(B, T, V);
  for (auto st : {at::kFloat, at::kBFloat16})
    for (const Transform t : {kTransforms[0], Transform{1.25, 0.8, 3.0}}) {
      SCOPED_TRACE(::testing::Message() << st << " softcap " << t.softcap);
      const Head head(B, T, H, V, /*bias=*/true, st);
      const auto [ref, ref_grads] = fp64_sums(head, labels, t);
      for (auto bwd :
           {FusedBackward::kTokenChunks, FusedBackward::kVocabBlocks, FusedBackward::kTiles}) {
        SCOPED_TRACE(::testing::Message() << "backward " << static_cast<int>(bwd));
        const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels,
                                          FusedLogprobsOptions()
                                              .logit_scale(t.scale)
                                              .temperature(t.temperature)
                                              .softcap(t.softcap)
                                              .with_token_logps(true)
                                              .chunk_bytes(V * 20 * 8)
                                              .backward(bwd));
        EXPECT_EQ(lp.sum.scalar_type(), at::kFloat);
        const double tok = st == at::kFloat ? 1e-4 : 3e-2;
        EXPECT_TRUE(AllClose(lp.token_logps, ref.token_logps, 0, tok));
        EXPECT_TRUE(AllClose(lp.mean, ref.mean, 0, tok));
        expect_grads_close(torch::autograd::grad({lp.sum.sum()}, head.params()), ref_grads, st,
                           st == at::kFloat ? 1e-5 : 1e-2);
      }
    }
}

// 16-bit weights over several row chunks: the weight gradient accumulates in fp32 (a
// DwAccumulator, split at row ⌈V/2⌉ rounded up to 8) and is cast once. The split falls inside
// a vocabulary block of kTiles (blocks of 512 columns on CPU, 522 rounded down to 64-byte
// lines: [1024, 1536) holds row 1504) and inside every whole-V block of kTokenChunks.
// Tolerance as in LowPrecisionInputsAgainstFp64; a block added at a wrong row would be off by
// O(scale).
TEST_F(Fused, SixteenBitWeightGradientOverRowChunksAndOddV) {
  const int64_t B = 4, T = 24, H = 64, V = 3001;
  const auto labels = make_labels(B, T, V);
  const int64_t n = (labels.slice(1, 1) != kIgnore).sum().item<int64_t>();
  // kTokenChunks: 5 rows of 16-bit logits per chunk. kTiles: rows of 64 · 6 bytes beside 512
  // columns of 2 bytes fit 21 times in the budget (tiles_within), leaving 522 columns (512
  // once aligned to 64-byte lines on CPU).
  const int64_t budget = 5 * V * 2;
  ASSERT_GT(n, 21) << "too few scored rows for several kTiles row chunks";
  for (auto st : {at::kBFloat16, at::kHalf}) {
    if (st == at::kHalf && !prefopt::detail::fused::cpu_half_matmul()) continue;
    SCOPED_TRACE(::testing::Message() << st);
    const Head head(B, T, H, V, /*bias=*/true, st);
    const auto [ref, ref_grads] = fp64_sums(head, labels);
    for (auto bwd : {FusedBackward::kTokenChunks, FusedBackward::kTiles}) {
      SCOPED_TRACE(::testing::Message() << "backward " << static_cast<int>(bwd));
      const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels,
                                        FusedLogprobsOptions().chunk_bytes(budget).backward(bwd));
      expect_grads_close(torch::autograd::grad({lp.sum.sum()}, head.params()), ref_grads, st, 1e-2);
    }
  }
}

// 16-bit GEMMs of at most 16³ multiply-adds: libtorch's CPU GEMM runs its reference loops for
// those, not oneDNN, and Debian's libtorch 1.13 sums them in 16 bits where it reads b row-major
// (the logits h · Wᵀ of a weight stored [H, V]; dh = dz · W of any weight), also on an AVX-512
// CPU where cpu_mm16_usable's 8 × 2048 × 8 check passes. Row chunks of one token at H = 128,
// V = 24 make every product that small. Logits rounded once move a log-prob by at most
// 2⁻⁸·max|z| of its row (each logit by 2⁻⁹ of itself, the logsumexp as much): measured within
// 0.52 of that bound, and above it when summed in bf16. dh: within 1e-2 of its largest entry,
// as in LowPrecisionInputsAgainstFp64 (measured 4.6e-3; 1.5e-2 when summed in bf16).
TEST_F(Fused, SixteenBitTinyProductsSumInFp32) {
  const int64_t B = 2, T = 9, H = 128, V = 24;
  const auto labels = make_labels(B, T, V);
  for (bool w_col_major : {false, true})
    for (auto bwd : {FusedBackward::kTokenChunks, FusedBackward::kTiles}) {
      SCOPED_TRACE(::testing::Message()
                   << "W column-major " << w_col_major << " backward " << static_cast<int>(bwd));
      const auto h = at::randn({B, T, H}).to(at::kBFloat16).requires_grad_();
      const auto w64 = at::randn({V, H}, at::kDouble) / std::sqrt(static_cast<double>(H));
      const auto w = (w_col_major ? w64.t().contiguous().t() : w64).to(at::kBFloat16);
      ASSERT_EQ(w.is_contiguous(), !w_col_major);
      const auto hd = h.detach().to(at::kDouble).requires_grad_();
      const auto z = at::matmul(hd, w.to(at::kDouble).t());
      const auto ref = prefopt_ref::gather(z, labels, labels != kIgnore);
      const auto ref_dh = torch::autograd::grad({ref.sum.sum()}, {hd})[0];
      // kTokenChunks: one row of logits per chunk, forward and backward. kTiles: one row of
      // bf16 hidden states and fp32 dh beside one row of logits (tiles_within).
      const int64_t budget = bwd == FusedBackward::kTiles ? H * 6 + V * 2 : V * 2;
      const auto lp = F::fused_logprobs(
          h, w, {}, labels,
          FusedLogprobsOptions().chunk_bytes(budget).backward(bwd).with_token_logps(true));
      const auto bound = z.detach().abs().amax(-1).slice(1, 0, T - 1) / 256 + 1e-5;
      const auto err = (lp.token_logps.to(at::kDouble) - ref.token_logps).abs();
      EXPECT_TRUE(err.le(bound).all().item<bool>())
          << "worst excess " << (err - bound).max().item<double>();
      const auto dh = torch::autograd::grad({lp.sum.sum()}, {h})[0];
      EXPECT_TRUE(AllClose(dh, ref_dh, 0, 1e-2 * ref_dh.abs().max().item<double>()));
    }
}

// The order of the transforms, against log-probs evaluated by hand in double: logits
// z = [40, 36, 30, 0] under softcap 30 then temperature 0.7 give log p₀ = −0.19856186114504
// (the reverse order, ÷ 0.7 before the softcap, would give −0.5299); scale 0.5 on 2z is the
// same; z × 0.25 ÷ 0.5 without a softcap gives log p₁ = −2.1328452355323.
TEST_F(Fused, ScaleSoftcapTemperatureInTheModelsOrder) {
  const auto w = at::eye(4, at::kDouble);
  const auto z = at::tensor({40.0, 36.0, 30.0, 0.0}, at::kDouble).view({1, 1, 4});
  const auto logp = [&](const at::Tensor& h, int64_t y, FusedLogprobsOptions o) {
    return F::fused_logprobs(h, w, {}, at::full({1, 1}, y, at::kLong), o.shift(false))
        .sum.item<double>();
  };
  const auto capped = FusedLogprobsOptions().softcap(30).temperature(0.7);
  EXPECT_NEAR(logp(z, 0, capped), -0.1985618611450377, 1e-13);
  EXPECT_NEAR(logp(z * 2, 0, FusedLogprobsOptions(capped).logit_scale(0.5)), -0.1985618611450377,
              1e-13);
  EXPECT_NEAR(logp(z, 1, FusedLogprobsOptions().logit_scale(0.25).temperature(0.5)),
              -2.132845235532322, 1e-13);
}

// TRL's own fused head (`trl.kernels.ChunkedLogProbFunction`, DPOTrainer's since TRL 1.15) on
// fp32 inputs, recorded by tests/reference/make_trl_head_fixture.py in
// tests/fixtures/trl_fused_head.json: per-token log-probs, the per-sequence entropy, mean
// logit, top-1 count and WPO weight DPOTrainer logs and weighs with, and the gradients of
// Σ_b c_b · Σ_t log p_{b,t} to the hidden states, the weight and the bias, and of that plus
// Σ_b e_b · Σ_t H_{b,t} (TRL's head differentiates its entropies too). Once plain (logits from
// −27 to 18), once with logit scale 1.7, softcap 10 (scaled logits from −31 to 35) and
// temperature 0.7. Every blocking of the backward, with the automatic budget and with a budget
// of three logits rows. Both sides are fp32 with different summation orders.
// Measured: per-token log-probs within 3.8e-6 (log-probs down to −29), the per-sequence sums
// within 1.2e-5 (up to 115 in size), WPO weights within 4.4e-7 relative, gradients within
// 1.9e-6 of their largest entry, 7.3e-6 with the entropies (the plain case, where prefopt is
// 7.7e-6 from the fp64 composite and TRL 3.0e-6). Checked at 1e-5 + 1e-6·|x|, 5e-6 relative
// and 1e-5 of the largest entry (2e-5 with the entropies). Counts and top-1 hits exactly: no
// label is within 1e-3 of the best other logit, so rounding cannot decide a hit. The old order
// (temperature before the softcap) fails the log-probs, entropy, mean logit, WPO weights and
// gradients of the second case.
TEST_F(Fused, MatchesTrlsFusedHead) {
  std::ifstream in(fs::path(PREFOPT_SOURCE_DIR) / "tests" / "fixtures" / "trl_fused_head.json");
  ASSERT_TRUE(in) << "tests/fixtures/trl_fused_head.json is missing";
  const auto fixture = nlohmann::json::parse(in);
  ASSERT_EQ(fixture.at("cases").size(), 2u);
  const auto floats = [](const nlohmann::json& j, at::IntArrayRef shape) {
    std::vector<float> v;
    for (double x : j) v.push_back(static_cast<float>(x));
    return at::tensor(v).view(shape);
  };
  const auto longs = [](const nlohmann::json& j, at::IntArrayRef shape) {
    return at::tensor(j.get<std::vector<int64_t>>()).view(shape);
  };
  for (const auto& c : fixture.at("cases")) {
    const int64_t B = c.at("B"), T = c.at("T"), H = c.at("H"), V = c.at("V");
    const bool bias = !c.at("bias").is_null();
    const auto h0 = floats(c.at("hidden"), {B, T, H});
    const auto w0 = floats(c.at("weight"), {V, H});
    const auto b0 = bias ? floats(c.at("bias"), {V}) : at::Tensor();
    const auto labels = longs(c.at("labels"), {B, T});
    const auto seq_grad = floats(c.at("seq_grad"), {B});
    const auto entropy_grad = floats(c.at("entropy_grad"), {B});
    for (auto bwd :
         {FusedBackward::kTokenChunks, FusedBackward::kVocabBlocks, FusedBackward::kTiles})
      for (int64_t budget : {int64_t{0}, 3 * V * 4}) {
        SCOPED_TRACE(::testing::Message() << c.at("name").get<std::string>() << " backward "
                                          << static_cast<int>(bwd) << " chunk_bytes " << budget);
        const auto h = h0.clone().requires_grad_(), w = w0.clone().requires_grad_();
        const auto b = bias ? b0.clone().requires_grad_() : at::Tensor();
        const auto lp = F::fused_logprobs(h, w, b, labels,
                                          FusedLogprobsOptions()
                                              .shift(false)
                                              .logit_scale(c.at("logit_scale"))
                                              .softcap(c.at("softcap"))
                                              .temperature(c.at("temperature"))
                                              .with_token_logps(true)
                                              .with_entropy(true)
                                              .with_logits_mean(true)
                                              .with_token_accuracy(true)
                                              .with_wpo_weights(true)
                                              .backward(bwd)
                                              .chunk_bytes(budget));
        EXPECT_TRUE(AllClose(lp.token_logps, floats(c.at("token_logps"), {B, T}), 1e-6, 1e-5));
        EXPECT_TRUE(AllClose(lp.sum, floats(c.at("sum"), {B}), 1e-6, 1e-5));
        EXPECT_TRUE(AllClose(lp.entropy_sum, floats(c.at("entropy_sum"), {B}), 1e-6, 1e-5));
        EXPECT_TRUE(AllClose(lp.logits_sum, floats(c.at("logits_sum"), {B}), 1e-6, 1e-5));
        EXPECT_TRUE(AllClose(lp.wpo_weights, floats(c.at("wpo_weights"), {B}), 5e-6, 0));
        EXPECT_TRUE(at::equal(lp.count, longs(c.at("count"), {B})));
        EXPECT_TRUE(at::equal(lp.correct, longs(c.at("correct"), {B})));
        std::vector<at::Tensor> params{h, w};
        if (bias) params.push_back(b);
        const auto loss = (lp.sum * seq_grad).sum();
        const auto g = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true);
        const auto g_ent =
            torch::autograd::grad({loss + (lp.entropy_sum * entropy_grad).sum()}, params);
        // Not a structured binding: a C++17 lambda (key, below) cannot capture one.
        for (const auto& run : {std::pair{g, ""}, std::pair{g_ent, "_entropy"}}) {
          const auto& grads = run.first;
          const char* suffix = run.second;
          SCOPED_TRACE(suffix);
          const auto key = [&](const char* name) { return std::string(name) + suffix; };
          const double rel = *suffix != 0 ? 2e-5 : 1e-5;
          const auto close = [&](const at::Tensor& actual, const at::Tensor& expected) {
            return AllClose(actual, expected, 0, rel * expected.abs().max().item<double>());
          };
          EXPECT_TRUE(close(grads[0], floats(c.at(key("d_hidden")), {B, T, H})));
          EXPECT_TRUE(close(grads[1], floats(c.at(key("d_weight")), {V, H})));
          if (bias) {
            EXPECT_TRUE(close(grads[2], floats(c.at(key("d_bias")), {V})));
          }
        }
      }
  }
}

// A softcap on 16-bit inputs: f(x) = cap·tanh(s·x/cap)/T is formed in fp32 and rounded once to
// the buffer's dtype, as TRL ≥ 1.15 forms it in fp32 (before, each of four in-place steps
// rounded to bf16: up to 4 ulp, 0.5 at |y| ≈ 30). With H = 1 and logits that bf16 holds
// exactly, the GEMM is exact, so the op's log-probs must equal the fp64 log-softmax of the
// once-rounded f(x) up to the fp32 statistics (1e-5 here); one more bf16 rounding of a logit
// near 30 moves a log-prob by up to 0.06. Every one of the 2 × 199 rows is scored, all in one
// chunk: three fp32 blocks of the transform (174 rows each on CPU), so f'(x) too lands at row
// offsets; the weight gradient is checked against fp64 autograd (1e-2 of its largest entry, as
// for bf16 in LowPrecisionInputsAgainstFp64; a block's f' at wrong rows is off by O(1)).
TEST_F(Fused, SixteenBitSoftcapRoundsOnce) {
  const int64_t B = 2, T = 200, V = 3000;
  const auto labels = at::randint(V, {B, T}, at::kLong);
  const auto h = at::ones({B, T, 1}, at::kBFloat16);
  const auto w =
      (at::randn({V, 1}, at::kDouble) * 20).to(at::kBFloat16).requires_grad_();  // exact products
  const auto lp = F::fused_logprobs(h, w, {}, labels,
                                    FusedLogprobsOptions()
                                        .logit_scale(1.25)
                                        .softcap(30)
                                        .temperature(0.8)
                                        .chunk_bytes(int64_t{1} << 30)
                                        .with_token_logps(true));
  const auto x = at::matmul(h.to(at::kFloat), w.detach().to(at::kFloat).t());  // exact in fp32
  const auto y = x.mul(1.25).div(30).tanh().mul(30).div(0.8).to(at::kBFloat16).to(at::kDouble);
  const auto ref = prefopt_ref::gather(y, labels, labels != kIgnore);
  EXPECT_TRUE(AllClose(lp.token_logps, ref.token_logps, 0, 1e-5));
  // dW[j] = Σ over scored rows of (1[j = label] − p_j) · f'(x_j) (h = 1), in fp64 from the
  // formula, with p the softmax of the once-rounded f(x) that the op's statistics see (at
  // |y| ≈ 37 a bf16 rounding moves p by up to 13%, which is the input's, not the op's, error).
  const auto rows = y.slice(1, 0, T - 1);
  const auto onehot = at::one_hot(labels.slice(1, 1), V).to(at::kDouble);
  const auto fprime =
      x.slice(1, 0, T - 1).to(at::kDouble).mul(1.25 / 30).cosh().pow(-2) * (1.25 / 0.8);
  const auto g_ref =
      ((onehot - at::softmax(rows, -1)) * fprime).sum(at::IntArrayRef{0, 1}).unsqueeze(1);
  const auto g = torch::autograd::grad({lp.sum.sum()}, {w})[0];
  EXPECT_TRUE(AllClose(g, g_ref, 0, 1e-2 * g_ref.abs().max().item<double>()));
}

// f'(x) where the cap saturates: a logit x = 200 under cap 30 and temperature 1.3 has
// f(x) ≈ cap / T = 23.077, which bf16 rounds to 23.125, above the bound, so f' taken from the
// rounded f(x) as (s/T)(1 − (T·y/cap)²) would be −0.0034 (the wrong sign, 650× too large). From
// x it is (1/T)·sech²(200/30) = 5.0e-6. The weight gradient of that logit's row is
// −p₀·f'(x)·h: checked against the fp64 value, in bf16 and fp32, over the three blockings.
TEST_F(Fused, SaturatedSoftcapDerivative) {
  const int64_t V = 8;
  for (auto st : {at::kFloat, at::kBFloat16})
    for (auto bwd :
         {FusedBackward::kTokenChunks, FusedBackward::kVocabBlocks, FusedBackward::kTiles}) {
      SCOPED_TRACE(::testing::Message() << st << " backward " << static_cast<int>(bwd));
      const auto h = at::ones({1, 1, 1}, st);
      auto w = at::zeros({V, 1}, st);
      w[0][0] = 200;
      w.requires_grad_();
      const auto labels = at::full({1, 1}, 1, at::kLong);
      const auto opts =
          FusedLogprobsOptions().shift(false).softcap(30).temperature(1.3).backward(bwd);
      const auto lp = F::fused_logprobs(h, w, {}, labels, opts);
      const auto gw = torch::autograd::grad({lp.sum.sum()}, {w})[0].to(at::kDouble);
      // fp64: y₀ = 30·tanh(200/30)/1.3, the others 0; p₀ = softmax; dlogp₁/dx₀ = −p₀·f'(200).
      const double y0 = 30 * std::tanh(200.0 / 30) / 1.3;
      const double p0 = std::exp(y0) / (std::exp(y0) + (V - 1));
      const double fp = 1 / 1.3 / std::pow(std::cosh(200.0 / 30), 2);
      // bf16: f' and dL/dy rounded once each; fp32: the old (1 − (T·y/cap)²) was 0.5% off.
      EXPECT_NEAR(gw[0][0].item<double>(), -p0 * fp, (st == at::kFloat ? 1e-4 : 1e-2) * p0 * fp);
    }
}

// Peak memory beside the inputs, counted by the bench's tracking CPU allocator: an fp32
// forward + backward holds the gradients it returns, one `chunk_bytes` budget of buffers and
// O(N) per-token state. Nothing of O(N·V), and no copy of the hidden states (a compacted
// copy, saved or gathered for backward, would add 2·n·H·4 bytes: about 0.5 MB here).
TEST_F(Fused, Fp32PeakMemoryIsTheGradientsAndOneBudget) {
  auto& meter = prefopt_bench::TrackingAllocator::install();
  const int64_t B = 4, T = 128, H = 256, V = 8001, budget = 256 << 10;  // V odd: padded rows
  const auto labels = make_labels(B, T, V);
  const int64_t n = (labels.slice(1, 1) != kIgnore).sum().item<int64_t>();
  const Head head(B, T, H, V, /*bias=*/false, at::kFloat);
  const int64_t grads_bytes = (V * H + B * T * H) * 4;
  for (auto bwd : {FusedBackward::kAuto, FusedBackward::kTiles, FusedBackward::kTokenChunks}) {
    SCOPED_TRACE(::testing::Message() << "backward " << static_cast<int>(bwd));
    meter.reset_peak();
    const int64_t before = meter.live();
    {
      const auto lp = F::fused_logprobs(head.h, head.w, {}, labels,
                                        FusedLogprobsOptions().chunk_bytes(budget).backward(bwd));
      const auto grads = torch::autograd::grad({lp.sum.sum()}, {head.h, head.w});
      EXPECT_EQ(grads[1].numel(), V * H);
    }
    const int64_t extra = meter.peak() - before;
    EXPECT_GT(extra, grads_bytes);
    EXPECT_LE(extra, grads_bytes + budget + n * 64 + (64 << 10))
        << "gradients " << grads_bytes << " B, budget " << budget << " B, n = " << n;
  }
}

TEST_F(Fused, PackedEqualsPadded) {
  const std::vector<int64_t> lengths{5, 1, 9, 0, 4};
  const int64_t B = lengths.size(), T = 9, H = 12, V = 50;
  auto labels = make_labels(B, T, V);
  for (int64_t s = 0; s < B; ++s) labels[s].slice(0, lengths[s]).fill_(kIgnore);
  const Head head(B, T, H, V, true, at::kDouble);
  const auto opts = FusedLogprobsOptions().with_token_accuracy(true).chunk_bytes(V * 8 * 4);
  const auto padded = F::fused_logprobs(head.h, head.w, head.b, labels, opts);
  std::vector<at::Tensor> hs, ys;
  std::vector<int64_t> cu{0};
  for (int64_t s = 0; s < B; ++s) {
    hs.push_back(head.h.detach()[s].slice(0, 0, lengths[s]));
    ys.push_back(labels[s].slice(0, 0, lengths[s]));
    cu.push_back(cu.back() + lengths[s]);
  }
  const auto hp = at::cat(hs).requires_grad_();
  const auto yp = at::cat(ys);
  const auto cu_t = at::tensor(cu, at::kLong);
  for (const auto& packed :
       {F::fused_packed_logprobs(hp, head.w, head.b, yp, cu_t, opts),
        F::fused_packed_logprobs(hp.unsqueeze(0), head.w, head.b, yp, cu_t, opts),
        F::fused_packed_logprobs(hp, head.w, head.b, yp, yp != kIgnore, cu_t, opts)}) {
    EXPECT_TRUE(AllClose(packed.sum, padded.sum, 1e-12, 1e-12));
    EXPECT_TRUE(at::equal(packed.count, padded.count));
    EXPECT_TRUE(at::equal(packed.correct, padded.correct));
  }
  const auto w = at::randn({B}, at::kDouble);
  const auto packed = F::fused_packed_logprobs(hp, head.w, head.b, yp, cu_t, opts);
  const auto gp = torch::autograd::grad({(packed.sum * w).sum()}, {hp, head.w, head.b});
  const auto gd = torch::autograd::grad({(padded.sum * w).sum()}, {head.h, head.w, head.b});
  std::vector<at::Tensor> gd_packed;
  for (int64_t s = 0; s < B; ++s) gd_packed.push_back(gd[0][s].slice(0, 0, lengths[s]));
  EXPECT_TRUE(AllClose(gp[0], at::cat(gd_packed), 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(gp[1], gd[1], 1e-12, 1e-12));
  EXPECT_TRUE(AllClose(gp[2], gd[2], 1e-12, 1e-12));
}

TEST_F(Fused, CompletionMaskFormEqualsLabelsForm) {
  const int64_t B = 3, T = 10, H = 8, V = 40;
  const auto labels = make_labels(B, T, V);
  const auto mask = labels != kIgnore;
  const auto ids = at::where(mask, labels, at::randint(V, {B, T}, at::kLong));
  const Head head(B, T, H, V, false, at::kDouble);
  const auto a = F::fused_logprobs(head.h, head.w, {}, labels);
  const auto b = F::fused_logprobs(head.h, head.w, {}, ids, mask);
  EXPECT_TRUE(at::equal(a.sum, b.sum));
  const prefopt::FusedLogprobs functor;
  EXPECT_TRUE(at::equal(functor(head.h, head.w, {}, labels).sum, a.sum));
  // Same result as gathering from materialised logits.
  const auto g = F::gather_logprobs(naive_logits(head.h, head.w, {}, 1, 0), labels);
  EXPECT_TRUE(AllClose(a.sum, g.sum, 1e-12, 1e-12));
}

TEST_F(Fused, AllTokensMasked) {
  const int64_t B = 2, T = 5, H = 6, V = 11;
  const auto labels = at::full({B, T}, kIgnore, at::kLong);
  const Head head(B, T, H, V, true, at::kFloat);
  const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels);
  EXPECT_TRUE(at::equal(lp.sum, at::zeros({B})));
  EXPECT_TRUE(at::equal(lp.mean, at::zeros({B})));
  EXPECT_TRUE(at::equal(lp.count, at::zeros({B}, at::kLong)));
  const auto grads = torch::autograd::grad({lp.sum.sum()}, head.params(), {}, {}, false, true);
  for (const auto& g : grads) EXPECT_TRUE(!g.defined() || g.abs().max().item<float>() == 0);
}

TEST_F(Fused, FrozenWeightGetsNoGradient) {
  const int64_t B = 2, T = 7, H = 10, V = 33;
  const auto labels = make_labels(B, T, V);
  Head head(B, T, H, V, true, at::kDouble);
  const auto ref_head = head.as_double();
  head.w = head.w.detach();  // frozen LM head (LoRA)
  const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels);
  const auto ref = prefopt_ref::gather(naive_logits(ref_head.h, ref_head.w, ref_head.b, 1, 0),
                                       labels, labels != kIgnore);
  const auto ref_grads = torch::autograd::grad({ref.sum.sum()}, {ref_head.h, ref_head.b});
  lp.sum.sum().backward();
  EXPECT_TRUE(AllClose(head.h.grad(), ref_grads[0], 1e-11, 1e-12));
  EXPECT_TRUE(AllClose(head.b.grad(), ref_grads[1], 1e-11, 1e-12));
  EXPECT_FALSE(head.w.grad().defined());
}

TEST_F(Fused, NoGradModeLeavesNoGraph) {
  const Head head(2, 6, 8, 20, true, at::kFloat);
  const auto labels = make_labels(2, 6, 20);
  {
    c10::NoGradGuard guard;
    const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels);
    EXPECT_FALSE(lp.sum.requires_grad());
    EXPECT_FALSE(lp.sum.grad_fn());
  }
  const auto frozen = F::fused_logprobs(head.h.detach(), head.w.detach(), head.b.detach(), labels);
  EXPECT_FALSE(frozen.sum.requires_grad());
  const auto live =
      F::fused_logprobs(head.h, head.w, head.b, labels, FusedLogprobsOptions().with_entropy(true));
  EXPECT_TRUE(live.sum.requires_grad());
  EXPECT_TRUE(live.entropy_sum.requires_grad());  // the entropy is differentiable too
}

// create_graph: the backward pass forms its gradients outside autograd (out= GEMMs into reused
// buffers), so a second derivative would be wrong. It failed inside ATen ("index_select():
// functions with out=... arguments don't support automatic differentiation"), naming neither
// the op nor the cause; now the op names both. A plain backward still works afterwards.
TEST_F(Fused, DoubleBackwardIsRefused) {
  const int64_t B = 2, T = 5, H = 6, V = 9;
  const auto labels = make_labels(B, T, V);
  const Head head(B, T, H, V, /*bias=*/true, at::kDouble);
  const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels);
  PREFOPT_EXPECT_THROWS_WITH(
      torch::autograd::grad({lp.sum.sum()}, {head.h}, {}, /*retain_graph=*/true,
                            /*create_graph=*/true),
      "prefopt::fused_logprobs: double backward (create_graph) is not supported");
  // A frozen input, and the packed form's own name.
  const auto packed = F::fused_packed_logprobs(head.h.detach()[0], head.w, {}, labels[0],
                                               at::tensor({int64_t{0}, int64_t{2}, T}, at::kLong));
  PREFOPT_EXPECT_THROWS_WITH(
      torch::autograd::grad({packed.sum.sum()}, {head.w}, {}, /*retain_graph=*/true,
                            /*create_graph=*/true),
      "prefopt::fused_packed_logprobs: double backward (create_graph) is not supported");
  const auto [ref, ref_grads] = fp64_sums(head, labels);
  const auto grads = torch::autograd::grad({lp.sum.sum()}, head.params());
  for (size_t i = 0; i < grads.size(); ++i)
    EXPECT_TRUE(AllClose(grads[i], ref_grads[i], 1e-11, 1e-12)) << "parameter " << i;
}

// A loss of the entropies alone: no log-prob gradient reaches the op. fp32 and bf16 (whose
// 16-bit kernel path the gathering grid covers only through gather_logprobs), the tiles and
// the vocabulary blocks, against the fp64 composite on the same rounded inputs. The entropy's
// gradient is all softmax terms, so a bf16 rounding of the logits moves it by about 2⁻⁸·|z|
// relative (1.4e-2 of its largest entry measured against unrounded fp64 logits): the
// reference rounds its logits where the op does (the head's output, then the transform's),
// with the derivative taken at the rounded values. Measured then: entropies within 8e-7 (sums
// up to 26), gradients within 9e-7 of their largest entry in fp32 and 3.4e-3 in bf16 (the
// bf16 gradient tiles); checked at 1e-4, and 1e-5 and 1e-2 of the largest entry, as in
// LowPrecisionInputsAgainstFp64.
TEST_F(Fused, EntropyAloneCarriesItsGradient) {
  const int64_t B = 3, T = 11, H = 16, V = 301;
  const double temperature = 0.8, cap = 5.0;
  const auto labels = make_labels(B, T, V);
  const auto w = at::randn({B}, at::kDouble);
  for (auto st : {at::kFloat, at::kBFloat16}) {
    const Head head(B, T, H, V, true, st);
    const auto d = head.as_double();
    // x's value rounded to st, its gradient passed straight through.
    const auto round = [&](const at::Tensor& x) {
      return x + (x.to(st).to(at::kDouble) - x).detach();
    };
    const auto y = round(naive_logits(d.h, d.w, d.b, 1.0, 0.0));
    const auto ref = prefopt_ref::gather(round(cap * at::tanh(y / cap) / temperature), labels,
                                         labels != kIgnore);
    const auto ref_grads = torch::autograd::grad({(ref.entropy_sum * w).sum()}, d.params());
    for (auto bwd : {FusedBackward::kTiles, FusedBackward::kVocabBlocks}) {
      SCOPED_TRACE(::testing::Message() << st << " backward " << static_cast<int>(bwd));
      const auto lp = F::fused_logprobs(head.h, head.w, head.b, labels,
                                        FusedLogprobsOptions()
                                            .temperature(temperature)
                                            .softcap(cap)
                                            .chunk_bytes(V * 4 * 4)
                                            .backward(bwd)
                                            .with_entropy(true));
      EXPECT_TRUE(AllClose(lp.entropy_sum, ref.entropy_sum, 0, 1e-4));
      const auto grads =
          torch::autograd::grad({(lp.entropy_sum.to(at::kDouble) * w).sum()}, head.params());
      expect_grads_close(grads, ref_grads, st, st == at::kFloat ? 1e-5 : 1e-2);
    }
  }
}

// The reused logits buffers: on CPU rows start on 64-byte lines (MKL's sgemm writes logits
// rows slower at an odd stride); CUDA buffers stay dense. Values by hand: 50,257 fp32
// entries → 3142 lines of 16.
TEST(FusedBuffers, CpuRowsArePaddedToCacheLines) {
  namespace fd = prefopt::detail::fused;
  const at::Device cpu(at::kCPU);
  EXPECT_EQ(fd::buffer_stride(50257, at::kFloat, cpu), 50272);
  EXPECT_EQ(fd::buffer_stride(50257, at::kBFloat16, cpu), 50272);
  EXPECT_EQ(fd::buffer_stride(50257, at::kDouble, cpu), 50264);
  EXPECT_EQ(fd::buffer_stride(151936, at::kFloat, cpu), 151936);
  EXPECT_EQ(fd::buffer_stride(10, at::kHalf, cpu), 32);
  EXPECT_EQ(fd::buffer_stride(50257, at::kFloat, at::Device(at::kCUDA, 0)), 50257);
  const auto buffer = at::arange(4 * 16, at::kFloat);
  const auto z = fd::buffer_rows(buffer, 1, 2, 10, 16);  // rows 1 and 2 of 10 entries
  EXPECT_EQ(z.sizes(), at::IntArrayRef({2, 10}));
  EXPECT_EQ(z.strides(), at::IntArrayRef({16, 1}));
  EXPECT_EQ(z[0][0].item<float>(), 16);
  EXPECT_EQ(z[1][9].item<float>(), 41);
  EXPECT_THROW(fd::buffer_rows(buffer, 3, 2, 10, 16), c10::Error);  // past the end
  // Backward tiles: blocks narrower than V are cut to whole lines (16 fp32, 32 bf16 entries)
  // and stored dense; a block under one line stays as it is; a whole row is padded.
  const at::Device cuda(at::kCUDA, 0);
  EXPECT_EQ(fd::block_columns(1000, 50257, at::kFloat, cpu), 992);
  EXPECT_EQ(fd::block_columns(1000, 50257, at::kBFloat16, cpu), 992);
  EXPECT_EQ(fd::block_columns(1010, 50257, at::kBFloat16, cpu), 992);
  EXPECT_EQ(fd::block_columns(17, 50257, at::kFloat, cpu), 16);
  EXPECT_EQ(fd::block_columns(10, 50257, at::kFloat, cpu), 10);
  EXPECT_EQ(fd::block_columns(60000, 50257, at::kFloat, cpu), 50257);
  EXPECT_EQ(fd::block_columns(1000, 50257, at::kFloat, cuda), 1000);
  EXPECT_EQ(fd::block_stride(992, 50257, at::kFloat, cpu), 992);
  EXPECT_EQ(fd::block_stride(10, 50257, at::kFloat, cpu), 10);
  EXPECT_EQ(fd::block_stride(50257, 50257, at::kFloat, cpu), 50272);
  EXPECT_EQ(fd::block_stride(50257, 50257, at::kFloat, cuda), 50257);
}

TEST_F(Fused, Errors) {
  const auto h = at::randn({2, 4, 8});
  const auto w = at::randn({10, 8});
  const auto y = at::randint(10, {2, 4}, at::kLong);
  const std::string fn = "prefopt::fused_logprobs: ";
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h.view({8, 8}), w, {}, y),
                             fn + "expected hidden states of rank 3 [B, T, H], got shape [8, 8]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, at::randn({10, 7}), {}, y),
      "expected weight of shape [V, 8] to match the hidden size of [2, 4, 8], got [10, 7]");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w.to(at::kDouble), {}, y),
                             "expected weight of dtype Float like the hidden states, got Double");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, at::randn({9}), y),
                             "expected bias of shape [10] to match the weight [10, 8], got [9]");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, at::randn({10}, at::kDouble), y),
                             "expected bias of dtype Float like the hidden states, got Double");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, w, {}, y.slice(1, 0, 3)),
      "expected labels of shape [2, 4] to match the hidden states [2, 4, 8], got [2, 3]");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, y.to(at::kFloat)),
                             "expected integer labels (int64 or int32), got Float");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h.to(at::kLong), w.to(at::kLong), {}, y),
      "expected floating hidden states (float64, float32, bfloat16 or float16), got Long");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().chunk_bytes(39)),
                             fn + "memory budget chunk_bytes = 39 is below one row of logits "
                                  "buffers (40 bytes for V = 10, H = 8, Float)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().chunk_bytes(-1)),
      "prefopt::fused_logprobs: expected chunk_bytes >= 0 (0: automatic), got -1");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().temperature(0)),
                             "expected a finite temperature > 0, got 0");
  // Non-finite options would make every log-prob NaN (issue #20: softcap = +inf was accepted).
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().temperature(INFINITY)),
      "expected a finite temperature > 0, got inf");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().softcap(INFINITY)),
      "expected a finite softcap >= 0 (0: off), got inf");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().softcap(NAN)),
                             "expected a finite softcap >= 0");
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().logit_scale(0)),
                             fn + "expected a finite logit_scale > 0, got 0");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, w, {}, y, FusedLogprobsOptions().logit_scale(-INFINITY)),
      "expected a finite logit_scale > 0, got -inf");
  // Hidden size 0 and absurd sizes are named before any arithmetic on them.
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(at::randn({2, 4, 0}), at::randn({10, 0}), {}, y),
                             fn + "expected a hidden size of at least 1, got H = 0");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_logprobs(h, at::randn({1, 8}).expand({int64_t{1} << 41, 8}), {}, y),
      "expected V and H below 2^40");
  auto bad = y.clone();
  bad[0][3] = 10;
  PREFOPT_EXPECT_THROWS_WITH(F::fused_logprobs(h, w, {}, bad),
                             "expected labels in [0, 10) or equal to ignore_index = -100, got 10 "
                             "at labels[0, 3]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::fused_packed_logprobs(h[0], w, {}, y[0], at::tensor({0, 3}, at::kLong)),
      "prefopt::fused_packed_logprobs: expected cu_seqlens to end at the token count N = 4, got 3");
}

using FusedCuda = prefopt_test::CudaTest;

TEST_F(FusedCuda, MatchesCpu) {
  const int64_t B = 3, T = 40, H = 64, V = 5000;
  const auto labels = make_labels(B, T, V);
  std::vector<GatherBackend> backends{GatherBackend::kATen};
  if (prefopt::has_cuda_kernels()) backends.push_back(GatherBackend::kKernel);
  for (auto st : {at::kFloat, at::kBFloat16}) {
    for (auto backend : backends) {
      for (auto bwd :
           {FusedBackward::kTokenChunks, FusedBackward::kVocabBlocks, FusedBackward::kTiles}) {
        for (double softcap : {0.0, 20.0}) {
          SCOPED_TRACE(::testing::Message()
                       << st << " backend " << static_cast<int>(backend) << " backward "
                       << static_cast<int>(bwd) << " softcap " << softcap);
          const Head cpu(B, T, H, V, true, st);
          const auto h = cpu.h.detach().cuda().requires_grad_(),
                     w = cpu.w.detach().cuda().requires_grad_(),
                     b = cpu.b.detach().cuda().requires_grad_();
          // With a softcap, the scale and the temperature too (their order is the op's own).
          auto opts = FusedLogprobsOptions()
                          .chunk_bytes(V * 16 * 8)
                          .softcap(softcap)
                          .logit_scale(softcap > 0 ? 1.25 : 1.0)
                          .temperature(softcap > 0 ? 0.8 : 1.0)
                          .backward(bwd);
          // With the entropies in the loss: on CUDA their gradient takes the ATen path.
          for (bool entropy : {false, true}) {
            SCOPED_TRACE(::testing::Message() << "entropy " << entropy);
            opts.with_entropy(entropy);
            const auto a = F::fused_logprobs(cpu.h, cpu.w, cpu.b, labels, opts);
            const auto g = F::fused_logprobs(h, w, b, labels.cuda(), opts.backend(backend));
            const double tol = st == at::kFloat ? 1e-3 : 5e-2;
            EXPECT_TRUE(AllClose(g.sum, a.sum, 1e-4, tol * T));
            const auto loss = [&](const prefopt::SequenceLogprobs& lp) {
              return entropy ? lp.sum.sum() + 0.5 * lp.entropy_sum.sum() : lp.sum.sum();
            };
            const auto ga = torch::autograd::grad({loss(a)}, cpu.params());
            const auto gg = torch::autograd::grad({loss(g)}, {h, w, b});
            for (size_t i = 0; i < ga.size(); ++i)
              EXPECT_TRUE(AllClose(gg[i], ga[i], 2e-2, tol * ga[i].abs().max().item<double>()));
          }
        }
      }
    }
  }
}

}  // namespace
