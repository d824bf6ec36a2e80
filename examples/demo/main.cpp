// SPDX-License-Identifier: Apache-2.0
// prefopt-demo: a complete preference-training run, under a minute on 2 CPU cores.
//
// A small causal transformer learns fixed-width addition ("347+538=" -> "0885") from scratch:
//   stage 1  SFT on a sloppy teacher's answers: a controlled share of the problems that carry
//            are answered with the carry dropped ("0875"), so the SFT model inherits the habit;
//   stage 2  preference training from the SFT model (frozen reference, its log-probs computed
//            once up front, as TRL's precompute_ref_log_probs) on pairs correct > dropped
//            carry, through prefopt's fused gathering op from the hidden states, with any of
//            prefopt's losses. Reference-free losses (ORPO, SimPO, CPO) can also start from the
//            untrained model (--from base), as ORPO's paper intends.
// Held-out prompts are scored before and after stage 2 (greedy exact match, held-out
// preference accuracy). Metrics go to the terminal and to JSON Lines with TRL's names, the
// curves to a PNG drawn by gnuplot, the scores to summary.json.
//
//   prefopt-demo                          # DPO (sigmoid), defaults below
//   prefopt-demo --loss ipo --beta 0.5 --out runs/ipo
//   prefopt-demo --loss orpo --from base
#include <prefopt/fmt.h>
#include <prefopt/prefopt.h>

#include <fmt/core.h>
#include <torch/nn.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <optional>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "arith.h"
#include "model.h"
#include "plot.h"
#include "progress.h"

namespace F = prefopt::functional;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// Options

enum class Family { kDPO, kORPO, kSimPO, kCPO, kKTO };

struct Options {
  uint64_t seed = 0;
  int threads = 1;
  int digits = 3;
  std::string out = "demo-out";
  bool plot = true;
  // model
  int64_t dim = 64, layers = 2, heads = 4;
  // stage 1
  int64_t sft_steps = 2000, sft_batch = 128;
  double sft_lr = 3e-3, sft_noise = 0.6;
  std::string save_sft, load_sft;
  // stage 2
  std::string loss = "sigmoid", from = "sft", cpo_loss_type = "sigmoid";
  int64_t steps = 300, batch = 64, pairs = 8000;      // steps: 1000 from the base
  double lr = 1e-4, beta = 2.0, max_grad_norm = 1.0;  // lr: 3e-3 from the base; beta: per loss
  std::optional<double> cpo_alpha;
  double label_smoothing = 0.0, rpo_alpha = 0.0, simpo_gamma = 0.5;
  bool cdpo = false;
  bool swap_preferences = false;  // negative control: train on chosen and rejected exchanged
  double desirable_weight = 1.0, undesirable_weight = 1.0;
  // logging and evaluation
  int64_t log_every = 10, print_every = 50, eval_every = 25, eval_size = 500;
};

Family family_of(const std::string& loss) {
  if (loss == "orpo") return Family::kORPO;
  if (loss == "simpo") return Family::kSimPO;
  if (loss == "cpo") return Family::kCPO;
  if (loss == "kto" || loss == "apo_zero_unpaired") return Family::kKTO;
  return Family::kDPO;
}

bool needs_reference(Family f) { return f == Family::kDPO || f == Family::kKTO; }

// β (ORPO's λ) tuned for this task: 3-token answers make β·ρ small, so the DPO family needs a
// larger β than TRL's 0.1 (at 0.1 the policy drifts far from the reference and generation
// degrades; see the README). The targets of ipo and sppo_hard scale as 1/β instead.
double default_beta(const std::string& loss) {
  if (loss == "ipo") return 0.5;
  if (loss == "sppo_hard" || loss == "orpo" || loss == "cpo") return 0.1;
  if (loss == "simpo") return 10.0;
  return 2.0;
}

const std::vector<std::string>& loss_names() {
  static const std::vector<std::string> names = {
      "sigmoid",          "hinge",        "ipo",  "robust",       "exo_pair", "nca_pair",
      "bco_pair",         "sppo_hard",    "aot",  "aot_unpaired", "apo_zero", "apo_down",
      "discopop",         "sigmoid_norm", "orpo", "simpo",        "cpo",      "kto",
      "apo_zero_unpaired"};
  return names;
}

// ---------------------------------------------------------------------------------------------
// Data

// A fixed preference dataset: pair i is (prompt i, chosen answer, rejected answer), plus the
// mismatched completion KTO's KL estimate uses (prompt i with pair i+1's chosen answer).
struct PairSet {
  std::vector<arith::Problem> problems;
  at::Tensor chosen_ids, rejected_ids, kl_ids;  // [N, T]
  at::Tensor chosen_labels, rejected_labels, kl_labels;
  at::Tensor ref_chosen, ref_rejected, ref_kl;  // [N] summed reference log-probs
  int64_t size() const { return static_cast<int64_t>(problems.size()); }
};

