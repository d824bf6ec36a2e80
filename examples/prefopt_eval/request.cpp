// SPDX-License-Identifier: Apache-2.0
// prefopt-eval's request handling: JSON text in, JSON answer out. The tool (main.cpp) and its
// fuzz target (tests/fuzz/fuzz_eval.cpp) both call prefopt_eval::handle.
#include "request.h"

#include <prefopt/prefopt.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace F = prefopt::functional;
using json = nlohmann::json;

namespace prefopt_eval {
namespace {

/// A request that cannot be answered; its message goes to {"error": ...}.
struct RequestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string join(const std::set<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

/// How errors name an object of a request and its keys: a loss's "params" ("param 'beta'",
/// "unknown param 'x' for this loss"), or, with `path` (e.g. "\"metrics\""), any other object
/// ("\"metrics\".\"prefix\"", "unknown \"metrics\" field 'x'"), so that a message points at the
/// field the input got wrong.
struct Where {
  std::string object;  ///< "params" or "inputs" for a loss's; empty with `path`
  std::string path;    ///< the object's JSON path, or empty for a loss's

  std::string whole() const { return path.empty() ? "\"" + object + "\"" : path; }
  std::string key(const std::string& k) const {
    if (!path.empty()) return path + ".\"" + k + "\"";
    return (object == "params" ? "param '" : "input '") + k + "'";
  }
  std::string unknown(const std::string& k) const {
    if (!path.empty()) return "unknown " + path + " field '" + k + "'";
    return "unknown " + std::string(object == "params" ? "param '" : "input '") + k +
           "' for this loss";
  }
};

/// The request's params, each read at most once; anything left over is unknown.
class Params {
 public:
  Params(const json& params, std::set<std::string> allowed, Where where = {"params", ""})
      : p_(params), allowed_(std::move(allowed)), where_(std::move(where)) {
    if (!p_.is_object()) throw RequestError(where_.whole() + " must be an object");
    for (const auto& [key, value] : p_.items()) {
      if (!allowed_.count(key))
        throw RequestError(where_.unknown(key) + "; known: " + join(allowed_));
    }
  }
  bool has(const std::string& k) const { return p_.contains(k); }
  double number(const std::string& k, double fallback) const {
    if (!has(k)) return fallback;
    if (!p_[k].is_number()) throw RequestError(where_.key(k) + " must be a number");
    return p_[k].get<double>();
  }
  bool boolean(const std::string& k, bool fallback) const {
    if (!has(k)) return fallback;
    if (!p_[k].is_boolean()) throw RequestError(where_.key(k) + " must be true or false");
    return p_[k].get<bool>();
  }
  std::string string(const std::string& k, const std::string& fallback) const {
    if (!has(k)) return fallback;
    if (!p_[k].is_string()) throw RequestError(where_.key(k) + " must be a string");
    return p_[k].get<std::string>();
  }
  const json& raw(const std::string& k) const { return p_[k]; }
  /// How errors name key `k`.
  std::string name(const std::string& k) const { return where_.key(k); }

 private:
  const json& p_;
  std::set<std::string> allowed_;
  Where where_;
};

class Inputs {
 public:
  Inputs(const json& inputs, std::set<std::string> allowed, Where where = {"inputs", ""})
      : in_(inputs), where_(std::move(where)) {
    if (!in_.is_object()) throw RequestError(where_.whole() + " must be an object");
    for (const auto& [key, value] : in_.items()) {
      if (!allowed.count(key))
        throw RequestError(where_.unknown(key) + "; known: " + join(allowed));
    }
  }
  /// [N] float64 tensor, or an undefined one when absent.
  at::Tensor vector(const std::string& k) const {
    if (!in_.contains(k)) return {};
    const auto& v = in_[k];
    if (!v.is_array()) throw RequestError(where_.key(k) + " must be an array of numbers");
    std::vector<double> xs;
    xs.reserve(v.size());
    for (const auto& x : v) {
      if (!x.is_number()) throw RequestError(where_.key(k) + " must be an array of numbers");
      xs.push_back(x.get<double>());
    }
    return at::tensor(xs, at::kDouble).reshape({static_cast<int64_t>(xs.size())});
  }
  /// 0-dim float64 tensor, or undefined when absent.
  at::Tensor scalar(const std::string& k) const {
    if (!in_.contains(k)) return {};
    if (!in_[k].is_number()) throw RequestError(where_.key(k) + " must be a number");
    return at::scalar_tensor(in_[k].get<double>(), at::kDouble);
  }

 private:
  const json& in_;
  Where where_;
};

json to_json(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  const auto c = t.detach().to(at::kDouble).contiguous();
  if (c.dim() == 0) return c.item<double>();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

double mean_or_zero(const at::Tensor& t) {
  return t.numel() == 0 ? 0.0 : t.to(at::kDouble).mean().item<double>();
}

prefopt::LossReduction reduction(const Params& p) {
  const auto r = p.string("reduction", "mean");
  if (r == "mean") return torch::kMean;
  if (r == "sum") return torch::kSum;
  if (r == "none") return torch::kNone;
  throw RequestError("param 'reduction' must be \"mean\", \"sum\" or \"none\", got \"" + r + "\"");
}

prefopt::NLLNormalization nll_normalization(const Params& p) {
  const auto n = p.string("nll_normalization", "token_mean");
  if (n == "token_mean") return prefopt::NLLNormalization::kTokenMean;
  if (n == "sequence_mean") return prefopt::NLLNormalization::kSequenceMean;
  throw RequestError(
      "param 'nll_normalization' must be \"token_mean\" or \"sequence_mean\", got \"" + n + "\"");
}

const std::set<std::string> kPairInputs = {"policy_chosen_logps",
                                           "policy_rejected_logps",
                                           "reference_chosen_logps",
                                           "reference_rejected_logps",
                                           "chosen_lengths",
                                           "rejected_lengths",
                                           "weights",
                                           "nll_loss"};

/// The form of the request's log-probs: `logps_form` ("sum" or "mean") when given, else
/// `native`, the form the anchor's loss function receives them in.
prefopt::LogpsForm logps_form(const Params& p, prefopt::LogpsForm native) {
  if (!p.has("logps_form")) return native;
  const auto f = p.string("logps_form", "");
  if (f == "sum") return prefopt::LogpsForm::kSum;
  if (f == "mean") return prefopt::LogpsForm::kMean;
  throw RequestError("param 'logps_form' must be \"sum\" or \"mean\", got \"" + f + "\"");
}

prefopt::PairInputs pair_inputs(const Inputs& in, prefopt::LogpsForm form) {
  return prefopt::PairInputs()
      .policy_chosen_logps(in.vector("policy_chosen_logps"))
      .policy_rejected_logps(in.vector("policy_rejected_logps"))
      .reference_chosen_logps(in.vector("reference_chosen_logps"))
      .reference_rejected_logps(in.vector("reference_rejected_logps"))
      .chosen_lengths(in.vector("chosen_lengths"))
      .rejected_lengths(in.vector("rejected_lengths"))
      .weights(in.vector("weights"))
      .nll_loss(in.scalar("nll_loss"))
      .logps_form(form);
}

/// TRL's logged reward metrics of a pairwise batch; none for a batch without pairs (as the
/// metric reducer leaves out a metric without examples, where TRL's mean would be NaN).
json pair_metrics(const at::Tensor& chosen, const at::Tensor& rejected) {
  json m = json::object();
  if (chosen.numel() == 0) return m;
  m["rewards/chosen"] = mean_or_zero(chosen);
  m["rewards/rejected"] = mean_or_zero(rejected);
  m["rewards/accuracies"] = mean_or_zero((chosen > rejected).to(at::kDouble));  // ties: 0
  m["rewards/margins"] = mean_or_zero(chosen - rejected);
  return m;
}

/// One loss request evaluated: its answer, and how to add it as a micro-step to a metric
/// accumulator (with the policy's token statistics, when the request gave them).
struct Evaluated {
  json answer;
  std::function<void(prefopt::MetricAccumulator&, const prefopt::PairLogprobs*)> feed;
};

/// `feed` for the pairwise results (DPO, CPO/SimPO, TPO, ORPO).
template <typename Result>
Evaluated pairwise(json answer, const Result& r, const prefopt::PairInputs& in) {
  return {std::move(answer),
          [r, in](prefopt::MetricAccumulator& acc, const prefopt::PairLogprobs* tokens) {
            if (tokens != nullptr) {
              acc.add(r, in, *tokens);
            } else {
              acc.add(r, in);
            }
          }};
}

json result(const at::Tensor& loss, const at::Tensor& losses, const at::Tensor& chosen,
            const at::Tensor& rejected, json metrics) {
  return {{"loss", to_json(loss)},
          {"losses", to_json(losses)},
          {"chosen_rewards", to_json(chosen)},
          {"rejected_rewards", to_json(rejected)},
          {"metrics", std::move(metrics)}};
}

Evaluated eval_dpo(const std::string& loss, const json& params, const json& inputs) {
  std::set<std::string> allowed = {"beta",
                                   "label_smoothing",
                                   "cdpo",
                                   "logps_form",
                                   "loss_weights",
                                   "f_divergence_type",
                                   "f_alpha_divergence_coef",
                                   "discopop_tau",
                                   "reference_free",
                                   "rpo_alpha",
                                   "ipo_normalization",
                                   "nll_normalization",
                                   "weighted_rewards",
                                   "reduction"};
  if (loss == "dpo") allowed.insert("loss_type");
  const Params p(params, allowed);
  auto in_names = kPairInputs;
  in_names.insert("bco_delta");
  const Inputs in(inputs, in_names);

  prefopt::DPOLossOptions o;
  if (loss != "dpo") {
    o.loss_type(prefopt::dpo_loss_type_from_name(loss));
  } else if (p.has("loss_type")) {
    const auto& t = p.raw("loss_type");
    if (t.is_string()) {
      o.loss_type(prefopt::dpo_loss_type_from_name(t.get<std::string>()));
    } else if (t.is_array()) {
      std::vector<prefopt::DPOLossType> types;
      for (const auto& x : t) {
        if (!x.is_string())
          throw RequestError("param 'loss_type' must be a name or a list of names");
        types.push_back(prefopt::dpo_loss_type_from_name(x.get<std::string>()));
      }
      o.loss_type(types);
    } else {
      throw RequestError("param 'loss_type' must be a name or a list of names");
    }
  }
  if (p.has("loss_weights")) {
    const auto& w = p.raw("loss_weights");
    if (!w.is_array()) throw RequestError("param 'loss_weights' must be a list of numbers");
    std::vector<double> ws;
    for (const auto& x : w) {
      if (!x.is_number()) throw RequestError("param 'loss_weights' must be a list of numbers");
      ws.push_back(x.get<double>());
    }
    o.loss_weights(ws);
  }
  o.beta(p.number("beta", o.beta()))
      .label_smoothing(p.number("label_smoothing", o.label_smoothing()))
      .cdpo(p.boolean("cdpo", false))
      .f_divergence_type(
          prefopt::f_divergence_from_name(p.string("f_divergence_type", "reverse_kl")))
      .f_alpha_divergence_coef(p.number("f_alpha_divergence_coef", o.f_alpha_divergence_coef()))
      .discopop_tau(p.number("discopop_tau", o.discopop_tau()))
      .reference_free(p.boolean("reference_free", false))
      .rpo_alpha(p.number("rpo_alpha", 0.0))
      .nll_normalization(nll_normalization(p))
      .weighted_rewards(p.boolean("weighted_rewards", false))
      .reduction(reduction(p));
  const auto ipo = p.string("ipo_normalization", "per_token");
  if (ipo == "per_token") {
    o.ipo_normalization(prefopt::IPONormalization::kPerToken);
  } else if (ipo == "none") {
    o.ipo_normalization(prefopt::IPONormalization::kNone);
  } else {
    throw RequestError("param 'ipo_normalization' must be \"per_token\" or \"none\", got \"" + ipo +
                       "\"");
  }
  const auto pair = pair_inputs(in, logps_form(p, prefopt::LogpsForm::kSum));
  const auto r = F::dpo_loss(pair, in.scalar("bco_delta"), o);
  auto m = pair_metrics(r.chosen_rewards, r.rejected_rewards);
  if (r.nll_loss.defined()) m["nll_loss"] = r.nll_loss.item<double>();
  return pairwise(result(r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, std::move(m)), r,
                  pair);
}

Evaluated eval_cpo(const std::string& loss, const json& params, const json& inputs) {
  std::set<std::string> allowed = {"beta",  "label_smoothing",   "simpo_gamma", "cpo_alpha",
                                   "alpha", "nll_normalization", "reduction",   "logps_form"};
  if (loss == "cpo") allowed.insert("loss_type");
  const Params p(params, allowed);
  const Inputs in(inputs, kPairInputs);
  const auto type = loss == "cpo"
                        ? prefopt::cpo_loss_type_from_name(p.string("loss_type", "sigmoid"))
                        : prefopt::CPOLossType::kSimPO;
  // TRL's CPOTrainer hands sums to sigmoid and hinge, per-token means to the others.
  const bool sums = type == prefopt::CPOLossType::kSigmoid || type == prefopt::CPOLossType::kHinge;
  const auto pair =
      pair_inputs(in, logps_form(p, sums ? prefopt::LogpsForm::kSum : prefopt::LogpsForm::kMean));
  // CPOLossOptions and SimPOLossOptions share these names; only their defaults differ.
  auto fill = [&p](auto o) {
    return o.beta(p.number("beta", o.beta()))
        .label_smoothing(p.number("label_smoothing", o.label_smoothing()))
        .simpo_gamma(p.number("simpo_gamma", o.simpo_gamma()))
        .cpo_alpha(p.number("cpo_alpha", o.cpo_alpha()))
        .alpha(p.number("alpha", o.alpha()))
        .nll_normalization(nll_normalization(p))
        .reduction(reduction(p));
  };
  const auto r = loss == "cpo" ? F::cpo_loss(pair, fill(prefopt::CPOLossOptions().loss_type(type)))
                               : F::simpo_loss(pair, fill(prefopt::SimPOLossOptions()));
  auto m = pair_metrics(r.chosen_rewards, r.rejected_rewards);
  if (r.nll_loss.defined()) {
    m["nll_loss"] = r.nll_loss.item<double>();
  } else if (loss == "cpo") {
    m["nll_loss"] = 0.0;  // TRL's CPOTrainer logs 0 where cpo_alpha = 0 (as the accumulator)
  }
  return pairwise(result(r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, std::move(m)), r,
                  pair);
}

Evaluated eval_orpo(const json& params, const json& inputs) {
  const Params p(params, {"beta", "nll_normalization", "reduction", "logps_form"});
  const Inputs in(inputs, kPairInputs);
  prefopt::ORPOLossOptions o;
  o.beta(p.number("beta", o.beta()))
      .nll_normalization(nll_normalization(p))
      .reduction(reduction(p));
  const auto pair = pair_inputs(in, logps_form(p, prefopt::LogpsForm::kMean));
  const auto r = F::orpo_loss(pair, o);
  auto m = pair_metrics(r.chosen_rewards, r.rejected_rewards);
  m["log_odds_ratio"] = mean_or_zero(r.log_odds_ratio);
  m["log_odds_chosen"] = mean_or_zero(r.log_odds_chosen);
  m["nll_loss"] = r.nll_loss.item<double>();
  return pairwise(result(r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, std::move(m)), r,
                  pair);
}

Evaluated eval_tpo(const json& params, const json& inputs) {
  const Params p(params, {"loss_type", "beta", "label_smoothing", "tpo_alpha", "tpo_l_gamma",
                          "reduction", "logps_form"});
  auto names = kPairInputs;
  names.insert({"gold_logps", "gold_lengths"});
  const Inputs in(inputs, names);
  prefopt::TPOLossOptions o;
  o.loss_type(prefopt::tpo_loss_type_from_name(p.string("loss_type", "sigmoid")))
      .beta(p.number("beta", o.beta()))
      .label_smoothing(p.number("label_smoothing", o.label_smoothing()))
      .tpo_alpha(p.number("tpo_alpha", o.tpo_alpha()))
      .tpo_l_gamma(p.number("tpo_l_gamma", o.tpo_l_gamma()))
      .reduction(reduction(p));
  const bool sums = o.loss_type() == prefopt::TPOLossType::kSigmoid ||
                    o.loss_type() == prefopt::TPOLossType::kHinge;
  const auto pair =
      pair_inputs(in, logps_form(p, sums ? prefopt::LogpsForm::kSum : prefopt::LogpsForm::kMean));
  prefopt::TPOLossResult r;
  const auto gold_logps = in.vector("gold_logps");
  if (gold_logps.defined() || in.vector("gold_lengths").defined()) {
    prefopt::SequenceLogprobs gold;
    gold.sum = gold_logps;
    gold.count = in.vector("gold_lengths");
    r = F::tpo_loss(pair, gold, o);
  } else {
    r = F::tpo_loss(pair, o);
  }
  auto m = pair_metrics(r.chosen_rewards, r.rejected_rewards);
  return pairwise(result(r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, std::move(m)), r,
                  pair);
}

Evaluated eval_kto(const std::string& loss, const json& params, const json& inputs) {
  const Params p(params, {"beta", "desirable_weight", "undesirable_weight", "reduction"});
  const Inputs in(inputs,
                  {"policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                   "reference_rejected_logps", "policy_KL_logps", "reference_KL_logps", "kl"});
  prefopt::KTOLossOptions o;
  o.loss_type(prefopt::kto_loss_type_from_name(loss))
      .beta(p.number("beta", o.beta()))
      .desirable_weight(p.number("desirable_weight", o.desirable_weight()))
      .undesirable_weight(p.number("undesirable_weight", o.undesirable_weight()))
      .reduction(reduction(p));
  auto side = [&](const char* name) {
    auto t = in.vector(name);
    return t.defined() ? t : at::zeros({0}, at::kDouble);  // an absent side is an empty one
  };
  const auto kin = prefopt::KTOInputs()
                       .policy_chosen_logps(side("policy_chosen_logps"))
                       .policy_rejected_logps(side("policy_rejected_logps"))
                       .reference_chosen_logps(side("reference_chosen_logps"))
                       .reference_rejected_logps(side("reference_rejected_logps"))
                       .policy_KL_logps(in.vector("policy_KL_logps"))
                       .reference_KL_logps(in.vector("reference_KL_logps"))
                       .kl(in.scalar("kl"));
  const auto r = F::kto_loss(kin, o);
  json m;
  if (r.chosen_rewards.numel() > 0) m["rewards/chosen"] = mean_or_zero(r.chosen_rewards);
  if (r.rejected_rewards.numel() > 0) m["rewards/rejected"] = mean_or_zero(r.rejected_rewards);
  if (r.chosen_rewards.numel() > 0 && r.rejected_rewards.numel() > 0)
    m["rewards/margins"] = mean_or_zero(r.chosen_rewards) - mean_or_zero(r.rejected_rewards);
  m["kl"] = r.kl.item<double>();
  return {result(r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, std::move(m)),
          [r, kin](prefopt::MetricAccumulator& acc, const prefopt::PairLogprobs* tokens) {
            if (tokens != nullptr) {
              acc.add(r, kin, tokens->chosen, tokens->rejected);
            } else {
              acc.add(r, kin);
            }
          }};
}

const std::set<std::string> kDPONames = {"sigmoid",  "hinge",        "ipo",      "robust",
                                         "exo_pair", "nca_pair",     "bco_pair", "sppo_hard",
                                         "aot",      "aot_unpaired", "apo_zero", "apo_down",
                                         "discopop", "sigmoid_norm", "sft",      "dpo"};

/// A loss request {"loss", "params", "inputs"} (and, inside a metrics request, "tokens" and
/// "scalars", which `allow_step_fields` admits).
Evaluated evaluate_loss(const json& request, bool allow_step_fields) {
  if (!request.is_object())
    throw RequestError("a request must be an object {\"loss\", \"params\", \"inputs\"}");
  for (const auto& [key, value] : request.items()) {
    const bool step_field = key == "tokens" || key == "scalars";
    if (key != "loss" && key != "params" && key != "inputs" && !(allow_step_fields && step_field))
      throw RequestError("unknown request field '" + key + "'; known: loss, params, inputs" +
                         (allow_step_fields ? ", tokens, scalars" : ""));
  }
  if (!request.contains("loss") || !request["loss"].is_string())
    throw RequestError("a request needs \"loss\": a loss name");
  if (!request.contains("inputs")) throw RequestError("a request needs \"inputs\"");
  const auto loss = request["loss"].get<std::string>();
  const json empty = json::object();
  const json& params = request.contains("params") ? request["params"] : empty;
  const json& inputs = request["inputs"];
  if (kDPONames.count(loss)) return eval_dpo(loss, params, inputs);
  if (loss == "cpo" || loss == "simpo") return eval_cpo(loss, params, inputs);
  if (loss == "orpo") return eval_orpo(params, inputs);
  if (loss == "tpo") return eval_tpo(params, inputs);
  if (loss == "kto" || loss == "apo_zero_unpaired") return eval_kto(loss, params, inputs);
  throw RequestError("unknown loss '" + loss + "'; expected a DPO loss_type (" + join(kDPONames) +
                     "), cpo, simpo, orpo, tpo, kto or apo_zero_unpaired");
}

/// One side's token statistics of a metrics step: {"count", "logits_sum", "logits_sum_all",
/// "positions", "correct", "entropy_sum"}, each [N].
prefopt::SequenceLogprobs token_side(const json& side, const char* name) {
  const Inputs in(side,
                  {"count", "logits_sum", "logits_sum_all", "positions", "correct", "entropy_sum"},
                  {"", std::string("\"tokens\".\"") + name + "\""});
  prefopt::SequenceLogprobs lp;
  lp.count = in.vector("count");
  if (!lp.count.defined())
    throw RequestError(std::string("\"tokens\".\"") + name + "\" needs \"count\"");
  lp.logits_sum = in.vector("logits_sum");
  lp.logits_sum_all = in.vector("logits_sum_all");
  lp.positions = in.vector("positions");
  lp.correct = in.vector("correct");
  lp.entropy_sum = in.vector("entropy_sum");
  // Counts are what a gather returns: whole numbers of tokens, no more correct than counted.
  // (The reducer checks that every field has one value per sequence.)
  for (const auto& [key, t] : {std::pair<const char*, const at::Tensor*>{"count", &lp.count},
                               {"positions", &lp.positions},
                               {"correct", &lp.correct}}) {
    if (!t->defined()) continue;
    const auto* v = t->data_ptr<double>();
    for (int64_t i = 0; i < t->numel(); ++i) {
      if (!(v[i] >= 0) || v[i] != std::floor(v[i]))
        throw RequestError(std::string("\"tokens\".\"") + name + "\".\"" + key +
                           "\" must hold whole numbers >= 0, got " + json(v[i]).dump() + " at " +
                           std::to_string(i));
    }
  }
  if (lp.correct.defined() && lp.correct.numel() == lp.count.numel() &&
      lp.correct.gt(lp.count).any().item<bool>())
    throw RequestError(std::string("\"tokens\".\"") + name +
                       "\": \"correct\" must not exceed \"count\" (more correct tokens than "
                       "scored ones)");
  return lp;
}

/// {"metrics": {"logits", "prefix"}, "steps": [micro-step, ...]}: a logging window. A
/// micro-step is a loss request with optional "tokens" {"chosen", "rejected"} and "scalars"
/// {name: value}, or an array of them, one per rank. Answers the metrics under both windows.
json evaluate_metrics(const json& request) {
  for (const auto& [key, value] : request.items()) {
    if (key != "metrics" && key != "steps")
      throw RequestError("unknown metrics-request field '" + key + "'; known: metrics, steps");
  }
  // Both branches lvalues: with a prvalue json::object() the conditional would be a temporary
  // copy, gone at the end of the statement while `p` still refers to it (ASan:
  // stack-use-after-scope; found by the sanitizer configuration).
  const json empty = json::object();
  const json& metrics = request.contains("metrics") ? request["metrics"] : empty;
  const Params p(metrics, {"logits", "prefix"}, {"", "\"metrics\""});
  prefopt::MetricsOptions opts;
  opts.prefix(p.string("prefix", ""));
  const auto logits = p.string("logits", "scored");
  if (logits == "all_positions") {
    opts.logits(prefopt::LogitsMetric::kAllPositions);
  } else if (logits != "scored") {
    throw RequestError(p.name("logits") + " must be \"scored\" or \"all_positions\", got \"" +
                       logits + "\"");
  }
  if (!request.contains("steps") || !request["steps"].is_array() || request["steps"].empty())
    throw RequestError("a metrics request needs \"steps\": a non-empty array of micro-steps");
  const auto& steps = request["steps"];
  const size_t n_ranks = steps[0].is_array() ? steps[0].size() : 1;
  if (n_ranks == 0) throw RequestError("a micro-step needs at least one rank");
  const prefopt::MetricWindow windows[2] = {prefopt::MetricWindow::kMeanOfSteps,
                                            prefopt::MetricWindow::kCountWeighted};
  std::vector<prefopt::MetricAccumulator> accs[2];
  for (int w = 0; w < 2; ++w)
    accs[w].assign(n_ranks,
                   prefopt::MetricAccumulator(prefopt::MetricsOptions(opts).window(windows[w])));
  // A trainer gathers the token statistics on every rank of every micro-step: a rank without
  // them would be left out of that micro-step's token metrics unsaid.
  const json& first = steps[0].is_array() ? steps[0][0] : steps[0];
  const bool window_tokens = first.is_object() && first.contains("tokens");
  for (size_t i = 0; i < steps.size(); ++i) {
    const json one = json::array({steps[i]});
    const json& ranks = steps[i].is_array() ? steps[i] : one;
    if (ranks.size() != n_ranks)
      throw RequestError("micro-step " + std::to_string(i) + " has " +
                         std::to_string(ranks.size()) + " ranks, micro-step 0 has " +
                         std::to_string(n_ranks));
    for (size_t k = 0; k < n_ranks; ++k) {
      const json& step = ranks[k];
      const Evaluated ev = evaluate_loss(step, /*allow_step_fields=*/true);
      prefopt::PairLogprobs tokens;
      const bool has_tokens = step.contains("tokens");
      if (has_tokens != window_tokens)
        throw RequestError("micro-step " + std::to_string(i) + ", rank " + std::to_string(k) +
                           (has_tokens ? " has \"tokens\" where micro-step 0, rank 0 has none"
                                       : " has no \"tokens\" where micro-step 0, rank 0 has them") +
                           "; give them for every rank of every micro-step, or for none");
      if (has_tokens) {
        const json& t = step["tokens"];
        if (!t.is_object()) throw RequestError("\"tokens\" must be an object");
        for (const auto& [key, value] : t.items()) {
          if (key != "chosen" && key != "rejected")
            throw RequestError("unknown \"tokens\" field '" + key + "'; known: chosen, rejected");
        }
        if (t.contains("chosen")) tokens.chosen = token_side(t["chosen"], "chosen");
        if (t.contains("rejected")) tokens.rejected = token_side(t["rejected"], "rejected");
      }
      for (auto& acc : accs) {
        ev.feed(acc[k], has_tokens ? &tokens : nullptr);
        if (step.contains("scalars")) {
          const json& sc = step["scalars"];
          if (!sc.is_object()) throw RequestError("\"scalars\" must be an object");
          for (const auto& [name, value] : sc.items()) {
            if (!value.is_number()) throw RequestError("scalar '" + name + "' must be a number");
            acc[k].add_scalar(name, value.get<double>());
          }
        }
      }
    }
  }
  json out = json::object();
  const char* names[2] = {"mean_of_steps", "count_weighted"};
  for (int w = 0; w < 2; ++w) {
    std::vector<prefopt::MetricAccumulator*> ranks;
    for (auto& a : accs[w]) ranks.push_back(&a);
    json m = json::object();
    for (const auto& [name, value] : prefopt::MetricAccumulator::compute_ranks(ranks))
      m[name] = std::isfinite(value) ? json(value) : json(nullptr);
    out[names[w]] = std::move(m);
  }
  return {{"metrics", std::move(out)}};
}

json evaluate(const json& request) {
  if (request.is_object() && (request.contains("steps") || request.contains("metrics")))
    return evaluate_metrics(request);
  return evaluate_loss(request, /*allow_step_fields=*/false).answer;
}

/// `j` as text. Invalid UTF-8 (which an error message can quote from the request, as a parse
/// error does) becomes U+FFFD instead of throwing, so that an answer can always be written.
std::string serialise(const json& j, int indent = -1) {
  return j.dump(indent, ' ', false, json::error_handler_t::replace);
}

/// Answers one request; on failure adds the message to `reply.err` and returns {"error"}.
json answer(const json& request, Reply& reply) {
  std::string message;
  try {
    return evaluate(request);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    message = e.what();
  }
  reply.status = 2;
  reply.err += "prefopt-eval: " + message + "\n";
  return {{"error", message}};
}

}  // namespace

Reply error_reply(const std::string& message) {
  Reply reply;
  reply.err = "prefopt-eval: " + message + "\n";
  reply.out = serialise(json{{"error", message}}) + "\n";
  reply.status = 2;
  return reply;
}

Reply handle(std::string_view text, int indent) {
  json request;
  try {
    request = json::parse(text);
  } catch (const json::exception& e) {
    // Any JSON library error, not only parse_error: a number beyond double's range is an
    // out_of_range.
    return error_reply(std::string("malformed JSON: ") + e.what());
  }
  Reply reply;
  json out;
  if (request.is_array()) {
    out = json::array();
    for (const auto& r : request) out.push_back(answer(r, reply));
  } else {
    out = answer(request, reply);
  }
  reply.out = serialise(out, indent) + "\n";
  return reply;
}

}  // namespace prefopt_eval
