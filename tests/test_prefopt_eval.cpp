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
  json out;  ///< discarded when stdout is not JSON
  std::string text;
  int status = -1;
};

/// Runs prefopt-eval with the shell arguments `args`.
Run run_args(const std::string& args) {
  const std::string cmd = std::string(PREFOPT_EVAL) + " " + args + " 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int rc = ::pclose(p);
  Run r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  // Not throwing: a crash (nothing on stdout) must fail the test's checks, not end it.
  r.out = json::parse(text, nullptr, /*allow_exceptions=*/false);
  r.text = std::move(text);
  return r;
}

/// Runs prefopt-eval on `request` (through a file, or standard input with `stdin_mode`), with
/// the command-line options `options`.
Run run_eval(const std::string& request, bool stdin_mode = false, const std::string& options = "") {
  const auto dir = std::filesystem::temp_directory_path();
  const auto file = dir / ("prefopt_eval_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream f(file);
    f << request;
  }
  Run r = run_args(options + (stdin_mode ? " < " : " ") + file.string());
  std::filesystem::remove(file);
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
  // JSON carries each double's shortest round-trip form: the float64 values come back exactly.
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
  EXPECT_EQ(simpo.out["metrics"]["nll_loss"].get<double>(), 0.0);  // TRL's CPOTrainer logs 0
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

// Issue #16's four repros, as the issue states them, against TRL's numbers (computed by hand
// in double from TRL's formulas here).
TEST(PrefoptEval, Trl1xRepros) {
  const auto orpo = run_eval(R"({"loss":"orpo","params":{"beta":0.1},"inputs":{
    "policy_chosen_logps":[-800.0],"policy_rejected_logps":[-1.0],"nll_loss":800.0}})");
  ASSERT_EQ(orpo.status, 0) << orpo.out.dump();
  const double log_odds = (-800.0 + 1.0) + std::log(-std::expm1(-1.0));  // −log(1 − e^−800) = 0
  EXPECT_NEAR(orpo.out["metrics"]["log_odds_chosen"].get<double>(), log_odds, 1e-12);
  EXPECT_NEAR(orpo.out["metrics"]["log_odds_chosen"].get<double>(), -799.4587, 1e-4);
  EXPECT_NEAR(orpo.out["loss"].get<double>(), 879.9459, 1e-4);

  const auto mpo = run_eval(R"({"loss":"dpo","params":{"beta":1.0,"loss_type":["sigmoid","sft"],
    "loss_weights":[1.0,0.5],"weighted_rewards":true},"inputs":{"policy_chosen_logps":[-1.0],
    "policy_rejected_logps":[-2.0],"reference_chosen_logps":[-1.5],"reference_rejected_logps":[-1.5],
    "nll_loss":1.0}})");
  ASSERT_EQ(mpo.status, 0) << mpo.out.dump();
  EXPECT_DOUBLE_EQ(mpo.out["chosen_rewards"][0].get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(mpo.out["rejected_rewards"][0].get<double>(), -0.75);

  const auto free = run_eval(R"({"loss":"sigmoid","params":{"beta":1.0,"reference_free":true},
    "inputs":{"policy_chosen_logps":[-1.0],"policy_rejected_logps":[-2.0],
    "reference_chosen_logps":[-3.0],"reference_rejected_logps":[-1.0]}})");
  ASSERT_EQ(free.status, 0) << free.out.dump();
  EXPECT_DOUBLE_EQ(free.out["chosen_rewards"][0].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(free.out["rejected_rewards"][0].get<double>(), -1.0);

  // ["sigmoid","robust"], β 0.1, ε 0.1: sigmoid ignores ε, robust takes it.
  const auto mixed = run_eval(R"({"loss":"dpo","params":{"beta":0.1,"label_smoothing":0.1,
    "loss_type":["sigmoid","robust"]},"inputs":{"policy_chosen_logps":[-3.0],
    "policy_rejected_logps":[-9.0],"reference_chosen_logps":[-4.0],"reference_rejected_logps":[-5.0]}})");
  ASSERT_EQ(mixed.status, 0) << mixed.out.dump();
  const double z = 0.1 * ((-3.0 + 4.0) - (-9.0 + 5.0));
  const double ls = -std::log1p(std::exp(-z)), lsn = -z - std::log1p(std::exp(-z));
  EXPECT_NEAR(mixed.out["loss"].get<double>(), -ls + (-(0.9) * ls + 0.1 * lsn) / 0.8, 1e-14);
  const auto cdpo = run_eval(R"({"loss":"sigmoid","params":{"beta":0.1,"label_smoothing":0.1,
    "cdpo":true},"inputs":{"policy_chosen_logps":[-3.0],"policy_rejected_logps":[-9.0],
    "reference_chosen_logps":[-4.0],"reference_rejected_logps":[-5.0]}})");
  ASSERT_EQ(cdpo.status, 0) << cdpo.out.dump();
  EXPECT_NEAR(cdpo.out["loss"].get<double>(), -0.9 * ls - 0.1 * lsn, 1e-14);
}

