// SPDX-License-Identifier: Apache-2.0
// prefopt-train: SFT and preference training of a pretrained Hugging Face checkpoint on real
// preference data, written as the C++ trainer you would start from.
//
//   model    a Llama-architecture checkpoint (config.json + model.safetensors), llama.h
//   tokens   its tokenizer.json (SentencePiece-style BPE), tokenizer.h
//   data     TRL's preference and unpaired formats, HH-RLHF, Stack Exchange pairs, data.h
//   loss     SFT, every DPO loss_type (and lists of them), ORPO, SimPO, CPO, TPO, KTO and
//            apo_zero_unpaired, each with TRL's option names; the policy's log-probs come from
//            prefopt's fused op on the hidden states and the LM-head weight (no logits)
//   training AdamW, warmup then cosine decay, gradient accumulation and clipping; reference
//            log-probs computed once (TRL's precompute_ref_log_probs)
//   output   metrics with TRL's names (terminal and JSON Lines), held-out evaluation, a
//            gnuplot PNG, summary.json and the trained model as model.safetensors + config.json
//
//   prefopt-train                                  # DPO on HH-RLHF harmless-base, TinyStories-656K
//   prefopt-train --loss orpo --output_dir runs/orpo
//   prefopt-train --config run.toml                # the same options from a TOML/INI file
#include <prefopt/fmt.h>
#include <prefopt/prefopt.h>

#include <fmt/core.h>
#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join (in format.h before {fmt} 11)
#include <torch/cuda.h>
#include <torch/nn.h>
#include <torch/optim/adamw.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <regex>
#include <sstream>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "../demo/plot.h"
#include "../demo/progress.h"
#include "data.h"
#include "llama.h"
#include "safetensors.h"
#include "tokenizer.h"

namespace F = prefopt::functional;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// Options (TRL's names: DPOConfig, CPOConfig, ORPOConfig, KTOConfig, TPOConfig, TrainingArguments)

enum class Family { kSFT, kDPO, kORPO, kSimPO, kCPO, kTPO, kKTO };

struct Options {
  std::string model, data, eval_data, output_dir = "train-out", device = "cpu";
  int64_t eval_start = 2000, train_limit = 0, eval_limit = 0;
  uint64_t seed = 0;
  int threads = 1;
  bool plot = true, save = true;
  // Typographic punctuation to ASCII: --ascii on, --no-ascii off, neither when the tokenizer
  // has no byte fallback (such a vocabulary, TinyStories', would turn them into <unk>).
  bool ascii_on = false, ascii_off = false;
  std::string implicit_prompt = "assistant";
  bool implicit_prompt_given = false;  // --implicit_prompt on the command line or in --config
  bool plain_chat_template = false;
  // training
  std::string loss = "sigmoid";
  int64_t max_steps = -1, batch = 8, eval_batch = 32, accum = 1;
  double epochs = 1.0, lr = 1e-3, warmup_ratio = 0.1, weight_decay = 0.0, max_grad_norm = 1.0;
  std::string scheduler = "cosine";
  int64_t max_length = 192, max_prompt_length = 128;
  std::string truncation = "keep_start";
  bool one_pass = false;
  // logging and evaluation
  int64_t logging_steps = 10, eval_steps = 50, print_every = 50, eval_train_pairs = 256;
  // losses
  std::optional<double> beta;
  double label_smoothing = 0.0, rpo_alpha = 0.0, f_alpha_divergence_coef = 0.5, discopop_tau = 0.05,
         simpo_gamma = 0.5, alpha = 0.0, desirable_weight = 1.0, undesirable_weight = 1.0,
         tpo_alpha = 1.0, tpo_l_gamma = 0.5;
  std::optional<double> cpo_alpha;
  bool cdpo = false;
  std::string f_divergence_type = "reverse_kl", cpo_loss_type = "sigmoid",
              tpo_loss_type = "sigmoid";
  std::vector<double> loss_weights;
};

const std::vector<std::string>& dpo_types() {
  static const std::vector<std::string> names = {
      "sigmoid",   "hinge", "ipo",          "robust",   "exo_pair", "nca_pair", "bco_pair",
      "sppo_hard", "aot",   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"};
  return names;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(item);
  return out;
}

Family family_of(const std::string& loss) {
  if (loss == "sft") return Family::kSFT;
  if (loss == "orpo") return Family::kORPO;
  if (loss == "simpo") return Family::kSimPO;
  if (loss == "cpo") return Family::kCPO;
  if (loss == "tpo") return Family::kTPO;
  if (loss == "kto" || loss == "apo_zero_unpaired") return Family::kKTO;
  return Family::kDPO;  // a DPO loss_type, or a comma-separated list of them
}

bool needs_reference(Family f) { return f == Family::kDPO || f == Family::kKTO; }

// Checks --loss; returns an error message, empty when valid.
std::string check_loss(const std::string& loss) {
  for (const char* n : {"sft", "orpo", "simpo", "cpo", "tpo", "kto", "apo_zero_unpaired"})
    if (loss == n) return {};
  for (const auto& t : split_list(loss)) {
    if (t == "sft" && loss != "sft") continue;  // DPO's "sft" term in a list (MPO)
    if (std::find(dpo_types().begin(), dpo_types().end(), t) == dpo_types().end())
      return fmt::format(
          "--loss {}: unknown loss \"{}\" (sft, a DPO loss_type: {}, a comma-separated list of "
          "them, orpo, simpo, cpo, tpo, kto or apo_zero_unpaired)",
          loss, t, fmt::join(dpo_types(), ", "));
  }
  return {};
}

// TRL's defaults (DPOConfig, KTOConfig, CPOConfig, ORPOConfig's λ: 0.1; TPOConfig: 0.01),
// except SimPO, whose β is the paper's 2 (prefopt's SimPOLossOptions).
double default_beta(Family f) {
  if (f == Family::kSimPO) return 2.0;
  if (f == Family::kTPO) return 0.01;
  return 0.1;
}

// ---------------------------------------------------------------------------------------------
// Sequence log-probs

// Rows [start, start + n) of every defined field.
prefopt::SequenceLogprobs narrow_rows(const prefopt::SequenceLogprobs& lp, int64_t start,
                                      int64_t n) {
  const auto f = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, start, n) : t; };
  prefopt::SequenceLogprobs out;
  out.sum = f(lp.sum), out.count = f(lp.count), out.mean = f(lp.mean);
  out.token_logps = f(lp.token_logps), out.token_mask = f(lp.token_mask);
  out.logits_sum = f(lp.logits_sum), out.logits_sum_all = f(lp.logits_sum_all);
  out.positions = f(lp.positions), out.correct = f(lp.correct);
  out.entropy_sum = f(lp.entropy_sum), out.wpo_weights = f(lp.wpo_weights);
  return out;
}

prefopt::SequenceLogprobs select_rows(const prefopt::SequenceLogprobs& lp, const at::Tensor& idx) {
  const auto f = [&](const at::Tensor& t) { return t.defined() ? t.index_select(0, idx) : t; };
  prefopt::SequenceLogprobs out;
  out.sum = f(lp.sum), out.count = f(lp.count), out.mean = f(lp.mean);
  out.token_logps = f(lp.token_logps), out.token_mask = f(lp.token_mask);
  out.logits_sum = f(lp.logits_sum), out.logits_sum_all = f(lp.logits_sum_all);
  out.positions = f(lp.positions), out.correct = f(lp.correct);
  out.entropy_sum = f(lp.entropy_sum), out.wpo_weights = f(lp.wpo_weights);
  return out;
}

// Sequences and tokens through a model's forward pass (the reference's and the policy's, in
// training and evaluation), for summary.json: what no term reads must not be forwarded (TPO's
// gold responses with tpo_alpha 0, as TRL's collator drops them).
struct Forwarded {
  int64_t sequences = 0, tokens = 0;
} forwarded;

// The LM-head side of a batch: the model's final hidden states, its head and the labels.
prefopt::HeadBatch head_batch(train::LlamaForCausalLM& model,
                              const std::vector<const train::Sequence*>& rows, int64_t pad_id,
                              const at::Device& device) {
  forwarded.sequences += static_cast<int64_t>(rows.size());
  for (const auto* r : rows) forwarded.tokens += static_cast<int64_t>(r->ids.size());
  const auto b = train::collate(rows, pad_id);
  return prefopt::HeadBatch(model->hidden(b.ids.to(device), b.attention_mask.to(device)),
                            model->head_weight(), {}, b.labels.to(device));
}

// The policy's log-probs of a batch, through the fused op: hidden states and the LM-head
// weight in, per-sequence sums out, no [N, V] logits.
prefopt::SequenceLogprobs forward_logps(train::LlamaForCausalLM& model,
                                        const std::vector<const train::Sequence*>& rows,
                                        int64_t pad_id, const at::Device& device,
                                        const prefopt::FusedLogprobsOptions& opts = {}) {
  const auto b = head_batch(model, rows, pad_id, device);
  return F::fused_logprobs(b.hidden(), b.weight(), {}, b.labels(), opts);
}

// Sums and counts of `rows` under `model`, without a graph, `per_batch` sequences at a time.
// The same rows in the same batches give bit-identical results, which keeps a policy that
// equals its reference at exactly zero reward.
prefopt::SequenceLogprobs score(train::LlamaForCausalLM& model,
                                const std::vector<const train::Sequence*>& rows, int64_t pad_id,
                                const at::Device& device, int64_t per_batch) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> sums, counts;
  for (size_t i = 0; i < rows.size(); i += static_cast<size_t>(per_batch)) {
    const auto end = std::min(rows.size(), i + static_cast<size_t>(per_batch));
    const std::vector<const train::Sequence*> part(rows.begin() + static_cast<std::ptrdiff_t>(i),
                                                   rows.begin() + static_cast<std::ptrdiff_t>(end));
    const auto lp = forward_logps(model, part, pad_id, device);
    sums.push_back(lp.sum), counts.push_back(lp.count);
  }
  prefopt::SequenceLogprobs out;
  const auto opts = at::TensorOptions(device);
  out.sum = sums.empty() ? at::zeros({0}, opts) : at::cat(sums);
  out.count = counts.empty() ? at::zeros({0}, opts.dtype(at::kLong)) : at::cat(counts);
  out.mean = out.sum / out.count.clamp_min(1).to(out.sum.scalar_type());
  return out;
}

// ---------------------------------------------------------------------------------------------
// The data the trainer works on

