// SPDX-License-Identifier: Apache-2.0
// A user's program: gathers sequence log-probs with prefopt and checks them against the naive
// composite. Exits non-zero on any mismatch.
#include <prefopt/fmt.h>
#include <prefopt/prefopt.h>

#include <cmath>
#include <cstdio>
#include <cstring>

int main() {
  if (std::strcmp(PREFOPT_VERSION_STRING, EXPECTED_VERSION) != 0) {
    std::fprintf(stderr, "version.h says %s, the package %s\n", PREFOPT_VERSION_STRING,
                 EXPECTED_VERSION);
    return 1;
  }
  at::manual_seed(0);
  const auto logits = at::randn({4, 9, 50}).requires_grad_();
  auto labels = at::randint(50, {4, 9}, at::kLong);
  labels.slice(1, 0, 3).fill_(-100);  // prompt
  const auto lp = prefopt::functional::gather_logprobs(logits, labels);
  const auto mask = labels.slice(1, 1) != -100;
  const auto naive = (at::log_softmax(logits.slice(1, 0, 8), -1)
                          .gather(2, labels.slice(1, 1).clamp_min(0).unsqueeze(2))
                          .squeeze(2) *
                      mask)
                         .sum(1);
  const double err = (lp.sum - naive).abs().max().item<double>();
  // One DPO loss on the pairs [0, 1] vs [2, 3], against its formula (reference = 0).
  const auto pair = prefopt::functional::split_pairs(lp);
  const auto dpo = prefopt::functional::dpo_loss(prefopt::PairInputs(pair),
                                                 prefopt::DPOLossOptions().reference_free(true));
  const double dpo_err =
      (dpo.loss - (-at::log_sigmoid(0.1 * (pair.chosen.sum - pair.rejected.sum))).mean())
          .abs()
          .item<double>();
  dpo.loss.backward();
  const bool grad_ok = logits.grad().defined() && logits.grad().isfinite().all().item<bool>();
  // Its metrics, formatted with fmt.
  prefopt::MetricAccumulator metrics;
  metrics.add(dpo, prefopt::PairInputs(pair), pair);
  const auto m = metrics.compute();
  const double margin_err =
      std::abs(m.at("rewards/margins") -
               (0.1 * (pair.chosen.sum - pair.rejected.sum)).mean().item<double>());
  std::printf(
      "prefopt %s consumer: max |prefopt - naive| = %.3g, dpo error %.3g, grad %s, "
      "margin error %.3g\n%s\n",
      PREFOPT_VERSION_STRING, err, dpo_err, grad_ok ? "ok" : "MISSING", margin_err,
      fmt::format("{}", m).c_str());
  return err < 1e-4 && dpo_err < 1e-6 && grad_ok && margin_err < 1e-6 ? 0 : 1;
}
