// SPDX-License-Identifier: Apache-2.0
// eigen_dpo: preference training in a host with no libtorch at all. The model is a small MLP
// written with Eigen (mlp.h) with hand-written backprop; prefopt::eigen supplies the
// log-prob gathering, the losses and their gradients, which the host multiplies into its own
// backward pass:
//
//   logits [N, V] --gather_packed_logprobs--> per-sequence sums --dpo_loss--> loss
//   dL/dlogits <--gather_packed_logprobs_backward-- dL/dsums <--grad_policy_*--'
//
// The task is the demo's (examples/demo): fixed-width addition. Stage 1 fine-tunes on a sloppy
// teacher that drops carries; stage 2 runs DPO against the frozen SFT model (its log-probs
// precomputed) with chosen = the correct answer, rejected = the typical mistake. Held-out exact
// match before and after DPO shows what the preference stage fixed.
#include <prefopt/eigen.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "../common/arith.h"
#include "mlp.h"

namespace pe = prefopt::eigen;

namespace {

// ------------------------------------------------------------------------------ encoding
// Each answer digit is one row: the model sees the prompt's digits, the answer position and
// the answer digits before it (teacher forcing), all one-hot, and predicts the digit (V = 10).
// A completion of n + 1 digits is a sequence of n + 1 rows, all scored: the gathering runs
// with shift(false), since each row already scores its own label.

struct Encoder {
  int n;  // digits per operand
  int inputs() const { return 20 * n + (n + 1) + 10 * n; }
  int max_active() const { return 2 * n + 1 + n; }
  int rows_per_sequence() const { return n + 1; }

  /// Features of answer position `j` of problem `p`, given the answer's first j digits.
  void row(const arith::Problem& p, int j, const int* prev, int* out) const {
    const auto a = arith::Task::digits_of(p.a, n), b = arith::Task::digits_of(p.b, n);
    int k = 0;
    for (int i = 0; i < n; ++i) out[k++] = 10 * i + a[static_cast<size_t>(i)];
    for (int i = 0; i < n; ++i) out[k++] = 10 * n + 10 * i + b[static_cast<size_t>(i)];
    out[k++] = 20 * n + j;
    for (int i = 0; i < n; ++i) out[k++] = i < j ? 21 * n + 1 + 10 * i + prev[i] : -1;
  }
};

/// Sequences (problem, answer) as the model's rows, their labels and the packing.
struct Batch {
  mlp::Features x;
  pe::IndexVector labels, cu_seqlens;
};

Batch encode(const Encoder& enc, const std::vector<arith::Problem>& problems,
             const std::vector<int64_t>& answers) {
  const int L = enc.rows_per_sequence(), S = static_cast<int>(problems.size());
  Batch batch;
  batch.x.K = enc.max_active();
  batch.x.idx.resize(static_cast<size_t>(S * L * batch.x.K));
  batch.labels.resize(S * L);
  for (int s = 0; s < S; ++s) {
    const auto digits = arith::Task::digits_of(answers[static_cast<size_t>(s)], L);
    for (int j = 0; j < L; ++j) {
      const int r = s * L + j;
      enc.row(problems[static_cast<size_t>(s)], j, digits.data(),
              &batch.x.idx[static_cast<size_t>(r * batch.x.K)]);
      batch.labels(r) = digits[static_cast<size_t>(j)];
    }
  }
  batch.cu_seqlens = pe::cu_seqlens_from_lengths(pe::IndexVector::Constant(S, L));
  return batch;
}

const auto kGather = pe::GatherLogprobsOptions().shift(false);

/// Summed log-probs of each answer under `model` (no gradient needed).
Eigen::VectorXf sequence_logps(const mlp::MLP& model, const Encoder& enc,
                               const std::vector<arith::Problem>& problems,
                               const std::vector<int64_t>& answers) {
  const auto b = encode(enc, problems, answers);
  return pe::gather_packed_logprobs(model.forward(b.x), b.labels, b.cu_seqlens, kGather).sum;
}

/// Greedy answers, one digit at a time.
std::vector<int64_t> greedy(const mlp::MLP& model, const Encoder& enc,
                            const std::vector<arith::Problem>& problems) {
  const int S = static_cast<int>(problems.size()), L = enc.rows_per_sequence();
  std::vector<std::vector<int>> digits(static_cast<size_t>(S), std::vector<int>(L, 0));
  mlp::Features x;
  x.K = enc.max_active();
  x.idx.resize(static_cast<size_t>(S * x.K));
  for (int j = 0; j < L; ++j) {
    for (int s = 0; s < S; ++s)
      enc.row(problems[static_cast<size_t>(s)], j, digits[static_cast<size_t>(s)].data(),
              &x.idx[static_cast<size_t>(s * x.K)]);
    const mlp::Mat logits = model.forward(x);
    for (int s = 0; s < S; ++s)
      logits.row(s).maxCoeff(&digits[static_cast<size_t>(s)][static_cast<size_t>(j)]);
  }
  std::vector<int64_t> out;
  for (const auto& d : digits) out.push_back(arith::Task::value(d));
  return out;
}

// ------------------------------------------------------------------------------ evaluation

struct Eval {
  double exact = 0, exact_carry = 0, exact_no_carry = 0, dropped = 0, preference = 0;
};

Eval evaluate(const mlp::MLP& model, const Encoder& enc, const arith::Task& task,
              const std::vector<arith::Problem>& problems, const std::vector<int64_t>& rejected) {
  const auto answers = greedy(model, enc, problems);
  std::vector<int64_t> correct;
  for (const auto& p : problems) correct.push_back(arith::Task::correct(p));
  const Eigen::VectorXf lc = sequence_logps(model, enc, problems, correct);
  const Eigen::VectorXf lr = sequence_logps(model, enc, problems, rejected);
  Eval e;
  double n_carry = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    const bool carry = task.has_carry(problems[i]), ok = answers[i] == correct[i];
    n_carry += carry;
    e.exact += ok;
    (carry ? e.exact_carry : e.exact_no_carry) += ok;
    e.dropped += carry && answers[i] == task.dropped_carry(problems[i]);
    e.preference += lc(static_cast<Eigen::Index>(i)) > lr(static_cast<Eigen::Index>(i));
  }
  const double n = static_cast<double>(problems.size());
  e.exact /= n, e.preference /= n;
  e.exact_carry /= std::max(n_carry, 1.0);
  e.exact_no_carry /= std::max(n - n_carry, 1.0);
  e.dropped /= std::max(n_carry, 1.0);
  return e;
}