struct PairData {
  std::vector<train::TokenizedPair> pairs;
  at::Tensor ref_chosen, ref_rejected;  // [N] reference sums (DPO family, KTO)
  prefopt::PairLogprobs reference;      // the same with token counts
  std::vector<const train::Sequence*> side(int which) const {  // 0 chosen, 1 rejected, 2 gold
    std::vector<const train::Sequence*> out;
    for (const auto& p : pairs)
      out.push_back(which == 0 ? &p.chosen : which == 1 ? &p.rejected : &p.gold);
    return out;
  }
  int64_t size() const { return static_cast<int64_t>(pairs.size()); }
};

// Unpaired (KTO) examples and the mismatched completions of the KL estimate: example i's
// prompt with the completion of example `partner` (TRL rotates completions within a batch;
// here the rotation is fixed, so the reference's KL log-probs can be precomputed too).
struct UnpairedData {
  std::vector<train::Sequence> examples, kl;
  std::vector<bool> label;
  at::Tensor ref, ref_kl;  // [N]
  int64_t size() const { return static_cast<int64_t>(examples.size()); }
  std::vector<const train::Sequence*> rows(const std::vector<train::Sequence>& v) const {
    std::vector<const train::Sequence*> out;
    for (const auto& s : v) out.push_back(&s);
    return out;
  }
};

// TRL's unpair_preference_dataset: each pair gives a desirable and an undesirable example.
UnpairedData unpair(const std::vector<train::TokenizedPair>& pairs) {
  UnpairedData u;
  for (const auto& p : pairs) {
    u.examples.push_back(p.chosen), u.label.push_back(true);
    u.examples.push_back(p.rejected), u.label.push_back(false);
  }
  return u;
}

// KL completions: the next pair's example of the same kind (stride 2 when unpaired from
// pairs, so that a prompt never meets its own pair's answer), capped at max_length. The KL
// completion is the other example's completion as truncated with its own prompt; TRL cuts own
// prompt + the whole other completion, which keeps more of it when the own prompt is shorter.
void make_kl(UnpairedData& u, int64_t stride, int64_t max_length) {
  const auto n = u.size();
  for (int64_t i = 0; i < n; ++i) {
    const auto& own = u.examples[static_cast<size_t>(i)];
    const auto& other = u.examples[static_cast<size_t>((i + stride) % n)];
    train::Sequence s;
    s.ids.assign(own.ids.begin(), own.ids.begin() + own.prompt_len);
    s.prompt_len = own.prompt_len;
    s.ids.insert(s.ids.end(), other.ids.begin() + other.prompt_len, other.ids.end());
    if (static_cast<int64_t>(s.ids.size()) > max_length)
      s.ids.resize(static_cast<size_t>(max_length));
    if (s.completion_len() <= 0) s.ids.push_back(other.ids.back());  // keep one scored token
    u.kl.push_back(std::move(s));
  }
}

// ---------------------------------------------------------------------------------------------
// The loss of each family, with TRL's options

struct Loss {
  Family family;
  std::string name;
  prefopt::DPOLossOptions dpo;
  prefopt::ORPOLossOptions orpo;
  prefopt::SimPOLossOptions simpo;
  prefopt::CPOLossOptions cpo;
  prefopt::TPOLossOptions tpo;
  prefopt::KTOLossOptions kto;

  explicit Loss(const Options& o) : family(family_of(o.loss)), name(o.loss) {
    const double beta = o.beta.value_or(default_beta(family));
    if (family == Family::kDPO) {
      std::vector<prefopt::DPOLossType> types;
      for (const auto& t : split_list(o.loss)) types.push_back(prefopt::dpo_loss_type_from_name(t));
      dpo.loss_type(types)
          .loss_weights(o.loss_weights)
          .beta(beta)
          .label_smoothing(o.label_smoothing)
          .cdpo(o.cdpo)
          .rpo_alpha(o.rpo_alpha)
          .f_divergence_type(prefopt::f_divergence_from_name(o.f_divergence_type))
          .f_alpha_divergence_coef(o.f_alpha_divergence_coef)
          .discopop_tau(o.discopop_tau);
    }
    orpo.beta(beta);
    simpo.beta(beta).simpo_gamma(o.simpo_gamma).label_smoothing(o.label_smoothing).alpha(o.alpha);
    if (o.cpo_alpha) simpo.cpo_alpha(*o.cpo_alpha);
    cpo.loss_type(prefopt::cpo_loss_type_from_name(o.cpo_loss_type))
        .beta(beta)
        .label_smoothing(o.label_smoothing)
        .simpo_gamma(o.simpo_gamma)
        .alpha(o.alpha);
    if (o.cpo_alpha) cpo.cpo_alpha(*o.cpo_alpha);
    tpo.loss_type(prefopt::tpo_loss_type_from_name(o.tpo_loss_type))
        .beta(beta)
        .label_smoothing(o.label_smoothing)
        .tpo_alpha(o.tpo_alpha)
        .tpo_l_gamma(o.tpo_l_gamma);
    kto.loss_type(prefopt::kto_loss_type_from_name(o.loss == "apo_zero_unpaired" ? o.loss : "kto"))
        .beta(beta)
        .desirable_weight(o.desirable_weight)
        .undesirable_weight(o.undesirable_weight);
  }

  // A pairwise step (or evaluation) on the policy's log-probs: returns the loss and adds the
  // micro-step's metrics (`token_metrics`: the policy's token statistics were gathered).
  // `gold`: TPO's gold responses (nullptr when tpo_alpha = 0: nothing reads them).
  at::Tensor pairs(const prefopt::PairLogprobs& policy, const at::Tensor& ref_chosen,
                   const at::Tensor& ref_rejected, const prefopt::SequenceLogprobs* gold,
                   prefopt::MetricAccumulator& metrics, bool token_metrics,
                   const at::Tensor& policy_kl = {}, const at::Tensor& reference_kl = {}) const {
    switch (family) {
      case Family::kSFT: {  // TRL's SFT on the chosen completions: token-mean NLL
        const auto loss = -policy.chosen.sum.sum() / policy.chosen.count.sum().clamp_min(1);
        if (token_metrics)
          metrics.add(loss, policy.chosen);
        else
          metrics.add_scalar("loss", loss);
        return loss;
      }
      case Family::kDPO: {
        const auto in = prefopt::PairInputs(policy)
                            .reference_chosen_logps(ref_chosen)
                            .reference_rejected_logps(ref_rejected);
        const auto r = F::dpo_loss(in, dpo);
        token_metrics ? metrics.add(r, in, policy) : metrics.add(r, in);
        return r.loss;
      }
      case Family::kORPO: {
        const auto in = prefopt::PairInputs::averaged(policy);
        const auto r = F::orpo_loss(in, orpo);
        token_metrics ? metrics.add(r, in, policy) : metrics.add(r, in);
        return r.loss;
      }
      case Family::kSimPO: {
        const auto in = prefopt::PairInputs::averaged(policy);
        const auto r = F::simpo_loss(in, simpo);
        token_metrics ? metrics.add(r, in, policy) : metrics.add(r, in);
        return r.loss;
      }
      case Family::kCPO: {
        const bool means = cpo.loss_type() != prefopt::CPOLossType::kSigmoid &&
                           cpo.loss_type() != prefopt::CPOLossType::kHinge;
        const auto in = means ? prefopt::PairInputs::averaged(policy) : prefopt::PairInputs(policy);
        const auto r = F::cpo_loss(in, cpo);
        token_metrics ? metrics.add(r, in, policy) : metrics.add(r, in);
        return r.loss;
      }
      case Family::kTPO: {
        const bool means = tpo.loss_type() == prefopt::TPOLossType::kIPO ||
                           tpo.loss_type() == prefopt::TPOLossType::kTPOL;
        const auto in = means ? prefopt::PairInputs::averaged(policy) : prefopt::PairInputs(policy);
        // TRL leaves the gold branch out when tpo_alpha = 0, and so do the forward pass, the
        // loss (which would warn that nothing reads it) and the metrics; with it, TRL's TPO
        // entropy is over all three branches.
        const bool with_gold = gold != nullptr && tpo.tpo_alpha() != 0;
        const auto r = with_gold ? F::tpo_loss(in, *gold, tpo)
                                 : F::tpo_loss(in, prefopt::TPOLossOptions(tpo).tpo_alpha(0.0));
        token_metrics ? metrics.add(r, in, policy, with_gold ? *gold : prefopt::SequenceLogprobs{})
                      : metrics.add(r, in);
        return r.loss;
      }
      case Family::kKTO: {  // evaluation on pairs: one desirable and one undesirable example each
        auto in = prefopt::KTOInputs()
                      .policy_chosen_logps(policy.chosen.sum)
                      .policy_rejected_logps(policy.rejected.sum)
                      .reference_chosen_logps(ref_chosen)
                      .reference_rejected_logps(ref_rejected);
        if (policy_kl.defined()) in.policy_KL_logps(policy_kl).reference_KL_logps(reference_kl);
        const auto r = F::kto_loss(in, kto);
        metrics.add(r, in);  // rewards/accuracies: evaluate_pairs adds it, the pairs being known
        return r.loss;
      }
    }
    throw std::logic_error("prefopt-train: unknown loss family");
  }
};

// ---------------------------------------------------------------------------------------------
// Evaluation

// KTO's evaluation batches: `per_batch` examples each, in order, as TRL's eval dataloader takes
// them, one micro-step of `metrics` each (the KL estimate too is the batch's). `logps`, `ref`
// (and the KL log-probs, when defined): [M] per example; `label`: desirable or not. Returns
// Σ_b |b| · loss_b, HF's eval_loss times M.
double kto_eval_batches(const Loss& loss, prefopt::MetricAccumulator& metrics,
                        const at::Tensor& logps, const at::Tensor& ref,
                        const std::vector<bool>& label, const at::Tensor& policy_kl,
                        const at::Tensor& reference_kl, int64_t per_batch) {
  const auto m = logps.size(0);
  double total = 0;
  for (int64_t s = 0; s < m; s += per_batch) {
    const auto b = std::min(per_batch, m - s);
    std::vector<int64_t> d, u;
    for (int64_t i = s; i < s + b; ++i) (label[static_cast<size_t>(i)] ? d : u).push_back(i);
    const auto di = at::tensor(d, at::kLong).to(logps.device());
    const auto ui = at::tensor(u, at::kLong).to(logps.device());
    auto in = prefopt::KTOInputs()
                  .policy_chosen_logps(logps.index_select(0, di))
                  .policy_rejected_logps(logps.index_select(0, ui))
                  .reference_chosen_logps(ref.index_select(0, di))
                  .reference_rejected_logps(ref.index_select(0, ui));
    if (policy_kl.defined())
      in.policy_KL_logps(policy_kl.narrow(0, s, b))
          .reference_KL_logps(reference_kl.narrow(0, s, b));
    const auto r = F::kto_loss(in, loss.kto);
    metrics.add(r, in);
    total += r.loss.item<double>() * static_cast<double>(b);
  }
  return total;
}

