// SPDX-License-Identifier: Apache-2.0
// Data-parallel DPO on CPU processes with c10d Gloo: each rank trains a tiny LM head on its
// shard of a synthetic preference set, gradients are averaged over ranks, and the metrics of
// each optimizer step are reduced over micro-steps and ranks by `compute(group)` (a small
// all-reduce that checks the ranks' windows agree, then one of the packed window). Rank 0
// prints them and appends them to a JSON Lines file.
//
//   RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 ./ddp_dpo &
//   RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 ./ddp_dpo
#include <prefopt/distributed.h>
#include <prefopt/fmt.h>
#include <prefopt/prefopt.h>
#include <CLI/CLI.hpp>

#include <fmt/core.h>

namespace F = prefopt::functional;

namespace {

int run(int argc, char** argv) {
  CLI::App app{"Data-parallel DPO over c10d Gloo (launch one process per rank)"};
  int steps = 8, grad_accum = 4, pairs = 4;
  double lr = 2.0, beta = 0.1;
  std::string log_path;
  app.add_option("--steps", steps, "optimizer steps")->check(CLI::PositiveNumber);
  app.add_option("--grad-accum", grad_accum, "micro-steps per optimizer step")
      ->check(CLI::PositiveNumber);
  app.add_option("--pairs", pairs, "pairs per micro-step and rank")->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "SGD learning rate")->check(CLI::PositiveNumber);
  app.add_option("--beta", beta, "DPO beta")->check(CLI::PositiveNumber);
  app.add_option("--log", log_path, "append rank 0's metrics to this JSON Lines file");
  CLI11_PARSE(app, argc, argv);

  auto dist = prefopt::init_process_group();  // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  const int rank = dist.rank, world = dist.world_size;

  // A tiny LM head over fixed features: the same initial weights on every rank, the reference
  // model is the frozen initial head. Chosen completions use even token ids, rejected odd.
  constexpr int64_t V = 32, H = 16, T = 8, prompt = 3;
  at::manual_seed(0);
  const auto w_ref = at::randn({V, H}) * 0.1;
  auto w = w_ref.clone().requires_grad_();
  const auto draw = [&](int64_t n, int parity) {
    auto labels = at::randint(0, V / 2, {n, T}, at::kLong) * 2 + parity;
    labels.narrow(1, 0, prompt).fill_(-100);
    return labels;
  };
  prefopt::MetricAccumulator metrics;
  std::unique_ptr<prefopt::JsonlWriter> log;
  if (rank == 0 && !log_path.empty()) log = std::make_unique<prefopt::JsonlWriter>(log_path);

  const auto gather_opts = prefopt::GatherLogprobsOptions()
                               .with_logits_mean(true)
                               .with_token_accuracy(true)
                               .with_entropy(true);
  for (int step = 1; step <= steps; ++step) {
    for (int micro = 0; micro < grad_accum; ++micro) {
      // Every rank draws the global batch and keeps its shard: a stand-in for a sampler.
      const int64_t global = pairs * world;
      auto hidden = at::randn({2 * global, T, H});
      hidden.select(2, 0).fill_(1.0);  // a constant feature: the head can learn a token bias
      const auto labels = at::cat({draw(global, 0), draw(global, 1)});
      const auto mine = at::cat({at::arange(rank * pairs, (rank + 1) * pairs),
                                 at::arange(global + rank * pairs, global + (rank + 1) * pairs)});
      const auto h = hidden.index_select(0, mine), y = labels.index_select(0, mine);
      const auto policy = F::split_pairs(F::gather_logprobs(at::matmul(h, w.t()), y, gather_opts));
      prefopt::PairLogprobs reference;
      {
        at::NoGradGuard no_grad;
        reference = F::split_pairs(F::gather_logprobs(at::matmul(h, w_ref.t()), y));
      }
      const auto inputs = prefopt::PairInputs(policy, reference);
      const auto r = F::dpo_loss(inputs, prefopt::DPOLossOptions().beta(beta));
      (r.loss / grad_accum).backward();
      metrics.add(r, inputs, policy);
    }
    // Average the gradients over ranks (DDP's all-reduce), then one SGD step.
    at::Tensor grad = w.grad();
    prefopt::all_reduce_sum(grad, dist.group.get(), "ddp_dpo");
    {
      at::NoGradGuard no_grad;
      w.sub_(grad / world * lr);
      w.grad().zero_();
    }
    const auto m = metrics.compute(dist.group.get());  // collective: every rank calls it
    if (rank == 0) {
      fmt::print("step {} {:.4}\n", step, m);
      if (log) log->write(step, m);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A bad launch (a missing or wrong RANK, an unreachable master, a dead peer) ends with a
  // message and status 1, not an uncaught exception's abort.
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "ddp_dpo: error: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ddp_dpo: error: %s\n", e.what());
  }
  return 1;
}
