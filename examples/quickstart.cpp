// SPDX-License-Identifier: Apache-2.0
// Quickstart: DPO steps on any model that maps token ids [B, T] to logits [B, T, V].
#include <prefopt/fmt.h>
#include <prefopt/prefopt.h>
#include <torch/nn.h>
#include <torch/optim/adam.h>

namespace F = prefopt::functional;

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential policy(torch::nn::Embedding(100, 32), torch::nn::Linear(32, 100));
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(policy->clone());

  // A batch of B pairs: chosen rows, then rejected rows with the same prompts. Labels are the
  // ids with the prompt masked by -100; gather_logprobs shifts them by one.
  const int64_t B = 4, T = 12, prompt = 5;
  auto ids = torch::randint(0, 100, {2 * B, T});
  ids.narrow(0, B, B).narrow(1, 0, prompt).copy_(ids.narrow(0, 0, B).narrow(1, 0, prompt));
  auto labels = ids.clone();
  labels.narrow(1, 0, prompt).fill_(-100);

  torch::optim::Adam opt(policy->parameters(), torch::optim::AdamOptions(1e-2));
  const auto gather = prefopt::GatherLogprobsOptions()
                          .with_logits_mean(true)
                          .with_token_accuracy(true)
                          .with_entropy(true);
  prefopt::MetricAccumulator metrics;
  for (int step = 1; step <= 5; ++step) {
    const auto pol = F::split_pairs(F::gather_logprobs(policy->forward(ids), labels, gather));
    prefopt::PairLogprobs ref;
    {
      torch::NoGradGuard no_grad;  // the reference is frozen
      ref = F::split_pairs(F::gather_logprobs(reference->forward(ids), labels));
    }
    const auto in = prefopt::PairInputs(pol, ref);
    const auto r = F::dpo_loss(in, prefopt::DPOLossOptions().beta(0.1));
    opt.zero_grad();
    r.loss.backward();
    opt.step();
    metrics.add(r, in, pol);
    fmt::print("step {} {:.4}\n", step, metrics.compute());  // TRL's metric names
  }
}
