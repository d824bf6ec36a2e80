// SPDX-License-Identifier: Apache-2.0
// prefopt-eval, run as a user runs it: JSON in (file or stdin), JSON out, exit status.
#include <prefopt/prefopt.h>
#include <sys/wait.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
using json = nlohmann::json;

namespace {

struct Run {
  json out;
  int status = -1;
};

/// Runs prefopt-eval on `request` (through a file, or standard input with `stdin_mode`).
Run run_eval(const std::string& request, bool stdin_mode = false) {
  const auto dir = std::filesystem::temp_directory_path();
  const auto file = dir / ("prefopt_eval_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream f(file);
    f << request;
  }
  const std::string cmd = stdin_mode
                              ? std::string(PREFOPT_EVAL) + " < " + file.string() + " 2>/dev/null"
                              : std::string(PREFOPT_EVAL) + " " + file.string() + " 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int rc = ::pclose(p);
  std::filesystem::remove(file);
  Run r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  r.out = json::parse(text);
  return r;
}

const char* kPair = R"("inputs": {
  "policy_chosen_logps": [-12.5, -30.25, -7.0, -18.0],
  "policy_rejected_logps": [-14.0, -28.5, -9.5, -18.0],
  "reference_chosen_logps": [-13.0, -29.0, -8.0, -17.5],
  "reference_rejected_logps": [-13.5, -29.5, -8.5, -18.5],
  "chosen_lengths": [5, 12, 3, 0],
  "rejected_lengths": [6, 11, 4, 7]})";

at::Tensor vec(const json& j) { return at::tensor(j.get<std::vector<double>>(), at::kDouble); }

prefopt::PairInputs pair_inputs() {
  return prefopt::PairInputs()
      .policy_chosen_logps(at::tensor({-12.5, -30.25, -7.0, -18.0}, at::kDouble))
      .policy_rejected_logps(at::tensor({-14.0, -28.5, -9.5, -18.0}, at::kDouble))
      .reference_chosen_logps(at::tensor({-13.0, -29.0, -8.0, -17.5}, at::kDouble))
      .reference_rejected_logps(at::tensor({-13.5, -29.5, -8.5, -18.5}, at::kDouble))
      .chosen_lengths(at::tensor({5, 12, 3, 0}, at::kLong))
      .rejected_lengths(at::tensor({6, 11, 4, 7}, at::kLong));
}

}  // namespace

TEST(PrefoptEval, RoundTripEqualsLibrary) {
  const auto r =
      run_eval(std::string(R"({"loss": "ipo", "params": {"beta": 0.3}, )") + kPair + "}");
  ASSERT_EQ(r.status, 0) << r.out.dump();
  const auto lib = F::dpo_loss(
      pair_inputs(), prefopt::DPOLossOptions().loss_type(prefopt::DPOLossType::kIPO).beta(0.3));
  // JSON carries 17 significant digits: the float64 values come back exactly.
  EXPECT_EQ(r.out["loss"].get<double>(), lib.loss.item<double>());
  EXPECT_TRUE(at::equal(vec(r.out["losses"]), lib.losses));
  EXPECT_TRUE(at::equal(vec(r.out["chosen_rewards"]), lib.chosen_rewards));
  EXPECT_TRUE(at::equal(vec(r.out["rejected_rewards"]), lib.rejected_rewards));
  const auto& m = r.out["metrics"];
  EXPECT_DOUBLE_EQ(m["rewards/margins"].get<double>(),
                   (lib.chosen_rewards - lib.rejected_rewards).mean().item<double>());
  // ρ_c vs ρ_r per pair: 0.5 > −0.5, −1.25 < 1, 1 > −1, −0.5 < 0.5.
  EXPECT_DOUBLE_EQ(m["rewards/accuracies"].get<double>(), 0.5);
}