void print_metrics(const char* what, int step, const pe::Metrics& m) {
  std::printf("%s %4d", what, step);
  for (const auto& [name, value] : m) std::printf(" %s=%.4g", name.c_str(), value);
  std::printf("\n");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run(int argc, char** argv) {
  CLI::App app{"Preference training with prefopt::eigen: a host with no libtorch"};
  app.option_defaults()->always_capture_default();
  int digits = 3, hidden = 256, sft_steps = 3000, sft_batch = 128, dpo_steps = 300, dpo_batch = 64,
      pairs = 8000, held_out = 500;
  uint64_t seed = 0;
  double sloppy = 0.6, sft_lr = 1e-2, dpo_lr = 1e-3, beta = 2.0, label_smoothing = 0.0;
  std::optional<double> min_gain;
  std::string loss_name = "sigmoid";
  app.add_option("--digits", digits, "Digits per operand")->check(CLI::Range(1, 6));
  app.add_option("--hidden", hidden, "MLP hidden width")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "Seed of the data and the initialisation");
  app.add_option("--sloppy", sloppy,
                 "SFT teacher: share of carrying problems answered with the carry dropped")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--sft-steps", sft_steps, "SFT steps")->check(CLI::NonNegativeNumber);
  app.add_option("--sft-batch", sft_batch, "SFT problems per step")->check(CLI::PositiveNumber);
  app.add_option("--sft-lr", sft_lr, "SFT learning rate (Adam)")->check(CLI::PositiveNumber);
  app.add_option("--loss", loss_name, "DPO loss type (TRL's name: sigmoid, ipo, hinge, ...)");
  app.add_option("--beta", beta, "DPO beta");
  app.add_option("--label-smoothing", label_smoothing, "epsilon of robust/exo_pair/aot");
  app.add_option("--dpo-steps", dpo_steps, "DPO steps")->check(CLI::NonNegativeNumber);
  app.add_option("--dpo-batch", dpo_batch, "Pairs per DPO step")->check(CLI::PositiveNumber);
  app.add_option("--dpo-lr", dpo_lr, "DPO learning rate (Adam)")->check(CLI::PositiveNumber);
  app.add_option("--pairs", pairs, "Training preference pairs")->check(CLI::PositiveNumber);
  app.add_option("--held-out", held_out, "Held-out problems scored before and after DPO")
      ->check(CLI::PositiveNumber);
  app.add_option("--min-gain", min_gain,
                 "Exit with status 1 unless held-out exact match rises by more than this");
  CLI11_PARSE(app, argc, argv);
  const auto loss_type = pe::value_of<prefopt::DPOLossType>(loss_name);
  // The loss's options are checked now, not after the SFT stage: the loss of one pair throws
  // the library's named error for an option it refuses (label_smoothing that no selected type
  // reads, beta <= 0, exo_pair without label_smoothing, ...).
  auto opts = pe::DPOLossOptions().loss_type(loss_type).beta(beta).label_smoothing(label_smoothing);
  {
    const Eigen::VectorXf zero = Eigen::VectorXf::Zero(1);
    const Eigen::VectorXd one = Eigen::VectorXd::Ones(1);
    pe::dpo_loss(pe::PairInputs<float>()
                     .policy_chosen_logps(zero)
                     .policy_rejected_logps(zero)
                     .reference_chosen_logps(zero)
                     .reference_rejected_logps(zero)
                     .chosen_lengths(one)
                     .rejected_lengths(one)
                     .logps_form(prefopt::LogpsForm::kSum),
                 opts);
  }
  // Every problem is drawn from the (10^digits)^2 there are, the held-out ones excluded.
  int64_t space = 1;
  for (int i = 0; i < 2 * digits; ++i) space *= 10;
  if (2 * static_cast<int64_t>(held_out) > space) {
    std::fprintf(stderr,
                 "eigen_dpo: error: --held-out %d leaves too few of the %lld problems of %d-digit "
                 "addition to train on\n",
                 held_out, static_cast<long long>(space), digits);
    return 2;
  }
  const auto t_start = std::chrono::steady_clock::now();

  const arith::Task task(digits);
  const Encoder enc{digits};
  std::unordered_set<int64_t> held_keys;
  const auto eval_problems = arith::held_out_problems(task, seed, held_out, held_keys);
  arith::Sampler sampler(task, seed + 1, held_keys);
  std::vector<int64_t> eval_rejected;
  for (const auto& p : eval_problems)
    eval_rejected.push_back(arith::rejected_answer(task, p, sampler.rng()));

  mlp::MLP model(enc.inputs(), hidden, 10, seed + 2);
  std::printf(
      "prefopt %s eigen_dpo: %d-digit addition, MLP %d -> %d -> 10 (%lld parameters), no "
      "libtorch\n",
      PREFOPT_VERSION_STRING, digits, enc.inputs(), hidden, static_cast<long long>(model.size()));

  // ---------------------------------------------------------------------------- stage 1: SFT
  // Token-mean NLL over every answer token: L = −Σ_s sum_s / Σ_s count_s, so dL/dsum_s is
  // −1/Σ count for every sequence; the gathering's backward turns that into dL/dlogits.
  std::printf(
      "stage 1: SFT, %d steps of %d problems; %.0f%% of those with a carry are answered "
      "with it dropped\n",
      sft_steps, sft_batch, 100 * sloppy);
  {
    mlp::Adam adam(model.params(), sft_lr);
    mlp::Params grad = model.params().zeros_like();
    pe::MetricAccumulator metrics;
    for (int step = 1; step <= sft_steps; ++step) {
      std::vector<arith::Problem> problems;
      std::vector<int64_t> answers;
      for (int i = 0; i < sft_batch; ++i) {
        const auto p = sampler.draw();
        const bool drop = task.has_carry(p) && sampler.uniform() < sloppy;
        problems.push_back(p);
        answers.push_back(drop ? task.dropped_carry(p) : arith::Task::correct(p));
      }
      const Batch b = encode(enc, problems, answers);
      mlp::Mat h;
      const mlp::Mat logits = model.forward(b.x, &h);
      const auto lp = pe::gather_packed_logprobs(logits, b.labels, b.cu_seqlens, kGather);
      const float tokens = static_cast<float>(std::max<int64_t>(lp.count.sum(), 1));
      const float loss = -lp.sum.sum() / tokens;
      const Eigen::VectorXf dsum = Eigen::VectorXf::Constant(lp.size(), -1.f / tokens);
      const mlp::Mat dlogits = pe::gather_packed_logprobs_backward<float>(
          logits, b.labels, b.cu_seqlens, dsum, Eigen::VectorXf(), kGather);
      grad.set_zero();
      model.backward(b.x, h, dlogits, grad);
      metrics.add_scalar("loss", loss);
      metrics.add_scalar("grad_norm", adam.step(model.params(), grad));
      if (step % 250 == 0 || step == sft_steps) print_metrics("sft step", step, metrics.compute());
    }
  }
  const double t_sft = seconds_since(t_start);
  const Eval before = evaluate(model, enc, task, eval_problems, eval_rejected);
  std::printf(
      "SFT model: held-out exact match %.3f (with a carry %.3f, carry dropped in %.3f) "
      "[%.1f s]\n",
      before.exact, before.exact_carry, before.dropped, t_sft);

  // ---------------------------------------------------------------------------- stage 2: DPO
  // Chosen = the correct answer, rejected = the typical mistake. The reference is the frozen
  // SFT model; its log-probs are computed once (TRL's precompute_ref_log_probs).
  std::vector<arith::Problem> train;
  std::vector<int64_t> chosen, rejected;
  for (int i = 0; i < pairs; ++i) {
    const auto p = sampler.draw();
    train.push_back(p);
    chosen.push_back(arith::Task::correct(p));
    rejected.push_back(arith::rejected_answer(task, p, sampler.rng()));
  }
  const Eigen::VectorXf ref_chosen = sequence_logps(model, enc, train, chosen);
  const Eigen::VectorXf ref_rejected = sequence_logps(model, enc, train, rejected);
  std::printf(
      "stage 2: %s from the SFT model, beta %g, %d steps of %d pairs (%d training pairs, "
      "reference log-probs precomputed)\n",
      loss_name.c_str(), beta, dpo_steps, dpo_batch, pairs);
  {
    mlp::Adam adam(model.params(), dpo_lr);
    mlp::Params grad = model.params().zeros_like();
    pe::MetricAccumulator metrics;
    std::vector<int> order(static_cast<size_t>(pairs));
    for (int i = 0; i < pairs; ++i) order[static_cast<size_t>(i)] = i;
    size_t cursor = order.size();
    for (int step = 1; step <= dpo_steps; ++step) {
      // One batch: B chosen sequences followed by their B rejected ones.
      std::vector<arith::Problem> problems;
      std::vector<int64_t> answers;
      std::vector<int> ids;
      for (int i = 0; i < dpo_batch; ++i) {
        if (cursor == order.size()) {
          std::shuffle(order.begin(), order.end(), sampler.rng());
          cursor = 0;
        }
        ids.push_back(order[cursor++]);
      }
      for (int side = 0; side < 2; ++side) {
        for (int id : ids) {
          problems.push_back(train[static_cast<size_t>(id)]);
          answers.push_back((side == 0 ? chosen : rejected)[static_cast<size_t>(id)]);
        }
      }
      const Batch b = encode(enc, problems, answers);
      mlp::Mat h;
      const mlp::Mat logits = model.forward(b.x, &h);
      const auto policy =
          pe::split_pairs(pe::gather_packed_logprobs(logits, b.labels, b.cu_seqlens, kGather));
      pe::PairLogprobs<float> reference = policy;
      for (int i = 0; i < dpo_batch; ++i) {
        reference.chosen.sum(i) = ref_chosen(ids[static_cast<size_t>(i)]);
        reference.rejected.sum(i) = ref_rejected(ids[static_cast<size_t>(i)]);
      }
      const auto inputs = pe::PairInputs<float>(policy, reference);
      const auto r = pe::dpo_loss(inputs, opts);
      // dL/dsum of each sequence, in the batch's order [chosen..., rejected...], back to the
      // logits, then through the model.
      Eigen::VectorXf dsum(2 * dpo_batch);
      dsum << r.grad_policy_chosen, r.grad_policy_rejected;
      const mlp::Mat dlogits = pe::gather_packed_logprobs_backward<float>(
          logits, b.labels, b.cu_seqlens, dsum, Eigen::VectorXf(), kGather);
      grad.set_zero();
      model.backward(b.x, h, dlogits, grad);
      metrics.add(r, inputs);
      metrics.add_scalar("grad_norm", adam.step(model.params(), grad));
      if (step % 50 == 0 || step == dpo_steps) print_metrics("step", step, metrics.compute());
    }
  }
  const Eval after = evaluate(model, enc, task, eval_problems, eval_rejected);
  const double t_total = seconds_since(t_start);

  std::printf("\nheld-out prompts (%d), SFT -> %s:\n", held_out, loss_name.c_str());
  std::printf("  %-44s %8s %8s %8s\n", "", "before", "after", "change");
  const auto line = [](const char* what, double a, double b) {
    std::printf("  %-44s %8.3f %8.3f %+8.3f\n", what, a, b, b - a);
  };
  line("exact match (greedy)", before.exact, after.exact);
  line("exact match, problems with a carry", before.exact_carry, after.exact_carry);
  line("exact match, problems without", before.exact_no_carry, after.exact_no_carry);
  line("answers with the carry dropped", before.dropped, after.dropped);
  line("preference accuracy: log p(c) > log p(r)", before.preference, after.preference);
  std::printf("wall time %.1f s (SFT %.1f s, DPO and evaluation %.1f s)\n", t_total, t_sft,
              t_total - t_sft);
  if (min_gain) {
    const double gain = after.exact - before.exact;
    const bool ok = gain > *min_gain;
    std::printf("check: exact match %.3f -> %.3f (%+.3f, needs > %+.3f): %s\n", before.exact,
                after.exact, gain, *min_gain, ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A bad option (an unknown loss, one the loss refuses) ends with the library's message and
  // status 2, not an uncaught exception's abort.
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eigen_dpo: error: %s\n", e.what());
    return 2;
  }
}