// Metrics of `data`'s pairs under the current policy, with `prefix` ("eval_", "train_"): the
// loss's own rewards (rewards/accuracies, rewards/margins, ...) and preference_accuracy, the
// share of pairs whose chosen completion is more likely than the rejected one.
// As TRL 1.16 + transformers 5.25 log an evaluation: the loss's metrics are the mean over the
// evaluation batches (`per_batch` pairs; KTO: examples) of each batch's value (TRL stores one
// per batch, its log() averages them), and `loss` is HF's evaluation_loop's, each batch's loss
// weighted by its size (Σ_b |b| · loss_b / N). The two differ from the whole set pooled when
// the last batch is smaller, and for token-mean terms (NLL) where batches differ in tokens.
// preference_accuracy (not TRL's) and KTO's rewards/accuracies (on the pairs, which TRL's KTO
// does not know) are over all pairs.
// `at_reference`: the policy is still the reference, whose scores are reused (bit-identical to
// scoring it again, since the batches are the same).
prefopt::Metrics evaluate_pairs(train::LlamaForCausalLM& model, const Loss& loss,
                                const PairData& data, int64_t limit, const std::string& prefix,
                                int64_t pad_id, const at::Device& device, int64_t per_batch,
                                bool at_reference = false, const UnpairedData* kl = nullptr) {
  model->eval();
  const auto n = limit > 0 ? std::min(limit, data.size()) : data.size();
  auto chosen = data.side(0), rejected = data.side(1);
  chosen.resize(static_cast<size_t>(n)), rejected.resize(static_cast<size_t>(n));
  const bool reuse = at_reference && n == data.size() && data.reference.chosen.sum.defined();
  prefopt::PairLogprobs policy{
      reuse ? data.reference.chosen : score(model, chosen, pad_id, device, per_batch),
      reuse ? data.reference.rejected : score(model, rejected, pad_id, device, per_batch)};
  // TPO's gold responses, where its loss reads them: TRL's evaluation loss has the NLL term.
  const bool with_gold = loss.family == Family::kTPO && loss.tpo.tpo_alpha() != 0;
  prefopt::SequenceLogprobs gold;
  if (with_gold) {
    auto rows = data.side(2);
    rows.resize(static_cast<size_t>(n));
    gold = score(model, rows, pad_id, device, per_batch);
  }
  at::Tensor rc, rr;
  if (data.ref_chosen.defined())
    rc = data.ref_chosen.narrow(0, 0, n), rr = data.ref_rejected.narrow(0, 0, n);
  // KTO's KL estimate, on the mismatched completions of the pairs unpaired (see make_kl):
  // [c0, r0, c1, r1, ...], so the first n pairs' are the first 2n. Without it the loss would
  // take KL = 0, not the loss that trains.
  const bool with_kl = loss.family == Family::kKTO && kl && kl->ref_kl.defined();
  at::Tensor policy_kl, reference_kl;
  if (with_kl) {
    auto rows = kl->rows(kl->kl);
    rows.resize(static_cast<size_t>(2 * n));
    policy_kl = score(model, rows, pad_id, device, per_batch).sum;
    reference_kl = kl->ref_kl.narrow(0, 0, 2 * n);
  }
  prefopt::MetricAccumulator metrics(prefopt::MetricsOptions().prefix(prefix));
  double loss_sum = 0;  // Σ_b |b| · loss_b
  int64_t examples = n;
  {
    at::NoGradGuard no_grad;
    if (loss.family == Family::kKTO) {
      // The pairs unpaired in make_kl's order, [c0, r0, c1, r1, ...], `per_batch` examples a batch.
      examples = 2 * n;
      std::vector<bool> label;
      for (int64_t i = 0; i < n; ++i) label.push_back(true), label.push_back(false);
      loss_sum = kto_eval_batches(
          loss, metrics, at::stack({policy.chosen.sum, policy.rejected.sum}, 1).flatten(),
          at::stack({rc, rr}, 1).flatten(), label, policy_kl, reference_kl, per_batch);
    } else {
      for (int64_t s = 0; s < n; s += per_batch) {
        const auto b = std::min(per_batch, n - s);
        const prefopt::PairLogprobs part{narrow_rows(policy.chosen, s, b),
                                         narrow_rows(policy.rejected, s, b)};
        const auto g = with_gold ? narrow_rows(gold, s, b) : prefopt::SequenceLogprobs{};
        const auto l = loss.pairs(part, rc.defined() ? rc.narrow(0, s, b) : rc,
                                  rr.defined() ? rr.narrow(0, s, b) : rr, with_gold ? &g : nullptr,
                                  metrics, false);
        loss_sum += l.item<double>() * static_cast<double>(b);
      }
    }
  }
  model->train();
  auto m = metrics.compute();
  // The evaluation's own token count is not a training metric, and a KL estimate without KL
  // completions would be a 0 that was never measured.
  prefopt::Metrics out;
  for (const auto& [k, v] : m)
    if (k != prefix + "num_tokens" && (with_kl || k != prefix + "kl")) out.set(k, v);
  out.set(prefix + "loss", loss_sum / static_cast<double>(examples));
  if (loss.family == Family::kKTO) {  // KTO has no pairs, but these examples come in pairs
    const auto acc = (policy.chosen.sum - rc > policy.rejected.sum - rr).to(at::kDouble).mean();
    out.set(prefix + "rewards/accuracies", acc.item<double>());
  }
  out.set(prefix + "preference_accuracy",
          (policy.chosen.sum > policy.rejected.sum).to(at::kDouble).mean().item<double>());
  return out;
}