TEST(PrefoptEval, EveryFamilyAndStdin) {
  // Δ = 0 everywhere: sigmoid gives ln 2 whatever β, via the `dpo` form with a list.
  const auto zero = R"({"loss": "dpo", "params": {"loss_type": ["sigmoid"], "loss_weights": [1.0]},
    "inputs": {"policy_chosen_logps": [-1, -2], "policy_rejected_logps": [-3, -4],
               "reference_chosen_logps": [-1, -2], "reference_rejected_logps": [-3, -4]}})";
  const auto z = run_eval(zero, /*stdin_mode=*/true);
  ASSERT_EQ(z.status, 0) << z.out.dump();
  EXPECT_DOUBLE_EQ(z.out["loss"].get<double>(), std::log(2.0));

  const auto orpo =
      run_eval(R"({"loss": "orpo", "params": {"beta": 0.2, "nll_normalization": "sequence_mean"},
    "inputs": {"policy_chosen_logps": [-0.3, -1e-7], "policy_rejected_logps": [-1.2, -0.9]}})");
  ASSERT_EQ(orpo.status, 0) << orpo.out.dump();
  const auto lib = F::orpo_loss(prefopt::PairInputs()
                                    .policy_chosen_logps(at::tensor({-0.3, -1e-7}, at::kDouble))
                                    .policy_rejected_logps(at::tensor({-1.2, -0.9}, at::kDouble)),
                                prefopt::ORPOLossOptions().beta(0.2).nll_normalization(
                                    prefopt::NLLNormalization::kSequenceMean));
  EXPECT_EQ(orpo.out["loss"].get<double>(), lib.loss.item<double>());
  EXPECT_EQ(orpo.out["metrics"]["log_odds_ratio"].get<double>(),
            lib.log_odds_ratio.mean().item<double>());
  EXPECT_EQ(orpo.out["metrics"]["log_odds_chosen"].get<double>(),
            lib.log_odds_chosen.mean().item<double>());
  EXPECT_TRUE(orpo.out["metrics"].contains("nll_loss"));

  const auto simpo =
      run_eval(R"({"loss": "cpo", "params": {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0},
    "inputs": {"policy_chosen_logps": [-0.5, -10.0, -1.0], "policy_rejected_logps": [-0.1, -30.0, -21.0]}})");
  ASSERT_EQ(simpo.status, 0) << simpo.out.dump();
  EXPECT_NEAR(simpo.out["losses"][0].get<double>(), -std::log(1 / (1 + std::exp(1.3))), 1e-12);
  // The paper's defaults (β = 2, γ = 0.5, no NLL) under the name "simpo": torchtune's literal.
  const auto paper =
      run_eval(R"({"loss": "simpo", "inputs": {"policy_chosen_logps": [-0.5, -10.0, -1.0],
    "policy_rejected_logps": [-0.1, -30.0, -21.0]}})");
  ASSERT_EQ(paper.status, 0) << paper.out.dump();
  EXPECT_EQ(paper.out["losses"], simpo.out["losses"]);
  EXPECT_FALSE(paper.out["metrics"].contains("nll_loss"));

  const auto kto = run_eval(R"({"loss": "kto", "params": {"beta": 0.1},
    "inputs": {"policy_chosen_logps": [-0.5, -10.0, -1.0], "policy_rejected_logps": [-0.1, -30.0, -21.0],
               "reference_chosen_logps": [-0.5, -10.1, -0.1], "reference_rejected_logps": [-0.1, -20.1, -0.1],
               "policy_KL_logps": [-1.0, 0.25, 1.0], "reference_KL_logps": [0.4, 0.2, -0.2]}})");
  ASSERT_EQ(kto.status, 0) << kto.out.dump();
  EXPECT_NEAR(kto.out["losses"][5].get<double>(), 0.1101, 1e-4);  // torchtune's literal
  EXPECT_EQ(kto.out["metrics"]["kl"].get<double>(), 0.0);

  const auto apo = run_eval(R"({"loss": "apo_zero_unpaired", "inputs": {
    "policy_rejected_logps": [-3.0], "reference_rejected_logps": [-2.0]}})");
  ASSERT_EQ(apo.status, 0) << apo.out.dump();
  EXPECT_NEAR(apo.out["loss"].get<double>(), 1 / (1 + std::exp(0.1)), 1e-15);  // σ(β·(−1))
}