PairSet make_pairs(const arith::Task& task, std::vector<arith::Problem> problems,
                   std::mt19937_64& rng) {
  PairSet s;
  s.problems = std::move(problems);
  std::vector<int64_t> chosen, rejected, kl;
  for (const auto& p : s.problems) {
    chosen.push_back(arith::Task::correct(p));
    rejected.push_back(arith::rejected_answer(task, p, rng));
  }
  for (size_t i = 0; i < chosen.size(); ++i) kl.push_back(chosen[(i + 1) % chosen.size()]);
  arith::batch(task, s.problems, chosen, s.chosen_ids, s.chosen_labels);
  arith::batch(task, s.problems, rejected, s.rejected_ids, s.rejected_labels);
  arith::batch(task, s.problems, kl, s.kl_ids, s.kl_labels);
  return s;
}

// Summed log-probs of `ids` under `model`, in batches, without building a graph.
at::Tensor sequence_logps(demo::TinyGPT& model, const at::Tensor& ids, const at::Tensor& labels) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < ids.size(0); i += 1024) {
    const auto n = std::min<int64_t>(1024, ids.size(0) - i);
    out.push_back(F::fused_logprobs(model->hidden(ids.narrow(0, i, n)), model->head_weight(), {},
                                    labels.narrow(0, i, n))
                      .sum);
  }
  return at::cat(out);
}

// The same pairs with chosen and rejected exchanged (the KL completions stay): what a loss
// with its preference reversed, or a data pipeline that mixed up its columns, trains on.
PairSet swapped(const PairSet& s) {
  PairSet w = s;
  std::swap(w.chosen_ids, w.rejected_ids);
  std::swap(w.chosen_labels, w.rejected_labels);
  std::swap(w.ref_chosen, w.ref_rejected);
  return w;
}

void precompute_reference(demo::TinyGPT& reference, PairSet& s, bool kl) {
  s.ref_chosen = sequence_logps(reference, s.chosen_ids, s.chosen_labels);
  s.ref_rejected = sequence_logps(reference, s.rejected_ids, s.rejected_labels);
  if (kl) s.ref_kl = sequence_logps(reference, s.kl_ids, s.kl_labels);
}

// ---------------------------------------------------------------------------------------------
// Evaluation

struct Scores {
  double exact = 0, exact_carry = 0, exact_no_carry = 0, dropped_carry = 0;
  double pref_logp = 0;  // held-out pairs: log π(chosen) > log π(rejected)
  double pref_reward = std::numeric_limits<double>::quiet_NaN();  // implicit reward ranks them
  double train_reward = std::numeric_limits<double>::quiet_NaN();

  prefopt::Metrics metrics() const {
    prefopt::Metrics m;
    m.set("eval_exact_match", exact);
    m.set("eval_exact_match_carry", exact_carry);
    m.set("eval_exact_match_no_carry", exact_no_carry);
    m.set("eval_dropped_carry", dropped_carry);
    m.set("eval_preference_accuracy", pref_logp);
    if (!std::isnan(pref_reward)) m.set("eval_rewards/accuracies", pref_reward);
    if (!std::isnan(train_reward)) m.set("train_rewards/accuracies", train_reward);
    return m;
  }
};

// Fraction of pairs the implicit reward ranks correctly: log-ratio to the reference when
// there is one, else the policy log-prob (SimPO, ORPO and CPO rewards are β times it).
double reward_accuracy(demo::TinyGPT& model, const PairSet& s, bool with_reference, int64_t limit) {
  const auto n = std::min(limit, s.size());
  auto c = sequence_logps(model, s.chosen_ids.narrow(0, 0, n), s.chosen_labels.narrow(0, 0, n));
  auto r = sequence_logps(model, s.rejected_ids.narrow(0, 0, n), s.rejected_labels.narrow(0, 0, n));
  if (with_reference) {
    c = c - s.ref_chosen.narrow(0, 0, n);
    r = r - s.ref_rejected.narrow(0, 0, n);
  }
  return (c > r).to(at::kDouble).mean().item<double>();  // ties are not accurate
}