// KTO data without pairs (an unpaired file): the KTO metrics of the held-out examples, over
// batches of `per_batch` examples as evaluate_pairs says.
prefopt::Metrics evaluate_unpaired(train::LlamaForCausalLM& model, const Loss& loss,
                                   const UnpairedData& data, const std::string& prefix,
                                   int64_t pad_id, const at::Device& device, int64_t per_batch) {
  model->eval();
  const auto lp = score(model, data.rows(data.examples), pad_id, device, per_batch);
  const bool with_kl = data.ref_kl.defined();
  at::Tensor policy_kl;
  if (with_kl) policy_kl = score(model, data.rows(data.kl), pad_id, device, per_batch).sum;
  prefopt::MetricAccumulator metrics(prefopt::MetricsOptions().prefix(prefix));
  double loss_sum = 0;
  {
    at::NoGradGuard no_grad;
    loss_sum = kto_eval_batches(loss, metrics, lp.sum, data.ref, data.label, policy_kl, data.ref_kl,
                                per_batch);
  }
  model->train();
  prefopt::Metrics out;
  for (const auto& [k, v] : metrics.compute())
    if (with_kl || k != prefix + "kl") out.set(k, v);
  out.set(prefix + "loss", loss_sum / static_cast<double>(data.size()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Training

// HF Trainer's get_decay_parameter_names: weight decay spares biases and norm weights, by name
// (lower-cased): "bias", "layernorm", "rmsnorm", "norm" as a component, or "_norm" at its end.
bool hf_decays(const std::string& name) {
  static const std::regex spared(R"(bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.))");
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return !std::regex_search(lower, spared);
}

// AdamW with HF's two parameter groups: --weight_decay on the others, none on the spared ones.
torch::optim::AdamW make_optimizer(train::LlamaForCausalLM& model, double lr, double weight_decay) {
  std::vector<at::Tensor> decay, spared;
  for (const auto& p : model->named_parameters())
    (hf_decays(p.key()) ? decay : spared).push_back(p.value());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (auto* g : {&decay, &spared})
    if (!g->empty())
      groups.emplace_back(
          *g, std::make_unique<torch::optim::AdamWOptions>(
                  torch::optim::AdamWOptions(lr).weight_decay(g == &decay ? weight_decay : 0.0)));
  return torch::optim::AdamW(std::move(groups),
                             torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
}

void set_lr(torch::optim::AdamW& opt, double lr) {
  for (auto& group : opt.param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

// transformers' schedulers, evaluated as the Trainer does: optimizer step s (1-based) uses
// the factor at s − 1, so the first step of a warmup runs at learning rate 0.
double lr_factor(const std::string& scheduler, int64_t step, int64_t total, int64_t warmup) {
  const auto s = static_cast<double>(step - 1);
  if (s < warmup) return s / std::max<double>(1.0, warmup);
  const double progress = (s - warmup) / std::max<double>(1.0, total - warmup);
  if (scheduler == "constant_with_warmup") return 1.0;
  if (scheduler == "linear") return std::max(0.0, 1.0 - progress);
  return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));  // cosine
}

struct Run {
  const Options& o;
  Loss loss;
  train::LlamaForCausalLM& model;
  at::Device device;
  int64_t pad_id;
  PairData train_pairs, eval_pairs;
  UnpairedData train_u, eval_u;
  UnpairedData eval_kl;  // KTO on pairs: the held-out pairs unpaired, for the KL estimate
  bool paired_eval = true;

  // Held-out metrics and the training subset's, one record.
  prefopt::Metrics evaluate(int64_t train_limit, bool at_reference = false) {
    prefopt::Metrics m;
    if (paired_eval) {
      for (const auto& [k, v] : evaluate_pairs(model, loss, eval_pairs, 0, "eval_", pad_id, device,
                                               o.eval_batch, at_reference, &eval_kl))
        m.set(k, v);
    } else {
      for (const auto& [k, v] :
           evaluate_unpaired(model, loss, eval_u, "eval_", pad_id, device, o.eval_batch))
        m.set(k, v);
    }
    if (train_pairs.size() > 0 && train_limit >= 0) {
      for (const auto& [k, v] :
           evaluate_pairs(model, loss, train_pairs, train_limit, "train_", pad_id, device,
                          o.eval_batch, at_reference, &train_u))
        m.set(k, v);
    }
    return m;
  }

  // One micro-step on the examples `idx` (pairs, or unpaired examples for KTO).
  // The sequences of the pairs `idx`: all chosen ones, then (`rejected`) all rejected ones, in
  // split_pairs' order, then (`gold`) TPO's gold responses.
  std::vector<const train::Sequence*> pair_rows(const std::vector<int64_t>& idx, bool rejected,
                                                bool gold) const {
    std::vector<const train::Sequence*> rows;
    for (int side = 0; side < 3; ++side) {
      if ((side == 1 && !rejected) || (side == 2 && !gold)) continue;
      for (const auto i : idx) {
        const auto& p = train_pairs.pairs[static_cast<size_t>(i)];
        rows.push_back(side == 0 ? &p.chosen : side == 1 ? &p.rejected : &p.gold);
      }
    }
    return rows;
  }

  // The unpaired examples `idx` (or, with `kl`, their KL completions).
  std::vector<const train::Sequence*> example_rows(const std::vector<int64_t>& idx,
                                                   bool kl = false) const {
    std::vector<const train::Sequence*> rows;
    for (const auto i : idx)
      rows.push_back(&(kl ? train_u.kl : train_u.examples)[static_cast<size_t>(i)]);
    return rows;
  }

  // KTO's KL estimate of the examples `idx` into `in` (KTOInputs or FusedKTOInputs), for the
  // kto loss type: a constant, as in TRL.
  template <typename Inputs>
  void add_kl(Inputs& in, const std::vector<int64_t>& idx, const at::Tensor& index) {
    if (loss.kto.loss_type() != prefopt::KTOLossType::kKTO) return;
    at::NoGradGuard no_grad;
    in.policy_KL_logps(forward_logps(model, example_rows(idx, true), pad_id, device).sum)
        .reference_KL_logps(train_u.ref_kl.index_select(0, index));
  }

  at::Tensor micro_step(const std::vector<int64_t>& idx, prefopt::MetricAccumulator& metrics) {
    const auto opts = prefopt::FusedLogprobsOptions()
                          .with_logits_mean(true)
                          .with_token_accuracy(true)
                          .with_entropy(true);
    const auto B = static_cast<int64_t>(idx.size());
    const auto index = at::tensor(idx, at::kLong).to(device);
    if (o.one_pass) return one_pass_step(idx, index, metrics, opts);
    if (loss.family == Family::kKTO) {
      std::vector<int64_t> d, u;
      for (int64_t i = 0; i < B; ++i)
        (train_u.label[static_cast<size_t>(idx[static_cast<size_t>(i)])] ? d : u).push_back(i);
      const auto lp = forward_logps(model, example_rows(idx), pad_id, device, opts);
      const auto di = at::tensor(d, at::kLong).to(device), ui = at::tensor(u, at::kLong).to(device);
      const auto ref = train_u.ref.index_select(0, index);
      const auto desirable = select_rows(lp, di), undesirable = select_rows(lp, ui);
      auto in = prefopt::KTOInputs()
                    .policy_chosen_logps(desirable.sum)
                    .policy_rejected_logps(undesirable.sum)
                    .reference_chosen_logps(ref.index_select(0, di))
                    .reference_rejected_logps(ref.index_select(0, ui));
      add_kl(in, idx, index);
      const auto r = F::kto_loss(in, loss.kto);
      metrics.add(r, in, desirable, undesirable);
      return r.loss;
    }
    // Pairs: the batch is [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] (split_pairs'
    // order), then TPO's gold responses unless tpo_alpha = 0 (TRL's collator drops them then);
    // SFT reads the chosen rows only.
    const bool gold = loss.family == Family::kTPO && loss.tpo.tpo_alpha() != 0;
    const auto rows = pair_rows(idx, loss.family != Family::kSFT, gold);
    const auto lp = forward_logps(model, rows, pad_id, device, opts);
    at::Tensor rc, rr;
    if (train_pairs.ref_chosen.defined())
      rc = train_pairs.ref_chosen.index_select(0, index),
      rr = train_pairs.ref_rejected.index_select(0, index);
    if (loss.family == Family::kSFT) {
      const prefopt::PairLogprobs policy{lp, lp};
      return loss.pairs(policy, rc, rr, nullptr, metrics, true);
    }
    const auto policy = F::split_pairs(narrow_rows(lp, 0, 2 * B));
    if (gold) {
      const auto gold_lp = narrow_rows(lp, 2 * B, B);
      return loss.pairs(policy, rc, rr, &gold_lp, metrics, true);
    }
    return loss.pairs(policy, rc, rr, nullptr, metrics, true);
  }

  // --one_pass: the loss and the LM head's gradients in one pass over the batch (prefopt's
  // fused losses: three GEMM-equivalents where log-probs, then the loss, take four), with the
  // same metrics. The backward pass only scales the gradients the pass computed.
  at::Tensor one_pass_step(const std::vector<int64_t>& idx, const at::Tensor& index,
                           prefopt::MetricAccumulator& metrics,
                           const prefopt::FusedLogprobsOptions& opts) {
    if (loss.family == Family::kKTO) {
      std::vector<uint8_t> desirable;
      for (const auto i : idx) desirable.push_back(train_u.label[static_cast<size_t>(i)] ? 1 : 0);
      auto in = prefopt::FusedKTOInputs()
                    .desirable(at::tensor(desirable, at::kByte).to(at::kBool).to(device))
                    .reference_logps(train_u.ref.index_select(0, index));
      add_kl(in, idx, index);
      const auto out = F::fused_kto_loss(head_batch(model, example_rows(idx), pad_id, device), in,
                                         loss.kto, opts);
      metrics.add(out.result, out.inputs, out.policy.chosen, out.policy.rejected);
      return out.result.loss;
    }
    const auto batch =
        head_batch(model, pair_rows(idx, /*rejected=*/true, /*gold=*/false), pad_id, device);
    const auto done = [&](const auto& out) {
      metrics.add(out.result, out.inputs, out.policy);
      return out.result.loss;
    };
    switch (loss.family) {
      case Family::kDPO:
        return done(F::fused_dpo_loss(
            batch,
            prefopt::PairInputs()
                .reference_chosen_logps(train_pairs.ref_chosen.index_select(0, index))
                .reference_rejected_logps(train_pairs.ref_rejected.index_select(0, index))
                .logps_form(prefopt::LogpsForm::kSum),
            loss.dpo, opts));
      case Family::kORPO:
        return done(F::fused_orpo_loss(batch, loss.orpo, opts));
      case Family::kSimPO:
        return done(F::fused_simpo_loss(batch, loss.simpo, opts));
      case Family::kCPO:
        return done(F::fused_cpo_loss(batch, loss.cpo, opts));
      default:  // refused by the command line's checks
        throw std::logic_error("prefopt-train: --one_pass with --loss " + loss.name);
    }
  }
};

std::string fmt_metric(const prefopt::Metrics& m, const std::string& name) {
  const double* v = m.find(name);
  return v ? fmt::format("{:.3f}", *v) : std::string("n/a");
}

void print_summary(const prefopt::Metrics& before, const prefopt::Metrics& after,
                   const std::string& loss) {
  const auto row = [&](const char* label, const std::string& name) {
    const double *b = before.find(name), *a = after.find(name);
    if (!b && !a) return;
    const auto change = a && b ? fmt::format("{:+.3f}", *a - *b) : std::string();
    fmt::print("  {:<52} {:>8} {:>8} {:>8}\n", label, fmt_metric(before, name),
               fmt_metric(after, name), change);
  };
  fmt::print("\nbefore -> after {}:\n", loss);
  fmt::print("  {:<52} {:>8} {:>8} {:>8}\n", "", "before", "after", "change");
  row("held-out reward accuracy (rewards/accuracies)", "eval_rewards/accuracies");
  row("held-out reward margin (rewards/margins)", "eval_rewards/margins");
  row("held-out preference accuracy: log p(c) > log p(r)", "eval_preference_accuracy");
  row("held-out loss", "eval_loss");
  row("training reward accuracy", "train_rewards/accuracies");
  row("training reward margin", "train_rewards/margins");
  row("training preference accuracy: log p(c) > log p(r)", "train_preference_accuracy");
  row("training loss (all training pairs)", "train_loss");
}

nlohmann::ordered_json to_json(const prefopt::Metrics& m) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [k, v] : m)
    j[k] = std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json();
  return j;
}

void check_bitwise(train::LlamaForCausalLM& saved, const fs::path& dir) {
  auto reloaded = train::load_pretrained(dir);
  auto a = saved->named_parameters(), b = reloaded->named_parameters();
  if (a.size() != b.size())
    throw std::runtime_error("checkpoint: reloaded parameter count differs");
  for (const auto& item : a) {
    const auto& other = b[item.key()];
    const auto x = item.value().detach().to(at::kCPU).contiguous();
    const auto y = other.detach().to(at::kCPU).contiguous();
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type() ||
        std::memcmp(x.data_ptr(), y.data_ptr(),
                    static_cast<size_t>(x.numel()) * x.element_size()) != 0)
      throw std::runtime_error("checkpoint: " + item.key() + " did not reload bit for bit");
  }
}

// Where the checkpoint keeps a chat template (tokenizer_config.json's "chat_template", or
// transformers 5's chat_template.jinja / chat_template.json); empty when it has none.
std::string chat_template_of(const fs::path& dir) {
  for (const char* f : {"chat_template.jinja", "chat_template.json"})
    if (fs::exists(dir / f)) return (dir / f).string();
  const auto config = dir / "tokenizer_config.json";
  if (fs::exists(config)) {
    std::ifstream in(config);
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("chat_template") && !j["chat_template"].is_null())
      return config.string() + " (\"chat_template\")";
  }
  return {};
}

// The tokenizer's files as transformers saves them, the chat template included (transformers 5
// keeps it in chat_template.jinja, beside tokenizer_config.json): copied beside the checkpoint.
const std::vector<std::string>& checkpoint_extras() {
  static const std::vector<std::string> names = {
      "tokenizer.json",      "tokenizer_config.json", "special_tokens_map.json",
      "chat_template.jinja", "chat_template.json",    "generation_config.json"};
  return names;
}