TEST(PrefoptEval, ArrayKeepsAnsweringAfterAnError) {
  const auto r =
      run_eval(std::string("[") + R"({"loss": "sigmoid", )" + kPair + "}, " +
               R"({"loss": "kto_pair", "inputs": {}}, )" + R"({"loss": "hinge", )" + kPair + "}]");
  EXPECT_EQ(r.status, 2);
  ASSERT_TRUE(r.out.is_array());
  ASSERT_EQ(r.out.size(), 3u);
  EXPECT_TRUE(r.out[0].contains("loss"));
  EXPECT_NE(r.out[1]["error"].get<std::string>().find("unknown loss 'kto_pair'"),
            std::string::npos);
  EXPECT_TRUE(r.out[2].contains("loss"));
}

TEST(PrefoptEval, ErrorPaths) {
  auto error_of = [](const std::string& req) {
    const auto r = run_eval(req);
    EXPECT_EQ(r.status, 2) << req;
    const auto& o = r.out.is_array() && !r.out.empty() ? r.out[0] : r.out;
    return o.value("error", std::string("<no error field>"));
  };
  auto has = [](const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; };
  EXPECT_TRUE(has(error_of("{not json"), "malformed JSON"));
  EXPECT_TRUE(has(error_of(R"({"loss": "nope", "inputs": {}})"), "unknown loss 'nope'"));
  EXPECT_TRUE(
      has(error_of(std::string(R"({"loss": "sigmoid", "params": {"betta": 0.1}, )") + kPair + "}"),
          "unknown param 'betta'"));
  EXPECT_TRUE(has(error_of(std::string(R"({"loss": "sigmoid", "params": {"loss_type": "ipo"}, )") +
                           kPair + "}"),
                  "unknown param 'loss_type'"));
  EXPECT_TRUE(
      has(error_of(std::string(R"({"loss": "sigmoid", "params": {"beta": "0.1"}, )") + kPair + "}"),
          "param 'beta' must be a number"));
  EXPECT_TRUE(
      has(error_of(std::string(R"({"loss": "sigmoid", "params": {"beta": -1}, )") + kPair + "}"),
          "prefopt::dpo_loss: expected beta > 0, got -1"));
  EXPECT_TRUE(has(error_of(R"({"loss": "sigmoid", "inputs": {"policy_chosen_logps": "x"}})"),
                  "input 'policy_chosen_logps' must be an array of numbers"));
  EXPECT_TRUE(has(error_of(R"({"loss": "sigmoid", "inputs": {"policy_chosen_logps": [1, null]}})"),
                  "must be an array of numbers"));
  EXPECT_TRUE(has(error_of(R"({"loss": "sigmoid", "inputs": {"policy_chosen_logps": [-1],
      "policy_rejected_logps": [-1, -2], "reference_chosen_logps": [-1], "reference_rejected_logps": [-1]}})"),
                  "expected policy_rejected_logps of shape [1]"));
  EXPECT_TRUE(
      has(error_of(R"({"loss": "kto", "inputs": {"policy_chosen_logps": [-1], "extra": [1]}})"),
          "unknown input 'extra'"));
  EXPECT_TRUE(has(error_of(R"({"loss": "sigmoid"})"), "a request needs \"inputs\""));
  EXPECT_TRUE(has(error_of(R"({"loss": "sigmoid", "inputs": {}, "mode": 1})"),
                  "unknown request field 'mode'"));
  EXPECT_TRUE(has(error_of(R"([1])"), "a request must be an object"));
}