Scores evaluate(demo::TinyGPT& model, const arith::Task& task, const PairSet& held_out,
                const PairSet* train, bool reward_defined, bool with_reference) {
  model->eval();
  Scores s;
  const auto gen =
      model->generate(held_out.chosen_ids.narrow(1, 0, task.prompt_len()), task.answer_len())
          .contiguous();
  int64_t ok = 0, carry = 0, ok_carry = 0, dropped = 0;
  for (int64_t i = 0; i < held_out.size(); ++i) {
    const auto& p = held_out.problems[static_cast<size_t>(i)];
    const auto v = arith::Task::value(gen[i].data_ptr<int64_t>(), task.answer_len());
    const bool right = v == arith::Task::correct(p);
    ok += right;
    if (task.has_carry(p)) {
      ++carry;
      ok_carry += right;
      dropped += v == task.dropped_carry(p);
    }
  }
  const auto n = static_cast<double>(held_out.size());
  s.exact = ok / n;
  s.exact_carry = carry ? static_cast<double>(ok_carry) / carry : 0.0;
  s.exact_no_carry = carry < held_out.size() ? (ok - ok_carry) / (n - carry) : 0.0;
  s.dropped_carry = carry ? static_cast<double>(dropped) / carry : 0.0;
  s.pref_logp = reward_accuracy(model, held_out, false, held_out.size());
  if (reward_defined) {
    s.pref_reward = reward_accuracy(model, held_out, with_reference, held_out.size());
    if (train) s.train_reward = reward_accuracy(model, *train, with_reference, 1024);
  }
  model->train();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Training

void set_lr(torch::optim::AdamW& opt, double lr) {
  for (auto& group : opt.param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

// Linear warmup over `warmup` steps, then linear decay to 10% (TRL's default is to 0).
double scheduled_lr(double base, int64_t step, int64_t total, int64_t warmup) {
  if (step <= warmup) return base * static_cast<double>(step) / std::max<int64_t>(warmup, 1);
  const double t = static_cast<double>(step - warmup) / std::max<int64_t>(total - warmup, 1);
  return base * (1.0 - 0.9 * t);
}

void copy_parameters(demo::TinyGPT& dst, demo::TinyGPT& src) {
  at::NoGradGuard no_grad;
  auto d = dst->parameters(), s = src->parameters();
  for (size_t i = 0; i < d.size(); ++i) d[i].copy_(s[i]);
}

class Logger {
 public:
  Logger(const fs::path& jsonl) : writer_(jsonl.string()) {}
  void write(int64_t step, const prefopt::Metrics& m, demo::History& history) {
    writer_.write(step, m);
    history.emplace_back(step, m);
  }

 private:
  prefopt::JsonlWriter writer_;
};

Scores run_sft(const Options& o, demo::TinyGPT& model, const arith::Task& task,
               arith::Sampler& sampler, const PairSet& held_out, const fs::path& out) {
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(o.sft_lr).weight_decay(0.01));
  prefopt::JsonlWriter log((out / "sft_metrics.jsonl").string());
  prefopt::MetricAccumulator metrics;
  demo::Progress bar("sft ", o.sft_steps);
  const auto opts = prefopt::FusedLogprobsOptions().with_token_accuracy(true).with_entropy(true);
  for (int64_t step = 1; step <= o.sft_steps; ++step) {
    auto problems = sampler.draw(o.sft_batch);
    std::vector<int64_t> answers;
    for (const auto& p : problems) {
      const bool sloppy = task.has_carry(p) && sampler.uniform() < o.sft_noise;
      answers.push_back(sloppy ? task.dropped_carry(p) : arith::Task::correct(p));
    }
    at::Tensor ids, labels;
    arith::batch(task, problems, answers, ids, labels);
    // SFT is the token-mean NLL of the answers: the same fused op, no logits materialised.
    const auto lp = F::fused_logprobs(model->hidden(ids), model->head_weight(), {}, labels, opts);
    const auto loss = -lp.sum.sum() / lp.count.sum();
    set_lr(opt, scheduled_lr(o.sft_lr, step, o.sft_steps, o.sft_steps / 10));
    opt.zero_grad();
    loss.backward();
    const auto grad_norm = torch::nn::utils::clip_grad_norm_(model->parameters(), o.max_grad_norm);
    opt.step();
    metrics.add(loss, lp);  // loss, mean_token_accuracy, num_tokens
    metrics.add_scalar("grad_norm", grad_norm);
    if (step % o.log_every == 0 || step == o.sft_steps) {
      const auto m = metrics.compute();
      log.write(step, m);
      bar.status(fmt::format("loss {:.4f}", m.at("loss")));
      if (step % o.print_every == 0) bar.print_line(fmt::format("sft step {:>4} {:.4}", step, m));
    }
    bar.update(step);
  }
  return evaluate(model, task, held_out, nullptr, false, false);
}

struct Loss {
  Family family;
  prefopt::DPOLoss dpo;
  prefopt::ORPOLossOptions orpo;
  prefopt::SimPOLossOptions simpo;
  prefopt::CPOLossOptions cpo;
  prefopt::KTOLossOptions kto;

  explicit Loss(const Options& o) : family(family_of(o.loss)), dpo(dpo_options(o)) {
    orpo.beta(o.beta);
    simpo.beta(o.beta);
    cpo.beta(o.beta);
    kto.beta(o.beta);
    simpo.simpo_gamma(o.simpo_gamma).label_smoothing(o.label_smoothing);
    if (o.cpo_alpha) simpo.cpo_alpha(*o.cpo_alpha);
    cpo.loss_type(prefopt::cpo_loss_type_from_name(o.cpo_loss_type))
        .label_smoothing(o.label_smoothing);
    if (o.cpo_alpha) cpo.cpo_alpha(*o.cpo_alpha);
    kto.loss_type(prefopt::kto_loss_type_from_name(o.loss == "apo_zero_unpaired" ? o.loss : "kto"))
        .desirable_weight(o.desirable_weight)
        .undesirable_weight(o.undesirable_weight);
  }

  static prefopt::DPOLossOptions dpo_options(const Options& o) {
    auto opts = prefopt::DPOLossOptions()
                    .beta(o.beta)
                    .label_smoothing(o.label_smoothing)
                    .cdpo(o.cdpo)
                    .rpo_alpha(o.rpo_alpha);
    if (family_of(o.loss) == Family::kDPO) opts.loss_type(prefopt::dpo_loss_type_from_name(o.loss));
    return opts;
  }

  // One micro-step on the pairs `idx`: the policy's log-probs through the fused op, the loss,
  // and the metrics. Returns the loss to backpropagate.
  at::Tensor operator()(demo::TinyGPT& model, const PairSet& s, const at::Tensor& idx,
                        prefopt::MetricAccumulator& metrics) {
    const auto opts = prefopt::FusedLogprobsOptions()
                          .with_logits_mean(true)
                          .with_token_accuracy(true)
                          .with_entropy(true);
    const auto ids =
        at::cat({s.chosen_ids.index_select(0, idx), s.rejected_ids.index_select(0, idx)});
    const auto labels =
        at::cat({s.chosen_labels.index_select(0, idx), s.rejected_labels.index_select(0, idx)});
    const auto policy = F::split_pairs(
        F::fused_logprobs(model->hidden(ids), model->head_weight(), {}, labels, opts));
    switch (family) {
      case Family::kDPO: {
        const auto in = prefopt::PairInputs(policy)
                            .reference_chosen_logps(s.ref_chosen.index_select(0, idx))
                            .reference_rejected_logps(s.ref_rejected.index_select(0, idx));
        const auto r = dpo(in);
        metrics.add(r, in, policy);
        return r.loss;
      }
      case Family::kORPO: {
        const auto in = prefopt::PairInputs::averaged(policy);
        const auto r = F::orpo_loss(in, orpo);
        metrics.add(r, in, policy);
        return r.loss;
      }
      case Family::kSimPO: {
        const auto in = prefopt::PairInputs::averaged(policy);
        const auto r = F::simpo_loss(in, simpo);
        metrics.add(r, in, policy);
        return r.loss;
      }
      case Family::kCPO: {
        const bool means = cpo.loss_type() == prefopt::CPOLossType::kIPO;
        const auto in = means ? prefopt::PairInputs::averaged(policy) : prefopt::PairInputs(policy);
        const auto r = F::cpo_loss(in, cpo);
        metrics.add(r, in, policy);
        return r.loss;
      }
      case Family::kKTO: {
        // Each pair gives one desirable and one undesirable example. The KL estimate's
        // mismatched completions are scored without a graph, as TRL does.
        at::Tensor policy_kl;
        if (kto.loss_type() == prefopt::KTOLossType::kKTO) {
          policy_kl = sequence_logps(model, s.kl_ids.index_select(0, idx),
                                     s.kl_labels.index_select(0, idx));
        }
        auto in = prefopt::KTOInputs()
                      .policy_chosen_logps(policy.chosen.sum)
                      .policy_rejected_logps(policy.rejected.sum)
                      .reference_chosen_logps(s.ref_chosen.index_select(0, idx))
                      .reference_rejected_logps(s.ref_rejected.index_select(0, idx));
        if (policy_kl.defined())
          in.policy_KL_logps(policy_kl).reference_KL_logps(s.ref_kl.index_select(0, idx));
        const auto r = F::kto_loss(in, kto);
        metrics.add(r, in, policy.chosen, policy.rejected);
        return r.loss;
      }
    }
    TORCH_CHECK(false, "prefopt-demo: unknown loss family");
  }
};

Scores run_preference(const Options& o, demo::TinyGPT& model, PairSet& train, PairSet& held_out,
                      const arith::Task& task, std::mt19937_64& rng, const fs::path& out,
                      demo::History& history, demo::History& eval_history, const Scores& before) {
  Loss loss(o);
  const bool with_reference = needs_reference(loss.family);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(0.0));
  Logger log(out / "metrics.jsonl");
  prefopt::MetricAccumulator metrics;
  eval_history.emplace_back(0, before.metrics());

  // --swap-preferences trains on the exchanged pairs; evaluation still scores the true ones.
  const PairSet fed = o.swap_preferences ? swapped(train) : train;
  std::vector<int64_t> order(static_cast<size_t>(train.size()));
  std::iota(order.begin(), order.end(), 0);
  size_t cursor = order.size();
  demo::Progress bar(o.loss, o.steps);
  Scores last = before;
  for (int64_t step = 1; step <= o.steps; ++step) {
    if (cursor + static_cast<size_t>(o.batch) > order.size()) {  // a new epoch
      std::shuffle(order.begin(), order.end(), rng);
      cursor = 0;
    }
    const auto idx = at::tensor(
        std::vector<int64_t>(
            order.begin() + static_cast<std::ptrdiff_t>(cursor),
            order.begin() + static_cast<std::ptrdiff_t>(cursor + static_cast<size_t>(o.batch))),
        at::kLong);
    cursor += static_cast<size_t>(o.batch);

    set_lr(opt, scheduled_lr(o.lr, step, o.steps, o.steps / 10));
    opt.zero_grad();
    const auto l = loss(model, fed, idx, metrics);
    l.backward();
    const auto grad_norm = torch::nn::utils::clip_grad_norm_(model->parameters(), o.max_grad_norm);
    opt.step();
    metrics.add_scalar("grad_norm", grad_norm);

    if (step % o.log_every == 0 || step == o.steps) {
      const auto m = metrics.compute();
      log.write(step, m, history);
      bar.status(fmt::format("loss {:.4f} margins {:.3f}", m.at("loss"), m.at("rewards/margins")));
      if (step % o.print_every == 0) bar.print_line(fmt::format("step {:>4} {:.4}", step, m));
    }
    if (step % o.eval_every == 0 || step == o.steps) {
      last = evaluate(model, task, held_out, &train, true, with_reference);
      const auto m = last.metrics();
      log.write(step, m, eval_history);
      if (step % o.print_every == 0 || step == o.steps)
        bar.print_line(fmt::format("eval {:>4} {:.4}", step, m));
    }
    bar.update(step);
  }
  return last;
}

void print_summary(const Options& o, const Scores& before, const Scores& after,
                   const std::string& before_name) {
  const auto row = [](const char* name, double b, double a) {
    const auto f = [](double v) {
      return std::isnan(v) ? std::string("n/a") : fmt::format("{:.3f}", v);
    };
    const auto change =
        std::isnan(a) || std::isnan(b) ? std::string() : fmt::format("{:+.3f}", a - b);
    fmt::print("  {:<42} {:>8} {:>8} {:>8}\n", name, f(b), f(a), change);
  };
  fmt::print("\nheld-out prompts ({}), {} -> {}:\n", o.eval_size, before_name, o.loss);
  fmt::print("  {:<42} {:>8} {:>8} {:>8}\n", "", "before", "after", "change");
  row("exact match (greedy)", before.exact, after.exact);
  row("exact match, problems with a carry", before.exact_carry, after.exact_carry);
  row("exact match, problems without", before.exact_no_carry, after.exact_no_carry);
  row("answers with the carry dropped", before.dropped_carry, after.dropped_carry);
  row("preference accuracy: log p(c) > log p(r)", before.pref_logp, after.pref_logp);
  row("implicit-reward accuracy (held-out)", before.pref_reward, after.pref_reward);
  row("implicit-reward accuracy (training pairs)", before.train_reward, after.train_reward);
}

nlohmann::ordered_json to_json(const Scores& s) {
  const auto v = [](double x) {
    return std::isnan(x) ? nlohmann::ordered_json() : nlohmann::ordered_json(x);
  };
  return {{"exact_match", s.exact},
          {"exact_match_carry", s.exact_carry},
          {"exact_match_no_carry", s.exact_no_carry},
          {"dropped_carry", s.dropped_carry},
          {"preference_accuracy", s.pref_logp},
          {"reward_accuracy", v(s.pref_reward)},
          {"train_reward_accuracy", v(s.train_reward)}};
}

int run(const Options& o) {
  at::set_num_threads(o.threads);
  at::manual_seed(static_cast<int64_t>(o.seed));
  const auto family = family_of(o.loss);
  const fs::path out(o.out);
  fs::create_directories(out);
  for (const char* f : {"sft_metrics.jsonl", "metrics.jsonl"}) fs::remove(out / f);

  const arith::Task task(o.digits);
  std::unordered_set<int64_t> held_out_keys;
  auto held_out_problems = arith::held_out_problems(task, o.seed, o.eval_size, held_out_keys);
  arith::Sampler sampler(task, o.seed, held_out_keys);
  PairSet held_out = make_pairs(task, held_out_problems, sampler.rng());

  demo::ModelConfig cfg;
  cfg.vocab = arith::kVocab;
  cfg.max_len = task.seq_len();
  cfg.dim = o.dim;
  cfg.layers = o.layers;
  cfg.heads = o.heads;
  demo::TinyGPT model(cfg);
  fmt::print(
      "prefopt {} demo: {}-digit addition, model dim {} x {} layers ({} parameters), {} thread{}\n",
      PREFOPT_VERSION_STRING, o.digits, o.dim, o.layers,
      [&] {
        int64_t n = 0;
        for (const auto& p : model->parameters()) n += p.numel();
        return n;
      }(),
      o.threads, o.threads == 1 ? "" : "s");
  const demo::Progress clock("", 1);

  nlohmann::ordered_json summary = {{"loss", o.loss}, {"from", o.from}, {"seed", o.seed}};
  Scores before;
  std::string before_name = "base";
  if (o.from == "sft") {
    if (!o.load_sft.empty()) {
      torch::load(model, o.load_sft);
      fmt::print("stage 1: loaded the SFT model from {}\n", o.load_sft);
      before = evaluate(model, task, held_out, nullptr, false, false);
    } else {
      fmt::print(
          "stage 1: SFT, {} steps of {} problems; {:.0f}% of those with a carry are answered "
          "with it dropped\n",
          o.sft_steps, o.sft_batch, 100 * o.sft_noise);
      before = run_sft(o, model, task, sampler, held_out, out);
    }
    if (!o.save_sft.empty()) torch::save(model, o.save_sft);
    before_name = "SFT";
    fmt::print(
        "SFT model: held-out exact match {:.3f} (with a carry {:.3f}, carry dropped in {:.3f})\n",
        before.exact, before.exact_carry, before.dropped_carry);
  } else {
    before = evaluate(model, task, held_out, nullptr, false, false);
  }
  summary["swap_preferences"] = o.swap_preferences;
  summary["before"] = to_json(before);

  if (o.steps > 0) {
    // Stage 2's data has its own stream, so a run that loads the SFT model trains on the same
    // pairs as one that trained it.
    arith::Sampler pair_sampler(task, o.seed + 1, held_out_keys);
    PairSet train = make_pairs(task, pair_sampler.draw(o.pairs), pair_sampler.rng());
    if (needs_reference(family)) {
      demo::TinyGPT reference(cfg);
      copy_parameters(reference, model);
      reference->eval();
      precompute_reference(reference, train, family == Family::kKTO);
      precompute_reference(reference, held_out, false);
    }
    fmt::print("stage 2: {} from the {} model, {} steps of {} pairs ({} training pairs{}{})\n",
               o.loss, before_name, o.steps, o.batch, o.pairs,
               needs_reference(family) ? ", reference log-probs precomputed" : "",
               o.swap_preferences ? ", chosen and rejected SWAPPED" : "");
    demo::History history, eval_history;
    const auto after = run_preference(o, model, train, held_out, task, pair_sampler.rng(), out,
                                      history, eval_history, before);
    summary["after"] = to_json(after);
    print_summary(o, before, after, before_name);

    if (o.plot) {
      std::vector<demo::Panel> panels = {
          {"loss", "train", {{"loss", "loss"}}},
          {"rewards", "train", {{"rewards/chosen", "chosen"}, {"rewards/rejected", "rejected"}}},
          {"rewards/margins", "train", {{"rewards/margins", "margins"}}},
          {"rewards/accuracies", "train", {{"rewards/accuracies", "training batch"}}},
          {"logps", "train", {{"logps/chosen", "chosen"}, {"logps/rejected", "rejected"}}},
          {"held-out prompts",
           "eval",
           {{"eval_exact_match", "exact match"},
            {"eval_dropped_carry", "carry dropped"},
            {"eval_preference_accuracy", "log p(c) > log p(r)"}},
           "right center"}};
      std::string error;
      const auto png = (out / "curves.png").string();
      if (demo::plot_png(png,
                         fmt::format("prefopt-demo: {} from the {} model (seed {})", o.loss,
                                     before_name, o.seed),
                         history, eval_history, panels, error)) {
        fmt::print("curves: {}\n", png);
      } else {
        fmt::print(stderr, "prefopt-demo: no plot: {}\n", error);
      }
    }
  }
  summary["seconds"] = clock.seconds();
  std::ofstream(out / "summary.json") << summary.dump(2) << "\n";
  fmt::print("metrics: {}, summary: {} ({})\n", (out / "metrics.jsonl").string(),
             (out / "summary.json").string(), demo::Progress::clock(clock.seconds()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef __GLIBC__
  // The training loop frees and re-allocates the same activation sizes every step; above
  // glibc's default mmap threshold each one is a fresh mapping and page faults (2.5x slower
  // here). Keep them in the heap.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 128 << 20);
#endif
  Options o;
  CLI::App app{
      "prefopt-demo: SFT then preference training of a small transformer on generated addition,\n"
      "with held-out scores before and after, TRL-named metrics (JSON Lines) and a gnuplot PNG."};
  app.get_formatter()->column_width(34);
  app.add_option("--seed", o.seed, "seed of the data, the initial weights and the shuffling")
      ->capture_default_str();
  app.add_option("--threads", o.threads,
                 "intra-op threads (deterministic for a given seed and count; this model is too "
                 "small to gain from more than 1)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--digits", o.digits,
                 "digits of each operand (1-2 learn in 600 SFT steps; 4 needs more than 2000)")
      ->check(CLI::Range(1, 4))
      ->capture_default_str();
  app.add_option("--out", o.out,
                 "folder for sft_metrics.jsonl, metrics.jsonl, curves.png, summary.json")
      ->capture_default_str();
  app.add_flag("!--no-plot", o.plot, "skip the gnuplot PNG");

  auto* model = app.add_option_group("model");
  model->add_option("--dim", o.dim, "model width")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  model->add_option("--layers", o.layers, "transformer blocks")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  model->add_option("--heads", o.heads, "attention heads (must divide --dim)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  auto* sft = app.add_option_group("stage 1 (SFT)");
  // The SFT stage's options, refused with no SFT stage to train (--load-sft, --from base).
  std::vector<CLI::Option*> sft_options;
  sft_options.push_back(sft->add_option("--sft-steps", o.sft_steps, "SFT optimizer steps")
                            ->check(CLI::PositiveNumber)
                            ->capture_default_str());
  sft_options.push_back(sft->add_option("--sft-batch", o.sft_batch, "problems per SFT step")
                            ->check(CLI::PositiveNumber)
                            ->capture_default_str());
  sft_options.push_back(sft->add_option("--sft-lr", o.sft_lr, "SFT peak learning rate (AdamW)")
                            ->check(CLI::PositiveNumber)
                            ->capture_default_str());
  sft_options.push_back(
      sft->add_option(
             "--sft-noise", o.sft_noise,
             "share of SFT problems with a carry whose answer drops it (the teacher's habit)")
          ->check(CLI::Range(0.0, 1.0))
          ->capture_default_str());
  sft->add_option("--save-sft", o.save_sft, "save the SFT model to this file");
  sft->add_option("--load-sft", o.load_sft,
                  "load the SFT model from this file instead of training it")
      ->check(CLI::ExistingFile);

  auto* pref = app.add_option_group("stage 2 (preference)");
  pref->add_option("--loss", o.loss,
                   "loss: a DPO type (sigmoid, hinge, ipo, robust, ...), orpo, simpo, cpo, kto or "
                   "apo_zero_unpaired")
      ->check(CLI::IsMember(loss_names()))
      ->capture_default_str();
  pref->add_option("--from", o.from,
                   "start from the SFT model or the untrained base (reference-free losses)")
      ->check(CLI::IsMember({"sft", "base"}))
      ->capture_default_str();
  std::optional<int64_t> steps;
  std::optional<double> lr, beta;
  pref->add_option("--steps", steps,
                   "preference optimizer steps (0: stop after stage 1) [300; 1000 from the base]")
      ->check(CLI::NonNegativeNumber);
  pref->add_option("--batch", o.batch, "pairs per step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pref->add_option("--pairs", o.pairs, "size of the fixed preference dataset")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pref->add_option(
          "--lr", lr,
          "peak learning rate (AdamW, warmup then linear decay) [1e-4; 3e-3 from the base]")
      ->check(CLI::PositiveNumber);
  pref->add_option("--max-grad-norm", o.max_grad_norm, "gradient clipping (both stages)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pref->add_option("--beta", beta,
                   "beta of the loss (ORPO's lambda), tuned for this task [2; ipo 0.5; sppo_hard, "
                   "orpo, cpo 0.1; simpo 10]");
  std::optional<double> label_smoothing;
  // The options of one loss family: (option, whether the chosen family reads it), checked after
  // parsing.
  std::vector<std::pair<CLI::Option*, bool (*)(Family)>> family_options;
  const auto dpo_only = [](Family f) { return f == Family::kDPO; };
  family_options.emplace_back(
      pref->add_option(
          "--label-smoothing", label_smoothing,
          "label smoothing epsilon (robust, exo_pair, aot, CPO, SimPO; sigmoid with --cdpo) [0; "
          "exo_pair 1e-3]"),
      [](Family f) { return f == Family::kDPO || f == Family::kSimPO || f == Family::kCPO; });
  family_options.emplace_back(
      pref->add_flag("--cdpo", o.cdpo,
                     "conservative DPO: --label-smoothing also smooths sigmoid (TRL <= 0.28)"),
      dpo_only);
  family_options.emplace_back(pref->add_option("--rpo-alpha", o.rpo_alpha,
                                               "weight of the chosen NLL added to DPO losses (RPO)")
                                  ->capture_default_str(),
                              dpo_only);
  family_options.emplace_back(
      pref->add_option("--simpo-gamma", o.simpo_gamma, "SimPO's target reward margin gamma")
          ->capture_default_str(),
      [](Family f) { return f == Family::kSimPO; });
  family_options.emplace_back(
      pref->add_option("--cpo-alpha", o.cpo_alpha,
                       "NLL weight of CPO (default 1) and SimPO (default 0)"),
      [](Family f) { return f == Family::kSimPO || f == Family::kCPO; });
  family_options.emplace_back(pref->add_option("--cpo-loss-type", o.cpo_loss_type, "CPO's form")
                                  ->check(CLI::IsMember({"sigmoid", "hinge", "ipo"}))
                                  ->capture_default_str(),
                              [](Family f) { return f == Family::kCPO; });
  const auto kto_only = [](Family f) { return f == Family::kKTO; };
  family_options.emplace_back(
      pref->add_option("--desirable-weight", o.desirable_weight, "KTO weight of desirable examples")
          ->capture_default_str(),
      kto_only);
  family_options.emplace_back(pref->add_option("--undesirable-weight", o.undesirable_weight,
                                               "KTO weight of undesirable examples")
                                  ->capture_default_str(),
                              kto_only);
  pref->add_flag("--swap-preferences", o.swap_preferences,
                 "negative control: train on every pair with chosen and rejected exchanged "
                 "(evaluation still scores the true preference)");

  auto* logging = app.add_option_group("logging and evaluation");
  logging->add_option("--log-every", o.log_every, "steps per metrics record")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  logging->add_option("--print-every", o.print_every, "steps between metrics lines on the terminal")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  logging->add_option("--eval-every", o.eval_every, "steps between held-out evaluations")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  logging->add_option("--eval-size", o.eval_size, "held-out prompts (never trained on)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  o.steps = steps.value_or(o.from == "base" ? 1000 : 300);
  o.lr = lr.value_or(o.from == "base" ? 3e-3 : 1e-4);
  o.beta = beta.value_or(default_beta(o.loss));
  o.label_smoothing =
      label_smoothing.value_or(o.loss == "exo_pair" ? 1e-3 : 0.0);  // EXO needs ε > 0
  const auto fail = [](const std::string& msg) {
    fmt::print(stderr, "prefopt-demo: error: {}\n", msg);
    return 2;
  };
  if (o.dim % o.heads != 0)
    return fail(fmt::format("--heads {} does not divide --dim {}", o.heads, o.dim));
  if (o.from == "base" && needs_reference(family_of(o.loss)))
    return fail(
        fmt::format("--loss {} needs a reference model; use --from sft (base works for orpo, "
                    "simpo and cpo)",
                    o.loss));
  if (o.from == "base" && (!o.load_sft.empty() || !o.save_sft.empty()))
    return fail("--load-sft/--save-sft need --from sft");
  // A set option that nothing reads is an error, not a run without it (as in prefopt-train):
  // another family's option, or the SFT stage's where none is trained.
  for (const auto& [opt, reads] : family_options) {
    if (opt->count() > 0 && !reads(family_of(o.loss)))
      return fail(fmt::format("{} is not used by --loss {}", opt->get_name(), o.loss));
  }
  if (o.from == "base" || !o.load_sft.empty()) {
    for (const auto* opt : sft_options) {
      if (opt->count() > 0)
        return fail(fmt::format("{} is not used with {}", opt->get_name(),
                                o.from == "base" ? "--from base" : "--load-sft"));
    }
  }
  int64_t space = 1;
  for (int i = 0; i < 2 * o.digits; ++i) space *= 10;
  if (o.eval_size * 2 > space)
    return fail(fmt::format("--eval-size {} leaves too few of the {} problems to train on",
                            o.eval_size, space));
  if (o.batch > o.pairs)
    return fail(fmt::format("--batch {} exceeds --pairs {}", o.batch, o.pairs));
  try {
    return run(o);
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
