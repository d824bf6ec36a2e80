// SPDX-License-Identifier: Apache-2.0
// Sequence log-probs of preference pairs under a real (tiny) pretrained model.
//
// Loads llama2.c's stories260K, builds a DPO-style batch [chosen..., rejected...] of story
// continuations with the prompt masked out, and gathers per-sequence log-probs, the `logits/*`
// statistic, token accuracy and entropy in one pass, padded and packed, plus the gradient.
//
//   stories_logprobs [--data-dir ../shared/data]
#include <prefopt/prefopt.h>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "common/llama2c.h"

namespace F = prefopt::functional;

namespace {

struct Example {
  std::string prompt, chosen, rejected;
};

// Continuations in the style of TinyStories (chosen) against ones it would not write (rejected).
const std::vector<Example> kPairs = {
    {"Once upon a time, there was a little girl named Lily.",
     " She loved to play outside in the park.",
     " Quarterly revenue exceeded analyst expectations."},
    {"Tom had a red ball.", " He liked to throw it to his dog.",
     " The ball computed a matrix inverse"},
    {"The sun was shining.", " Mia and her mom went to the beach to play in the sand.",
     " Shining sun was."},
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "prefopt stories_logprobs: sequence log-probs of preference pairs under stories260K"};
  // --data-dir, else $PREFOPT_DATA_DIR, else ../shared/data beside the source tree.
  const char* env = std::getenv("PREFOPT_DATA_DIR");
  std::string data_dir =
      env ? env : (std::filesystem::path(PREFOPT_SOURCE_DIR) / ".." / "shared" / "data").string();
  const auto* given =
      app.add_option("--data-dir", data_dir, "folder holding stories260K/ (shared/data)");
  CLI11_PARSE(app, argc, argv);

  // Skipped only where the default (or $PREFOPT_DATA_DIR's) data folder is absent: a --data-dir
  // that does not exist, or a folder that lacks the model (an incomplete copy), is an error,
  // not a silently skipped test.
  if (!std::filesystem::is_directory(data_dir)) {
    if (given->count() > 0) {
      fmt::print(stderr, "stories_logprobs: error: --data-dir {} is not a folder\n", data_dir);
      return 1;
    }
    fmt::print(stderr, "stories_logprobs: no data folder at {}; pass --data-dir\n", data_dir);
    return 77;  // ctest reads this as "skipped"
  }
  const auto dir = std::filesystem::path(data_dir) / "stories260K";
  for (const char* file : {"stories260K.bin", "tok512.bin"}) {
    if (!std::filesystem::exists(dir / file)) {
      fmt::print(stderr, "stories_logprobs: error: {} not found in the data folder {}\n",
                 (dir / file).string(), data_dir);
      return 1;
    }
  }
  const auto model = llama2c::Model::load((dir / "stories260K.bin").string());
  const llama2c::Tokenizer tok((dir / "tok512.bin").string());
  fmt::print("prefopt {} on libtorch {}: stories260K (dim {}, {} layers, vocab {})\n",
             PREFOPT_VERSION_STRING, TORCH_VERSION, model.cfg.dim, model.cfg.n_layers,
             model.cfg.vocab_size);

  // Batch [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], right-padded; labels are -100
  // on the prompt (BOS included) and on padding, as TRL's and LLaMA-Factory's collators do.
  const int64_t B = static_cast<int64_t>(kPairs.size());
  std::vector<std::vector<int64_t>> ids, labels;
  for (int side = 0; side < 2; ++side) {
    for (const auto& ex : kPairs) {
      auto prompt = tok.encode(ex.prompt);
      prompt.insert(prompt.begin(), llama2c::Tokenizer::kBos);
      // Encoded separately so the prompt's tokens are the same on both sides.
      const auto completion = tok.encode((side == 0 ? ex.chosen : ex.rejected).substr(1));
      std::vector<int64_t> seq = prompt, lab(prompt.size(), -100);
      seq.insert(seq.end(), completion.begin(), completion.end());
      lab.insert(lab.end(), completion.begin(), completion.end());
      ids.push_back(seq);
      labels.push_back(lab);
    }
  }
  int64_t T = 0;
  for (const auto& s : ids) T = std::max<int64_t>(T, static_cast<int64_t>(s.size()));
  auto input = at::zeros({2 * B, T}, at::kLong);
  auto label = at::full({2 * B, T}, -100, at::kLong);
  std::vector<int64_t> cu{0};
  std::vector<at::Tensor> packed_ids, packed_labels;
  for (int64_t i = 0; i < 2 * B; ++i) {
    const auto n = static_cast<int64_t>(ids[i].size());
    const auto row = at::tensor(ids[i], at::kLong), lab = at::tensor(labels[i], at::kLong);
    input[i].slice(0, 0, n).copy_(row);
    label[i].slice(0, 0, n).copy_(lab);
    packed_ids.push_back(row);
    packed_labels.push_back(lab);
    cu.push_back(cu.back() + n);
  }

