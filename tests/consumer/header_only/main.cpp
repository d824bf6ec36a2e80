// SPDX-License-Identifier: Apache-2.0
// Header-only mode: the quickstart's DPO steps with nothing of prefopt's linked (only libtorch),
// in a program of two translation units that both include every header (second.cpp), so any
// implementation that is not `inline` shows up as a duplicate symbol.
#include <prefopt/prefopt.h>
#include <torch/nn.h>
#include <torch/optim/adam.h>

#include <cstdio>

namespace F = prefopt::functional;

double margins_of(const prefopt::Metrics& m);  // second.cpp

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential policy(torch::nn::Embedding(100, 32), torch::nn::Linear(32, 100));
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(policy->clone());
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
  prefopt::Metrics m;
  double loss = 0;
  for (int step = 1; step <= 5; ++step) {
    const auto pol = F::split_pairs(F::gather_logprobs(policy->forward(ids), labels, gather));
    prefopt::PairLogprobs ref;
    {
      torch::NoGradGuard no_grad;
      ref = F::split_pairs(F::gather_logprobs(reference->forward(ids), labels));
    }
    const auto in = prefopt::PairInputs(pol, ref);
    const auto r = F::dpo_loss(in, prefopt::DPOLossOptions().beta(0.1));
    opt.zero_grad();
    r.loss.backward();
    opt.step();
    metrics.add(r, in, pol);
    m = metrics.compute();
    loss = m.at("loss");
    std::printf("step %d loss=%.4f rewards/accuracies=%.4g rewards/margins=%.4g\n", step, loss,
                m.at("rewards/accuracies"), margins_of(m));
  }
  std::printf("header-only: CUDA kernels %s\n", prefopt::has_cuda_kernels() ? "yes" : "no");
  // As the quickstart's test: by step 5 every chosen completion is preferred.
  return loss < 0.6 && m.at("rewards/accuracies") == 1.0 && margins_of(m) > 0 ? 0 : 1;
}