TEST(PrefoptEval, TpoRequest) {
  // tpo-l on means (sums / lengths), β 2, γ 0.5, plus the gold NLL 6 / 4 with tpo_alpha 1.
  const auto r = run_eval(R"({"loss":"tpo","inputs":{
    "policy_chosen_logps":[-6.0,-10.0],"policy_rejected_logps":[-9.0,-8.0],
    "chosen_lengths":[3,5],"rejected_lengths":[3,2],"gold_logps":[-4.0,-2.0],"gold_lengths":[2,2]},
    "params":{"loss_type":"tpo-l","beta":2.0,"logps_form":"sum"}})");
  ASSERT_EQ(r.status, 0) << r.out.dump();
  double expected = 6.0 / 4.0;
  for (auto [c, rj] : {std::pair<double, double>{-2.0, -3.0}, {-2.0, -4.0}}) {
    const double x = 2.0 * (c - rj) - 0.5;
    expected += std::log1p(std::exp(-x)) / 2;
  }
  EXPECT_NEAR(r.out["loss"].get<double>(), expected, 1e-14);
}

// The metric reducer: two micro-steps of 1 and 3 chosen tokens, on two ranks in the second
// request; answered under both windows.
TEST(PrefoptEval, MetricsRequest) {
  const std::string step = R"({"loss":"sigmoid","inputs":{"policy_chosen_logps":[-2.0],
      "policy_rejected_logps":[-3.0],"reference_chosen_logps":[-2.5],"reference_rejected_logps":[-2.5]},
      "tokens":{"chosen":{"count":[N],"logits_sum":[L],"correct":[N],"entropy_sum":[N]},
                "rejected":{"count":[N],"logits_sum":[0],"correct":[0],"entropy_sum":[N]}},
      "scalars":{"grad_norm":G}})";
  auto make = [&](const char* n, const char* l, const char* g) {
    std::string s = step;
    for (auto [key, value] :
         {std::pair<std::string, std::string>{"[N]", std::string("[") + n + "]"},
          {"[L]", std::string("[") + l + "]"},
          {"G}", std::string(g) + "}"}}) {
      for (size_t at = s.find(key); at != std::string::npos; at = s.find(key))
        s.replace(at, key.size(), value);
    }
    return s;
  };
  const auto r = run_eval(R"({"metrics":{},"steps":[)" + make("1", "-0.8", "1.0") + "," +
                          make("3", "-0.1", "3.0") + "]}");
  ASSERT_EQ(r.status, 0) << r.out.dump();
  const auto& mos = r.out["metrics"]["mean_of_steps"];
  const auto& cw = r.out["metrics"]["count_weighted"];
  EXPECT_DOUBLE_EQ(mos["logits/chosen"].get<double>(), (-0.8 + -0.1 / 3) / 2);
  EXPECT_DOUBLE_EQ(cw["logits/chosen"].get<double>(), -0.9 / 4);
  EXPECT_DOUBLE_EQ(mos["mean_token_accuracy"].get<double>(), 1.0);  // chosen side only
  EXPECT_DOUBLE_EQ(mos["entropy"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(mos["grad_norm"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(mos["rewards/chosen"].get<double>(), 0.1 * 0.5);
  EXPECT_DOUBLE_EQ(mos["num_tokens"].get<double>(), 8.0);
  // Two ranks per micro-step: tokens pool over the ranks within a step.
  const auto two =
      run_eval(R"({"steps":[[)" + make("1", "-0.8", "1.0") + "," + make("3", "-0.1", "1.0") +
               "],[" + make("2", "-1.0", "1.0") + "," + make("2", "1.0", "1.0") + "]]}");
  ASSERT_EQ(two.status, 0) << two.out.dump();
  EXPECT_DOUBLE_EQ(two.out["metrics"]["mean_of_steps"]["logits/chosen"].get<double>(),
                   (-0.9 / 4 + 0.0 / 4) / 2);
  const auto bad = run_eval(R"({"steps":[[)" + make("1", "-0.8", "1.0") + "],[" +
                            make("2", "-1.0", "1.0") + "," + make("2", "1.0", "1.0") + "]]}");
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(
      bad.out["error"].get<std::string>().find("micro-step 1 has 2 ranks, micro-step 0 has 1"),
      std::string::npos);
}

// Token statistics that no gather returns are errors, not metrics: fields of different sizes
// (mean_token_accuracy 8.3 before), counts below 0 or not whole, more correct tokens than
// counted ones.
TEST(PrefoptEval, MetricsRequestRefusesImpossibleTokens) {
  const std::string pair = R"("loss":"sigmoid","inputs":{"policy_chosen_logps":[-1,-2],
      "policy_rejected_logps":[-2,-3],"reference_chosen_logps":[-1,-1],"reference_rejected_logps":[-1,-1]})";
  const auto error_of = [&](const std::string& chosen) {
    const auto r = run_eval(R"({"steps":[{)" + pair + R"(,"tokens":{"chosen":)" + chosen + "}}]}");
    EXPECT_EQ(r.status, 2) << chosen << " -> " << r.text;
    return r.out.value("error", std::string("<no error field>"));
  };
  auto has = [](const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; };
  EXPECT_TRUE(has(error_of(R"({"count":[1,2],"logits_sum":[5],"correct":[1,2]})"),
                  "chosen log-probs' logits_sum to hold one value per sequence"));
  EXPECT_TRUE(has(error_of(R"({"count":[3],"correct":[2]})"),
                  "chosen log-probs of one sequence per chosen reward (2), got 1"));
  EXPECT_TRUE(has(error_of(R"({"count":[-1,2]})"),
                  "\"tokens\".\"chosen\".\"count\" must hold whole numbers >= 0, got -1.0 at 0"));
  EXPECT_TRUE(has(error_of(R"({"count":[1,2.5]})"), "got 2.5 at 1"));
  EXPECT_TRUE(
      has(error_of(R"({"count":[1,2],"correct":[2,2]})"), "\"correct\" must not exceed \"count\""));
}

// A batch without pairs has no reward metrics (TRL's mean would be NaN; the reducer leaves
// them out), not accuracies and margins of 0.
TEST(PrefoptEval, NoPairsNoRewardMetrics) {
  const auto r = run_eval(R"({"loss":"sigmoid","inputs":{"policy_chosen_logps":[],
    "policy_rejected_logps":[],"reference_chosen_logps":[],"reference_rejected_logps":[]}})");
  ASSERT_EQ(r.status, 0) << r.text;
  EXPECT_EQ(r.out["metrics"], json::object()) << r.text;
}