// Removes the files of `names` that an earlier run left in `out` and this run will not write
// (`why`), so that the folder never shows another run's model or plot as this run's. Only
// where `ours`: a folder in which no run of this trainer finished (no summary.json, written
// last) may be another model's, given as --output_dir by mistake; its files stay, with a note.
void remove_stale(const fs::path& out, const std::vector<std::string>& names,
                  const std::string& why, bool ours) {
  std::vector<std::string> found;
  for (const auto& n : names)
    if (ours ? fs::remove(out / n) : fs::exists(out / n)) found.push_back(n);
  if (found.empty()) return;
  if (ours)
    fmt::print("output: removed {} of an earlier run from {} ({})\n", fmt::join(found, ", "),
               out.string(), why);
  else
    fmt::print(
        "output: kept {} in {}, which has no summary.json of an earlier run (they may be "
        "another model's); this run does not write them ({})\n",
        fmt::join(found, ", "), out.string(), why);
}

int run(const Options& o) {
  at::set_num_threads(o.threads);
  at::manual_seed(static_cast<int64_t>(o.seed));
  const demo::Progress clock("", 1);
  const at::Device device(o.device);
  if (device.is_cuda() && !torch::cuda::is_available())
    throw std::runtime_error("--device " + o.device +
                             ": this libtorch has no CUDA, or no GPU is present");
  const fs::path out(o.output_dir);
  fs::create_directories(out);
  const fs::path model_dir(o.model);

  // Model and tokenizer.
  auto model = train::load_pretrained(model_dir);
  model->to(device);
  const auto tok = train::Tokenizer::load(model_dir / "tokenizer.json");
  for (const auto& note : tok.notes()) fmt::print("tokenizer: {}\n", note);
  const auto pad_id = tok.pad_id();
  Loss loss(o);
  const auto family = loss.family;
  fmt::print(
      "prefopt {} train: {} ({} parameters: {} layers, hidden {}, {} heads / {} kv, vocab {}{}) on "
      "{}, {} thread{}\n",
      PREFOPT_VERSION_STRING, model_dir.filename().string(), model->num_parameters(),
      model->config.num_hidden_layers, model->config.hidden_size, model->config.num_attention_heads,
      model->config.num_key_value_heads, model->config.vocab_size,
      model->config.tie_word_embeddings ? ", tied head" : "", o.device, o.threads,
      o.threads == 1 ? "" : "s");

  // Every id the tokenizer can produce must index the embedding (else a bare "index out of
  // range" deep in the forward).
  if (tok.vocab_size() > model->config.vocab_size)
    throw std::runtime_error(fmt::format(
        "the tokenizer has {} tokens but the model's vocab_size is {} ({})", tok.vocab_size(),
        model->config.vocab_size, (model_dir / "config.json").string()));

  // Data: the training rows and the held-out rows, tokenized and truncated.
  const auto implicit = o.implicit_prompt == "common_prefix"
                            ? train::ImplicitPrompt::kCommonPrefix
                            : train::ImplicitPrompt::kAssistantTurn;
  const auto data = train::load_dataset(o.data, implicit);
  std::optional<train::Dataset> eval_file;
  if (!o.eval_data.empty()) eval_file = train::load_dataset(o.eval_data, implicit);
  if (eval_file && eval_file->paired() != data.paired())
    throw std::runtime_error(fmt::format(
        "--eval_data {} is {} but --data {} is {}: both must be pairs, or both unpaired",
        o.eval_data, eval_file->paired() ? "paired" : "unpaired (prompt/completion/label)", o.data,
        data.paired() ? "paired" : "unpaired (prompt/completion/label)"));
  const train::Dataset* eval_ptr = eval_file ? &*eval_file : nullptr;
  if (o.implicit_prompt_given && data.format != "implicit-prompt" &&
      (!eval_file || eval_file->format != "implicit-prompt"))
    throw std::runtime_error(fmt::format(
        "--implicit_prompt {} splits the prompt off implicit-prompt rows ({{chosen, rejected}} "
        "without a \"prompt\" field, format implicit-prompt, as HH-RLHF's), but --data {} is "
        "format {}{}: it would change nothing",
        o.implicit_prompt, o.data, data.format,
        eval_file ? fmt::format(" and --eval_data {} is format {}", o.eval_data, eval_file->format)
                  : std::string()));
  for (const train::Dataset* d : {&data, eval_ptr}) {
    if (!d) continue;
    // TRL renders message lists with the checkpoint's chat template; this trainer has only its
    // plain template, so a chat model would train on a format it never sees at inference.
    if (d->conversational && !o.plain_chat_template) {
      if (const auto where = chat_template_of(model_dir); !where.empty())
        throw std::runtime_error(fmt::format(
            "{} holds message lists and the checkpoint has a chat template ({}), which TRL "
            "would apply; prefopt-train renders messages with its plain \"\\n\\nHuman: ... "
            "\\n\\nAssistant:\" template only. Give --plain_chat_template to train with "
            "that anyway, or give the data as text rendered with the model's template",
            d->path, where));
    }
    if (!d->ignored_columns.empty())
      fmt::print("data: {}: columns not read (this trainer has no use for them): {}\n", d->path,
                 fmt::join(d->ignored_columns, ", "));
    if (d->common_prefix_rows > 0)
      fmt::print(
          "data: {}: {} implicit-prompt rows split at the common prefix of chosen and "
          "rejected (TRL's extract_prompt){}\n",
          d->path, d->common_prefix_rows,
          implicit == train::ImplicitPrompt::kAssistantTurn
              ? " as they have no \"\\n\\nAssistant:\""
              : "");
  }
  int64_t prompt_merges = 0;
  const bool ascii = o.ascii_on || (!o.ascii_off && !tok.byte_fallback());
  fmt::print("data: typographic punctuation {}\n",
             ascii ? "mapped to ASCII (--no-ascii keeps it)" : "kept as it is");
  const train::TokenizeOptions topts{
      o.max_length, o.max_prompt_length, ascii,
      o.truncation == "classic" ? train::Truncation::kClassic : train::Truncation::kKeepStart,
      &prompt_merges};
  // keep_start: examples whose prompt alone fills max_length, training and held out.
  int64_t dropped[2] = {0, 0};
  Run r{o, loss, model, device, pad_id, {}, {}, {}, {}, {}, true};
  int64_t train_rows = 0, eval_rows = 0;
  const auto take = [&](int64_t row, bool eval_side) {
    // With --eval_data, every row of --data trains and every row of the other file is held out.
    return eval_file ? true : (eval_side ? row >= o.eval_start : row < o.eval_start);
  };
  const auto tokenize_pairs = [&](const train::Dataset& d, bool eval_side, PairData& into,
                                  int64_t limit) {
    for (const auto& e : d.pairs) {
      if (!take(e.row, eval_side)) continue;
      if (limit > 0 && into.size() >= limit) break;
      // The gold response joins the prompt boundary only where it is trained on (TPO), as in
      // TRL, whose DPO ignores that column.
      auto t = family == Family::kTPO
                   ? train::tokenize_pair(tok, e, topts)
                   : train::tokenize_pair(
                         tok, train::PreferenceExample{e.prompt, e.chosen, e.rejected, {}, e.row},
                         topts);
      if (t)
        into.pairs.push_back(std::move(*t));
      else
        ++dropped[eval_side];
    }
  };
  const auto tokenize_unpaired = [&](const train::Dataset& d, bool eval_side, UnpairedData& into,
                                     int64_t limit) {
    for (const auto& e : d.unpaired) {
      if (!take(e.row, eval_side)) continue;
      if (limit > 0 && into.size() >= limit) break;
      auto t = train::tokenize_unpaired(tok, e.prompt, e.completion, topts);
      if (!t) {
        ++dropped[eval_side];
        continue;
      }
      into.examples.push_back(std::move(*t));
      into.label.push_back(e.label);
    }
  };
  if (data.paired()) {
    tokenize_pairs(data, false, r.train_pairs, o.train_limit);
    tokenize_pairs(eval_file ? *eval_file : data, true, r.eval_pairs, o.eval_limit);
    train_rows = r.train_pairs.size(), eval_rows = r.eval_pairs.size();
    if (family == Family::kKTO) {  // TRL's unpair_preference_dataset
      r.train_u = unpair(r.train_pairs.pairs);
      make_kl(r.train_u, 2, o.max_length);
      r.eval_kl = unpair(r.eval_pairs.pairs);
      make_kl(r.eval_kl, 2, o.max_length);
    }
  } else {
    if (family != Family::kKTO)
      throw std::runtime_error("--data " + o.data +
                               " is unpaired (prompt/completion/label): it "
                               "trains --loss kto or apo_zero_unpaired only");
    tokenize_unpaired(data, false, r.train_u, o.train_limit);
    tokenize_unpaired(eval_file ? *eval_file : data, true, r.eval_u, o.eval_limit);
    make_kl(r.train_u, 1, o.max_length);
    make_kl(r.eval_u, 1, o.max_length);
    r.paired_eval = false;
    train_rows = r.train_u.size(), eval_rows = r.eval_u.size();
  }
  for (const bool eval_side : {false, true})
    if ((eval_side ? eval_rows : train_rows) == 0 && dropped[eval_side] > 0)
      throw std::runtime_error(fmt::format(
          "no {} rows left: all {} were dropped because their prompt alone fills --max_length {} "
          "(raise it, or give --truncation classic)",
          eval_side ? "held-out" : "training", dropped[eval_side], o.max_length));
  if (train_rows == 0)
    throw std::runtime_error(
        fmt::format("no training rows: --eval_start {} leaves none of the {} rows of {}",
                    o.eval_start, data.rows, o.data));
  if (eval_rows == 0)
    throw std::runtime_error(
        fmt::format("no held-out rows: --eval_start {} is past the {} rows of {} "
                    "(lower it, or give --eval_data)",
                    o.eval_start, data.rows, o.data));
  if (family == Family::kTPO)  // TRL's TPO tokenizes "reference" in every split
    for (const bool eval_side : {false, true})
      for (const auto& p : (eval_side ? r.eval_pairs : r.train_pairs).pairs)
        if (p.gold.ids.empty())
          throw std::runtime_error(
              fmt::format("--loss tpo needs a gold response: {} row {} has no \"reference\" field",
                          eval_side && eval_file ? o.eval_data : o.data, p.row + 1));
  int64_t cut_completions = 0;  // training completions that max_length cut (summary.json)
  {
    const bool classic = topts.truncation == train::Truncation::kClassic;
    // A completion ends with EOS (tokenize_answer) unless max_length cut it: a sequence that
    // fills max_length exactly may be whole, and classic truncation cuts a completion to
    // max_length - max_prompt_length, below max_length when the prompt is short.
    int64_t cut_prompts = 0, tokens = 0, seqs = 0;
    const auto count = [&](const train::Sequence& s) {
      tokens += static_cast<int64_t>(s.ids.size()), ++seqs;
      cut_completions += !s.ids.empty() && s.ids.back() != tok.eos_id();
    };
    for (const auto& p : r.train_pairs.pairs) {
      count(p.chosen), count(p.rejected);
      cut_prompts += classic && p.chosen.prompt_len == o.max_prompt_length;
    }
    if (!data.paired())
      for (const auto& s : r.train_u.examples) count(s);
    fmt::print(
        "data: {} ({}), {} training {}, {} held out{}; {:.0f} tokens per sequence on "
        "average ({}; {} of {} training completions cut at max_length{})\n",
        o.data, data.format, train_rows, data.paired() ? "pairs" : "examples", eval_rows,
        data.skipped.empty()
            ? std::string()
            : fmt::format(" ({} pairs skipped: their prompts differ)", data.skipped.size()),
        seqs ? static_cast<double>(tokens) / seqs : 0.0,
        classic ? fmt::format("classic truncation: max_length {}, max_prompt_length {}",
                              o.max_length, o.max_prompt_length)
                : fmt::format("keep_start truncation: max_length {}", o.max_length),
        cut_completions, seqs,
        classic ? (data.paired() ? fmt::format("; {} prompts cut from the left", cut_prompts)
                                 : std::string())
                : fmt::format("; dropped, as the prompt alone fills max_length: {} training "
                              "and {} held-out examples",
                              dropped[0], dropped[1]));
    if (prompt_merges > 0)
      fmt::print(
          "data: {} sequences have a token across the prompt/completion boundary (the prompt's "
          "tokens are not a prefix of prompt + completion's); it is scored with the completion, "
          "as in TRL, which warns about it\n",
          prompt_merges);
    if (family == Family::kKTO && data.paired())
      fmt::print(
          "kto: {} unpaired examples from the pairs (chosen desirable, rejected undesirable)\n",
          r.train_u.size());
  }

  // The reference: the same checkpoint, frozen, its log-probs computed once.
  if (needs_reference(family)) {
    auto reference = train::load_pretrained(model_dir);
    reference->to(device);
    reference->eval();
    const demo::Progress t("", 1);
    const auto eb = o.eval_batch;
    if (data.paired()) {
      for (auto* d : {&r.train_pairs, &r.eval_pairs}) {
        d->reference = {score(reference, d->side(0), pad_id, device, eb),
                        score(reference, d->side(1), pad_id, device, eb)};
        d->ref_chosen = d->reference.chosen.sum, d->ref_rejected = d->reference.rejected.sum;
      }
    } else {
      r.eval_u.ref = score(reference, r.eval_u.rows(r.eval_u.examples), pad_id, device, eb).sum;
    }
    if (family == Family::kKTO) {
      // Unpaired from pairs: the examples are [c0, r0, c1, r1, ...], scored above already.
      r.train_u.ref =
          data.paired()
              ? at::stack({r.train_pairs.ref_chosen, r.train_pairs.ref_rejected}, 1).flatten()
              : score(reference, r.train_u.rows(r.train_u.examples), pad_id, device, eb).sum;
      if (loss.kto.loss_type() == prefopt::KTOLossType::kKTO) {
        r.train_u.ref_kl = score(reference, r.train_u.rows(r.train_u.kl), pad_id, device, eb).sum;
        // The held-out KL completions, scored in the batches evaluation uses (so the estimate
        // is exactly 0 before training).
        auto& held_out = data.paired() ? r.eval_kl : r.eval_u;
        held_out.ref_kl = score(reference, held_out.rows(held_out.kl), pad_id, device, eb).sum;
      }
    }
    fmt::print("reference log-probs precomputed ({:.1f} s)\n", t.seconds());
  }

  // Steps: epochs over the training examples, or --max_steps, counted as HF's Trainer counts
  // them with its default dataloader_drop_last=False: an epoch is ceil(N / batch) batches, the
  // last one smaller, and ceil(batches / accum) optimizer steps, the last one taking the
  // batches that are left (set_initial_training_values, transformers 5.25).
  const int64_t n_train = family == Family::kKTO ? r.train_u.size() : r.train_pairs.size();
  const int64_t batches_per_epoch = (n_train + o.batch - 1) / o.batch;
  const int64_t steps_per_epoch = std::max<int64_t>(1, (batches_per_epoch + o.accum - 1) / o.accum);
  const int64_t last_window = batches_per_epoch - (steps_per_epoch - 1) * o.accum;
  const int64_t total =
      o.max_steps >= 0 ? o.max_steps : static_cast<int64_t>(std::ceil(o.epochs * steps_per_epoch));
  const auto warmup = static_cast<int64_t>(std::ceil(o.warmup_ratio * static_cast<double>(total)));
  // The earlier run's files go only now, when the data, model and reference are in: a run
  // refused on its inputs leaves the folder as it was.
  fs::remove(out / "metrics.jsonl");
  const bool earlier_run = fs::exists(out / "summary.json");
  // summary.json, written last, marks a folder whose run finished: a run that fails from here
  // on must not leave the earlier run's beside its own metrics.
  fs::remove(out / "summary.json");
  if (!o.save) {
    std::vector<std::string> checkpoint = {"model.safetensors", "config.json"};
    checkpoint.insert(checkpoint.end(), checkpoint_extras().begin(), checkpoint_extras().end());
    remove_stale(out, checkpoint, "--no-save", earlier_run);
  } else {
    // Not in --model, so not copied: an older one would stay beside the checkpoint this run
    // writes over the folder's (the folder's own, whatever wrote it).
    std::vector<std::string> absent;
    for (const auto& f : checkpoint_extras())
      if (!fs::exists(model_dir / f)) absent.push_back(f);
    remove_stale(out, absent, "--model " + o.model + " has none", /*ours=*/true);
  }
  if (!o.plot || total == 0)
    remove_stale(out, {"curves.png"}, !o.plot ? "--no-plot" : "no training steps to plot",
                 earlier_run);
  else
    fs::remove(out / "curves.png");  // a failed plot must not leave an earlier one behind
  // HF's epoch: batches done over batches per epoch (state.epoch).
  const auto epochs_at = [&](int64_t steps) {
    const int64_t rest = steps % steps_per_epoch;
    const int64_t batches = steps / steps_per_epoch * batches_per_epoch + rest * o.accum;
    return static_cast<double>(batches) / static_cast<double>(batches_per_epoch);
  };

  fmt::print("evaluating before training ...\n");
  const auto before = r.evaluate(0, /*at_reference=*/needs_reference(family));
  fmt::print("before: {:.4}\n", before);
  demo::History history, eval_history;
  eval_history.emplace_back(0, before);
  prefopt::JsonlWriter log((out / "metrics.jsonl").string());
  log.write(0, before);

  fmt::print(
      "training: {}, {} steps of {} x {} {} ({:.2f} epochs), lr {:g} ({} warmup steps, {}), beta "
      "{:g}{}\n",
      o.loss, total, o.batch, o.accum, family == Family::kKTO ? "examples" : "pairs",
      epochs_at(total), o.lr, warmup, o.scheduler, o.beta.value_or(default_beta(family)),
      o.one_pass ? ", one-pass fused loss" : "");
  auto opt = make_optimizer(model, o.lr, o.weight_decay);
  prefopt::MetricAccumulator metrics;
  std::mt19937_64 rng(o.seed);
  std::vector<int64_t> order(static_cast<size_t>(n_train));
  std::iota(order.begin(), order.end(), 0);
  size_t cursor = order.size();
  int64_t epoch_count = 0;
  at::Tensor window_loss;  // Σ of the steps' losses since the last record
  int64_t window_steps = 0;
  demo::Progress bar(o.loss, std::max<int64_t>(total, 1));
  const demo::Progress train_clock("", 1);
  model->train();
  for (int64_t step = 1; step <= total; ++step) {
    set_lr(opt, o.lr * lr_factor(o.scheduler, step, total, warmup));
    opt.zero_grad();
    const int64_t in_epoch = (step - 1) % steps_per_epoch;
    if (in_epoch == 0) {  // a new epoch
      std::shuffle(order.begin(), order.end(), rng);
      cursor = 0;
      ++epoch_count;
    }
    // The epoch's last step takes the batches left. The step's loss is Σ_b w_b · loss_b over
    // its batches: as HF's Trainer (current_gradient_accumulation_steps), w_b = 1 / the batches
    // this step takes, not 1 / --gradient_accumulation_steps; TRL's SFT divides each batch's
    // NLL sum by the step's scored tokens (num_items_in_batch), so there w_b = its tokens / the
    // step's.
    const int64_t window = in_epoch == steps_per_epoch - 1 ? last_window : o.accum;
    std::vector<std::vector<int64_t>> batches;
    std::vector<double> tokens;  // SFT: the scored tokens of each batch's chosen completions
    for (int64_t micro = 0; micro < window; ++micro) {
      const auto end = std::min(order.size(), cursor + static_cast<size_t>(o.batch));
      batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(cursor),
                           order.begin() + static_cast<std::ptrdiff_t>(end));
      cursor = end;
      double n = 0;
      if (family == Family::kSFT)
        for (const auto i : batches.back()) {
          const auto& c = r.train_pairs.pairs[static_cast<size_t>(i)].chosen;
          n += static_cast<double>(c.completion_len() - (c.prompt_len == 0));  // no target at 0
        }
      tokens.push_back(n);
    }
    const double step_tokens = std::accumulate(tokens.begin(), tokens.end(), 0.0);
    for (size_t b = 0; b < batches.size(); ++b) {
      const double w = family == Family::kSFT ? tokens[b] / std::max(step_tokens, 1.0)
                                              : 1.0 / static_cast<double>(window);
      const auto l = r.micro_step(batches[b], metrics) * w;
      l.backward();
      window_loss = window_loss.defined() ? window_loss + l.detach() : l.detach();
    }
    ++window_steps;
    const auto grad_norm = torch::nn::utils::clip_grad_norm_(model->parameters(), o.max_grad_norm);
    opt.step();
    if (step % o.logging_steps == 0 || step == total) {
      // As HF's Trainer: the last optimizer step's gradient norm (before clipping) and learning
      // rate, not their means over the logging window.
      metrics.add_scalar("grad_norm", grad_norm);
      metrics.add_scalar("learning_rate", o.lr * lr_factor(o.scheduler, step, total, warmup));
      auto m = metrics.compute();
      // HF's logged loss: the mean over the window's optimizer steps of each step's loss, which
      // differs from the metrics' mean over batches where steps take different batches or
      // (SFT) tokens.
      m.set("loss", window_loss.item<double>() / static_cast<double>(window_steps));
      window_loss = at::Tensor(), window_steps = 0;
      m.set("epoch", epochs_at(step));
      log.write(step, m);
      history.emplace_back(step, m);
      const double* margins = m.find("rewards/margins");
      bar.status(margins ? fmt::format("loss {:.4f} margins {:.3f}", m.at("loss"), *margins)
                         : fmt::format("loss {:.4f}", m.at("loss")));
      if (step % o.print_every == 0 || step == total)
        bar.print_line(fmt::format("step {:>4} {:.4}", step, m));
    }
    if (step % o.eval_steps == 0 && step != total) {
      const auto m = r.evaluate(o.eval_train_pairs);
      log.write(step, m);
      eval_history.emplace_back(step, m);
      bar.print_line(fmt::format("eval {:>4} {:.4}", step, m));
    }
    bar.update(step);
  }
  const double train_seconds = train_clock.seconds();
  // The final evaluation covers every training pair.
  prefopt::Metrics after = before;
  if (total > 0) {
    after = r.evaluate(0);
    log.write(total, after);
    eval_history.emplace_back(total, after);
    fmt::print("eval {:>4} {:.4}\n", total, after);
  }
  print_summary(before, after, o.loss);

  nlohmann::ordered_json summary = {{"loss", o.loss},
                                    {"model", o.model},
                                    {"data", o.data},
                                    {"train_examples", n_train},
                                    {"eval_examples", eval_rows},
                                    {"skipped_pairs", data.skipped.size()},
                                    {"cut_completions", cut_completions},
                                    {"steps", total},
                                    {"seed", o.seed},
                                    {"before", to_json(before)},
                                    {"after", to_json(after)},
                                    {"train_seconds", train_seconds}};
  summary["forwarded_sequences"] = forwarded.sequences;
  summary["forwarded_tokens"] = forwarded.tokens;
  fmt::print("forward passes: {} sequences, {} tokens (reference, training and evaluation)\n",
             forwarded.sequences, forwarded.tokens);

  if (o.plot && total > 0) {
    const bool pairwise = history.empty() || history.back().second.contains("rewards/margins");
    std::vector<demo::Panel> panels = {{"loss", "train", {{"loss", "loss"}}}};
    if (pairwise) {
      panels.push_back(
          {"rewards", "train", {{"rewards/chosen", "chosen"}, {"rewards/rejected", "rejected"}}});
      panels.push_back({"rewards/margins", "train", {{"rewards/margins", "training batch"}}});
      panels.push_back({"rewards/accuracies", "train", {{"rewards/accuracies", "training batch"}}});
    }
    panels.push_back(
        {"logps", "train", {{"logps/chosen", "chosen"}, {"logps/rejected", "rejected"}}});
    panels.push_back({"evaluation: accuracies",
                      "eval",
                      {{"eval_rewards/accuracies", "held-out reward acc."},
                       {"train_rewards/accuracies", "training reward acc."},
                       {"eval_preference_accuracy", "held-out log p(c) > log p(r)"}},
                      "left center"});
    std::string error;
    const auto png = (out / "curves.png").string();
    if (demo::plot_png(png,
                       fmt::format("prefopt-train: {} on {} ({} {}, {} steps)", o.loss,
                                   fs::path(o.data).filename().string(), n_train,
                                   family == Family::kKTO ? "examples" : "pairs", total),
                       history, eval_history, panels, error))
      fmt::print("curves: {}\n", png);
    else
      fmt::print(stderr, "prefopt-train: no plot: {}\n", error);
  }

  if (o.save) {
    std::vector<fs::path> extra;
    for (const auto& f : checkpoint_extras()) extra.push_back(model_dir / f);
    train::save_pretrained(model, out, extra);
    check_bitwise(model, out);
    fmt::print("checkpoint: {} + config.json (reloaded bit for bit)\n",
               (out / "model.safetensors").string());
  }
  summary["seconds"] = clock.seconds();
  const auto text = summary.dump(2) + "\n";
  train::detail::write_file_atomically(out / "summary.json", {{text.data(), text.size()}});
  fmt::print("metrics: {}, summary: {} ({})\n", (out / "metrics.jsonl").string(),
             (out / "summary.json").string(), demo::Progress::clock(clock.seconds()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 64 << 20);  // see examples/demo/main.cpp
  mallopt(M_TRIM_THRESHOLD, 128 << 20);
#endif
  Options o;
  const fs::path shared = [] {
    if (const char* env = std::getenv("PREFOPT_DATA_DIR")) return fs::path(env);
    return fs::path(PREFOPT_SOURCE_DIR) / ".." / "shared" / "data";
  }();
  o.model = (shared / "tinystories-656k").lexically_normal().string();
  o.data = (shared / "hh-rlhf" / "harmless-base" / "test.jsonl.gz").lexically_normal().string();

  CLI::App app{
      "prefopt-train: SFT and preference training (DPO family, ORPO, SimPO, CPO, TPO, KTO) of a\n"
      "Hugging Face Llama checkpoint on preference data, with TRL's option and metric names.\n"
      "Options may also come from a TOML/INI file (--config); each long option has its TRL\n"
      "spelling (--max_length) and a dashed one (--max-length)."};
  app.get_formatter()->column_width(40);
  app.set_config("--config", "", "read options from this TOML/INI file (keys: option names)");
  // CLI11 ignores unknown keys of a config file by default: a misspelt option would then
  // silently train with its default.
  app.allow_config_extras(CLI::config_extras_mode::error);
  const auto opt_without_default = [](CLI::App* g, const std::string& trl, auto& value,
                                      const std::string& help) {
    std::string dashed = trl;
    std::replace(dashed.begin(), dashed.end(), '_', '-');
    const auto names = dashed == trl ? "--" + trl : "--" + trl + ",--" + dashed;
    return g->add_option(names, value, help);
  };
  // Most options show their default in --help; a few have none that means anything (beta's
  // depends on the loss).
  const auto opt = [&opt_without_default](CLI::App* g, const std::string& trl, auto& value,
                                          const std::string& help) {
    return opt_without_default(g, trl, value, help)->capture_default_str();
  };

  auto* io = app.add_option_group("model, data and output");
  opt(io, "model", o.model, "checkpoint folder: config.json, model.safetensors, tokenizer.json");
  opt(io, "data", o.data,
      "preference data: TRL's JSONL (prompt/chosen/rejected, or prompt/completion/label for "
      "KTO; text or messages), HH-RLHF (.jsonl.gz), or Stack Exchange pairs (.json)");
  opt(io, "eval_start", o.eval_start,
      "rows of --data from this 0-based row on are held out; the rows before it train")
      ->check(CLI::NonNegativeNumber);
  opt_without_default(io, "eval_data", o.eval_data,
                      "held-out data from another file instead of --eval_start");
  opt(io, "train_limit", o.train_limit,
      "use only the first N training examples that truncation keeps (0: all)")
      ->check(CLI::NonNegativeNumber);
  opt(io, "eval_limit", o.eval_limit,
      "use only the first N held-out examples that truncation keeps (0: all)")
      ->check(CLI::NonNegativeNumber);
  opt(io, "output_dir", o.output_dir,
      "folder for model.safetensors, config.json, metrics.jsonl, curves.png, summary.json");
  io->add_flag("!--no-save,!--no_save", o.save, "do not save the trained model");
  io->add_flag("!--no-plot,!--no_plot", o.plot, "skip the gnuplot PNG");
  auto* ascii_on = io->add_flag("--ascii", o.ascii_on,
                                "map typographic quotes, dashes and non-breaking spaces to ASCII "
                                "before tokenizing (default: only for a tokenizer without byte "
                                "fallback, such as TinyStories', which would make them <unk>)");
  io->add_flag("--no-ascii,--no_ascii", o.ascii_off, "keep typographic punctuation as it is")
      ->excludes(ascii_on);
  opt(io, "implicit_prompt", o.implicit_prompt,
      "where the prompt of {chosen, rejected} rows ends: assistant (through the last "
      "\"\\n\\nAssistant:\", TRL's HH-RLHF dataset scripts) or common_prefix (TRL 1.16's "
      "trainers' extract_prompt: the longest common character prefix)")
      ->check(CLI::IsMember({"assistant", "common_prefix"}));
  io->add_flag("--plain_chat_template,--plain-chat-template", o.plain_chat_template,
               "render message lists with the plain HH-RLHF-style template even when the "
               "checkpoint has a chat template (TRL applies the checkpoint's; prefopt-train "
               "cannot run Jinja templates, so it refuses such data without this flag)");
  opt(io, "device", o.device, "cpu, cuda or cuda:N");
  opt(io, "threads", o.threads, "intra-op threads")->check(CLI::PositiveNumber);
  opt(io, "seed", o.seed, "seed of the shuffling");

  auto* tr = app.add_option_group("training (TRL TrainingArguments)");
  opt(tr, "loss", o.loss,
      "sft, a DPO loss_type (sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair, "
      "sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm) or a "
      "comma-separated list of them (with sft: MPO), orpo, simpo, cpo, tpo, kto, "
      "apo_zero_unpaired");
  opt(tr, "num_train_epochs", o.epochs, "epochs over the training examples")
      ->check(CLI::PositiveNumber);
  opt(tr, "max_steps", o.max_steps, "optimizer steps (overrides the epochs when >= 0)");
  opt(tr, "per_device_train_batch_size", o.batch, "pairs (KTO: examples) per micro-step")
      ->check(CLI::PositiveNumber);
  opt(tr, "gradient_accumulation_steps", o.accum,
      "micro-steps per optimizer step (an epoch's last step takes the batches left)")
      ->check(CLI::PositiveNumber);
  opt(tr, "per_device_eval_batch_size", o.eval_batch,
      "pairs (KTO: examples) per evaluation batch, whose metrics are averaged as TRL's; also "
      "sequences per evaluation forward")
      ->check(CLI::PositiveNumber);
  opt(tr, "learning_rate", o.lr,
      "peak learning rate of AdamW (TRL's 1e-6 suits billions of parameters, not 656K)")
      ->check(CLI::PositiveNumber);
  opt(tr, "lr_scheduler_type", o.scheduler, "after the warmup")
      ->check(CLI::IsMember({"cosine", "linear", "constant_with_warmup"}));
  opt(tr, "warmup_ratio", o.warmup_ratio, "share of the steps with a linear warmup")
      ->check(CLI::Range(0.0, 1.0));
  opt(tr, "weight_decay", o.weight_decay,
      "AdamW's decoupled weight decay (as HF's Trainer: not on biases and norm weights)")
      ->check(CLI::NonNegativeNumber);
  opt(tr, "max_grad_norm", o.max_grad_norm, "gradient clipping")->check(CLI::PositiveNumber);
  opt(tr, "max_length", o.max_length, "tokens of prompt + completion")->check(CLI::PositiveNumber);
  opt(tr, "truncation", o.truncation,
      "keep_start: TRL 1.x's (the prompt whole, the sequence cut from the right; examples whose "
      "prompt fills max_length dropped); classic: TRL <= 0.11's keep_end (the prompt cut from the "
      "left "
      "to max_prompt_length first)")
      ->check(CLI::IsMember({"keep_start", "classic"}));
  auto* max_prompt_length = opt(tr, "max_prompt_length", o.max_prompt_length,
                                "with --truncation classic: prompt tokens kept (cut from the left)")
                                ->check(CLI::PositiveNumber);
  tr->add_flag("--one_pass,--one-pass", o.one_pass,
               "compute the loss and the LM head's gradients in one pass (prefopt's fused "
               "losses: three GEMMs where log-probs, then the loss, take four; not for sft, "
               "tpo, aot, aot_unpaired)");

  auto* lg = app.add_option_group("logging and evaluation");
  opt(lg, "logging_steps", o.logging_steps, "steps per metrics record")->check(CLI::PositiveNumber);
  opt(lg, "print_every", o.print_every, "steps between metrics lines on the terminal")
      ->check(CLI::PositiveNumber);
  opt(lg, "eval_steps", o.eval_steps, "steps between evaluations (held-out and training subset)")
      ->check(CLI::PositiveNumber);
  opt(lg, "eval_train_pairs", o.eval_train_pairs,
      "training pairs scored at the evaluations during training (0: all; all of them at the end)")
      ->check(CLI::NonNegativeNumber);

  auto* ls = app.add_option_group("loss options (TRL's names)");
  opt_without_default(ls, "beta", o.beta, "beta (ORPO's lambda) [0.1; simpo 2; tpo 0.01]");
  opt(ls, "label_smoothing", o.label_smoothing,
      "epsilon of robust, exo_pair, aot, CPO, SimPO, TPO; of sigmoid with --cdpo");
  ls->add_flag("--cdpo", o.cdpo,
               "conservative DPO: --label_smoothing also smooths sigmoid (TRL <= 0.28)");
  opt(ls, "rpo_alpha", o.rpo_alpha, "weight of the chosen NLL added to DPO losses (RPO)");
  opt_without_default(ls, "loss_weights", o.loss_weights,
                      "weights of a list of DPO loss types (MPO)")
      ->delimiter(',');
  opt(ls, "f_divergence_type", o.f_divergence_type, "DPO's f-divergence")
      ->check(CLI::IsMember({"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}));
  opt(ls, "f_alpha_divergence_coef", o.f_alpha_divergence_coef, "alpha of alpha_divergence");
  opt(ls, "discopop_tau", o.discopop_tau, "tau of discopop");
  opt(ls, "simpo_gamma", o.simpo_gamma, "SimPO's target margin gamma");
  opt_without_default(ls, "cpo_alpha", o.cpo_alpha,
                      "NLL weight of CPO (default 1) and SimPO (default 0)");
  opt(ls, "cpo_loss_type", o.cpo_loss_type, "CPO's form")
      ->check(CLI::IsMember({"sigmoid", "hinge", "ipo", "simpo", "alphapo"}));
  opt(ls, "alpha", o.alpha, "AlphaPO's alpha (SimPO, CPO simpo/alphapo)");
  opt(ls, "tpo_loss_type", o.tpo_loss_type, "TPO's form")
      ->check(CLI::IsMember({"sigmoid", "hinge", "ipo", "tpo-l"}));
  opt(ls, "tpo_alpha", o.tpo_alpha, "weight of TPO's gold-response NLL");
  opt(ls, "tpo_l_gamma", o.tpo_l_gamma, "gamma of tpo-l");
  opt(ls, "desirable_weight", o.desirable_weight, "KTO weight of desirable examples");
  opt(ls, "undesirable_weight", o.undesirable_weight, "KTO weight of undesirable examples");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's codes (103, 105, 109, ...) would make a bad command line exit unlike every other
    // error here (2); --help is a "ParseError" with code 0.
    return app.exit(e) == 0 ? 0 : 2;
  }

  const auto fail = [](const std::string& msg) {
    fmt::print(stderr, "prefopt-train: error: {}\n", msg);
    return 2;
  };
  if (const auto e = check_loss(o.loss); !e.empty()) return fail(e);
  {
    // An option of another loss family would train with nothing changed; TRL's configs refuse
    // them too (DPOConfig has no simpo_gamma).
    using Fam = Family;
    const std::vector<Fam> pairwise = {Fam::kDPO, Fam::kORPO, Fam::kSimPO,
                                       Fam::kCPO, Fam::kTPO,  Fam::kKTO};
    const std::vector<std::pair<const char*, std::vector<Fam>>> applies = {
        {"beta", pairwise},
        {"label_smoothing", {Fam::kDPO, Fam::kSimPO, Fam::kCPO, Fam::kTPO}},
        {"cdpo", {Fam::kDPO}},
        {"rpo_alpha", {Fam::kDPO}},
        {"loss_weights", {Fam::kDPO}},
        {"f_divergence_type", {Fam::kDPO}},
        {"f_alpha_divergence_coef", {Fam::kDPO}},
        {"discopop_tau", {Fam::kDPO}},
        {"simpo_gamma", {Fam::kSimPO, Fam::kCPO}},
        {"alpha", {Fam::kSimPO, Fam::kCPO}},
        {"cpo_alpha", {Fam::kSimPO, Fam::kCPO}},
        {"cpo_loss_type", {Fam::kCPO}},
        {"tpo_loss_type", {Fam::kTPO}},
        {"tpo_alpha", {Fam::kTPO}},
        {"tpo_l_gamma", {Fam::kTPO}},
        {"desirable_weight", {Fam::kKTO}},
        {"undesirable_weight", {Fam::kKTO}}};
    const auto family = family_of(o.loss);
    for (const auto& [name, families] : applies)
      if (app.count(std::string("--") + name) > 0 &&
          std::find(families.begin(), families.end(), family) == families.end())
        return fail(fmt::format("--{} is not an option of --loss {}: it would change nothing", name,
                                o.loss));
    // Within a family, options that only some of its loss types read (TRL's configs: "used
    // only when ..."; CPOConfig's alphapo sets cpo_alpha to 0).
    const auto given = [&app](const char* name) { return app.count(std::string("--") + name) > 0; };
    const auto types = split_list(o.loss);
    const auto ignored = [&](const char* name, const std::string& reads) {
      return fail(fmt::format("--{} is read only by {}: with --loss {} it would change nothing",
                              name, reads, o.loss));
    };
    if (family == Fam::kDPO && given("discopop_tau") &&
        std::find(types.begin(), types.end(), "discopop") == types.end())
      return ignored("discopop_tau", "the discopop loss type");
    if (family == Fam::kDPO && given("f_alpha_divergence_coef") &&
        o.f_divergence_type != "alpha_divergence")
      return ignored("f_alpha_divergence_coef", "--f_divergence_type alpha_divergence");
    if (family == Fam::kCPO && given("simpo_gamma") && o.cpo_loss_type != "simpo" &&
        o.cpo_loss_type != "alphapo")
      return ignored("simpo_gamma", "--cpo_loss_type simpo and alphapo");
    if (family == Fam::kCPO && given("cpo_alpha") && o.cpo_loss_type == "alphapo")
      return ignored("cpo_alpha",
                     "--cpo_loss_type sigmoid, hinge, ipo and simpo (alphapo has no NLL term)");
    if (family == Fam::kTPO && given("tpo_l_gamma") && o.tpo_loss_type != "tpo-l")
      return ignored("tpo_l_gamma", "--tpo_loss_type tpo-l");
  }
  o.implicit_prompt_given = app.count("--implicit_prompt") > 0;
  if (o.cdpo && o.label_smoothing == 0)
    return fail(
        "--cdpo smooths sigmoid with --label_smoothing, which is 0: it would change nothing");
  if (app.count("--eval_start") > 0 && !o.eval_data.empty())
    return fail(fmt::format(
        "--eval_start {} and --eval_data: with --eval_data every row of --data trains and the "
        "other file is held out; give one of them",
        o.eval_start));
  if (o.one_pass) {
    // SFT and TPO (its gold responses) are not pairwise losses; aot and aot_unpaired sort the
    // batch, so no pair's gradient is known before every pair's log-probs are.
    const auto items = split_list(o.loss);
    const bool sorts = std::any_of(items.begin(), items.end(), [](const std::string& t) {
      return t == "aot" || t == "aot_unpaired";
    });
    if (o.loss == "sft" || o.loss == "tpo" || sorts)
      return fail(fmt::format(
          "--one_pass: --loss {} has no one-pass form (sft and tpo are not pairwise losses; aot "
          "and aot_unpaired sort the batch); train it without --one_pass",
          o.loss));
  }
  if (o.truncation == "classic" && o.max_prompt_length >= o.max_length)
    return fail(fmt::format("--max_prompt_length {} must be below --max_length {}",
                            o.max_prompt_length, o.max_length));
  if (o.truncation != "classic" && max_prompt_length->count() > 0)
    return fail(fmt::format(
        "--max_prompt_length {} is TRL <= 0.11's classic truncation: give --truncation classic "
        "with it (--truncation {} keeps the whole prompt, as TRL 1.x does)",
        o.max_prompt_length, o.truncation));
  if (!fs::is_directory(o.model)) return fail("--model " + o.model + ": no such folder");
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    if (!fs::exists(fs::path(o.model) / f))
      return fail("--model " + o.model + ": no " + f + " in it");
  if (!fs::exists(o.data)) return fail("--data " + o.data + ": no such file");
  if (fs::exists(o.output_dir) && fs::equivalent(o.output_dir, o.model))
    return fail("--output_dir " + o.output_dir + " is the --model folder: choose another");
  if (!o.eval_data.empty() && !fs::exists(o.eval_data))
    return fail("--eval_data " + o.eval_data + ": no such file");
  try {
    return run(o);
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