  for (auto& p : model.parameters()) p.requires_grad_(true);
  const auto logits = model.forward(input);  // [2B, T, V]
  const auto opts = prefopt::GatherLogprobsOptions()
                        .with_logits_mean(true)
                        .with_token_accuracy(true)
                        .with_entropy(true);
  const auto lp = F::gather_logprobs(logits, label, opts);
  const auto [chosen, rejected] = F::split_pairs(lp);

  fmt::print("\n{:>4} {:>6} {:>10} {:>9} {:>8} {:>9} {:>9}\n", "pair", "side", "logp sum",
             "logp mean", "tokens", "accuracy", "entropy");
  for (int64_t i = 0; i < B; ++i) {
    for (const auto* s : {&chosen, &rejected}) {
      const double n = static_cast<double>(s->count[i].item<int64_t>());
      fmt::print("{:>4} {:>6} {:>10.3f} {:>9.3f} {:>8} {:>9.3f} {:>9.3f}\n", i,
                 s == &chosen ? "chosen" : "reject", s->sum[i].item<float>(),
                 s->mean[i].item<float>(), static_cast<int64_t>(n),
                 s->correct[i].item<int64_t>() / n, s->entropy_sum[i].item<float>() / n);
    }
  }
  // TRL's `logps/*` is the mean over pairs of the summed log-probs; `logits/*` the
  // token-weighted mean of the vocabulary-mean logit over scored tokens.
  fmt::print(
      "\nlogps/chosen {:.4f}  logps/rejected {:.4f}  logits/chosen {:.4f}  logits/rejected "
      "{:.4f}\n",
      chosen.sum.mean().item<float>(), rejected.sum.mean().item<float>(),
      (chosen.logits_sum.sum() / chosen.count.sum()).item<float>(),
      (rejected.logits_sum.sum() / rejected.count.sum()).item<float>());
  const auto prefers = (chosen.sum > rejected.sum).sum().item<int64_t>();
  fmt::print("the model prefers the chosen continuation in {} of {} pairs\n", prefers, B);

  // The same sequences packed back to back (padding-free): identical per-sequence results.
  const auto cu_seqlens = at::tensor(cu, at::kLong);
  const auto packed_logits = model.forward(at::cat(packed_ids).unsqueeze(0), cu_seqlens);
  const auto packed = F::gather_packed_logprobs(packed_logits, at::cat(packed_labels).unsqueeze(0),
                                                cu_seqlens, opts);
  // The test suite runs this example: a disagreement beyond fp32 rounding is a failure.
  const double diff = (packed.sum - lp.sum).abs().max().item<double>();
  const double tol = 1e-5 * (1.0 + lp.sum.abs().max().item<double>());
  const bool agree = diff <= tol;  // false for NaN too
  fmt::print("packed vs padded: max |Δ sum| = {:.2e} ({} {:.1e})\n", diff,
             agree ? "within" : "MISMATCH: over", tol);
  if (!agree) return 1;

  // Gradients flow to the model through the gathered log-probs (a DPO-like margin here).
  const auto margin = (chosen.sum - rejected.sum).mean();
  margin.backward();
  double gnorm2 = 0;
  for (const auto& p : model.parameters()) gnorm2 += p.grad().pow(2).sum().item<double>();
  fmt::print("d(mean margin)/d(params): grad norm {:.4f}\n", std::sqrt(gnorm2));
  return 0;
}