// The file argument: a directory is not read as empty JSON, and the reason is given.
TEST(PrefoptEval, UnreadableFileSaysWhy) {
  const auto dir = run_args(std::filesystem::temp_directory_path().string());
  EXPECT_EQ(dir.status, 2) << dir.text;
  EXPECT_NE(dir.out.value("error", "").find("is a directory"), std::string::npos) << dir.text;
  const auto missing = run_args("/nonexistent/prefopt_eval_request.json");
  EXPECT_EQ(missing.status, 2) << missing.text;
  EXPECT_NE(missing.out.value("error", "").find("No such file or directory"), std::string::npos)
      << missing.text;
  // --help names both kinds of request.
  const auto help = run_args("--help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.text.find("\"steps\""), std::string::npos) << help.text;
}

// Issue #20: input that made the tool abort (exit 134, nothing on stdout) gets an error answer.
TEST(PrefoptEval, HostileInputGetsAnErrorAnswer) {
  // A number beyond double's range: the JSON library's out_of_range, not a parse_error.
  const auto huge = run_eval(R"({"loss":"sigmoid","params":{"beta":1e400},"inputs":{}})",
                             /*stdin_mode=*/true);
  EXPECT_EQ(huge.status, 2) << huge.text;
  ASSERT_TRUE(huge.out.is_object()) << huge.text;
  EXPECT_NE(huge.out.value("error", "").find("number overflow"), std::string::npos) << huge.text;
  // An invalid UTF-8 byte, which the parser's message quotes: written as U+FFFD.
  const auto byte = run_eval("{\"\xff\":1}", /*stdin_mode=*/true);
  EXPECT_EQ(byte.status, 2) << byte.text;
  ASSERT_TRUE(byte.out.is_object()) << byte.text;
  EXPECT_NE(byte.out.value("error", "").find("malformed JSON"), std::string::npos) << byte.text;
}

// Issue #20: --indent 1026 and more read past nlohmann-json's indent buffer; it is bounded.
TEST(PrefoptEval, IndentIsBounded) {
  const std::string req = std::string(R"({"loss": "sigmoid", )") + kPair + "}";
  const auto ok = run_eval(req, false, "--indent 16");
  EXPECT_EQ(ok.status, 0) << ok.text;
  EXPECT_TRUE(ok.out.contains("loss")) << ok.text;
  // A bad command line exits 2 as every other error does (it was CLI11's 105 and 109).
  for (const char* bad : {"--indent 17", "--indent 2000", "--indent -3", "--bogus"}) {
    const auto r = run_eval(req, false, bad);
    EXPECT_EQ(r.status, 2) << bad;
    EXPECT_TRUE(r.text.empty()) << bad;  // not the text: before the bound, it held heap bytes
  }
}

// A metrics request's errors name the field that is wrong: they used to call "metrics" the
// loss's "params" ("\"params\" must be an object", "unknown param 'window' for this loss") and
// a "tokens" side's fields a loss's inputs. A pairwise step with one side's token statistics
// used to be answered with that side's entropy alone.
TEST(PrefoptEval, MetricsRequestErrorsNameTheField) {
  const std::string pair = R"("loss":"sigmoid","inputs":{"policy_chosen_logps":[-1,-2],
      "policy_rejected_logps":[-2,-3],"reference_chosen_logps":[-1,-1],"reference_rejected_logps":[-1,-1]})";
  const auto error_of = [&](const std::string& metrics, const std::string& tokens) {
    const auto r = run_eval("{" + metrics + R"("steps":[{)" + pair + tokens + "}]}");
    EXPECT_EQ(r.status, 2) << metrics << tokens << " -> " << r.text;
    return r.out.value("error", std::string("<no error field>"));
  };
  auto has = [](const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; };
  EXPECT_TRUE(has(error_of(R"("metrics":5,)", ""), "\"metrics\" must be an object"));
  EXPECT_TRUE(has(error_of(R"("metrics":{"window":1},)", ""),
                  "unknown \"metrics\" field 'window'; known: logits, prefix"));
  EXPECT_TRUE(
      has(error_of(R"("metrics":{"prefix":1},)", ""), "\"metrics\".\"prefix\" must be a string"));
  EXPECT_TRUE(has(error_of(R"("metrics":{"logits":"unmasked"},)", ""),
                  "\"metrics\".\"logits\" must be \"scored\" or \"all_positions\""));
  const std::string both = R"(,"rejected":{"count":[1,1]}})";
  EXPECT_TRUE(has(error_of("", R"(,"tokens":{"chosen":{"count":[1,2],"foo":[1,1]})" + both),
                  "unknown \"tokens\".\"chosen\" field 'foo'; known: correct, count"));
  EXPECT_TRUE(has(error_of("", R"(,"tokens":{"chosen":{"count":5})" + both),
                  "\"tokens\".\"chosen\".\"count\" must be an array of numbers"));
  EXPECT_TRUE(has(error_of("", R"(,"tokens":{"chosen":{"count":[1,2],"entropy_sum":[1,1]}})"),
                  "expected the rejected log-probs' token statistics (count, or positions), one "
                  "sequence per rejected reward (2), got none"));
  // Token statistics from one rank of a micro-step only: the other rank's tokens used to be
  // left out of the step's entropy and logits/*.
  const std::string tokens = R"(,"tokens":{"chosen":{"count":[1,1],"entropy_sum":[1,1]},
      "rejected":{"count":[1,1],"entropy_sum":[1,1]}})";
  const auto mixed = run_eval(R"({"steps":[[{)" + pair + tokens + "},{" + pair + "}]]}");
  EXPECT_EQ(mixed.status, 2) << mixed.text;
  EXPECT_TRUE(has(mixed.out.value("error", ""),
                  "micro-step 0, rank 1 has no \"tokens\" where micro-step 0, rank 0 has them"))
      << mixed.text;
  const auto later = run_eval(R"({"steps":[{)" + pair + "},{" + pair + tokens + "}]}");
  EXPECT_TRUE(has(later.out.value("error", ""),
                  "micro-step 1, rank 0 has \"tokens\" where micro-step 0, rank 0 has none"))
      << later.text;
}
