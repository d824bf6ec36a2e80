// SPDX-License-Identifier: Apache-2.0
// A small causal transformer (pre-LayerNorm GPT) written with libtorch's C++ frontend. It
// exposes its final hidden states and LM-head weight separately: the fused gathering op takes
// those instead of the logits. Swap in your own model by providing the same two things.
#pragma once
#include <torch/nn.h>

#include <cmath>

namespace demo {

struct ModelConfig {
  int64_t vocab = 12, max_len = 16, dim = 64, layers = 2, heads = 4;
};

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(int64_t dim, int64_t heads)
      : heads_(heads),
        ln1_(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        qkv_(register_module("qkv", torch::nn::Linear(dim, 3 * dim))),
        proj_(register_module("proj", torch::nn::Linear(dim, dim))),
        ln2_(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        fc_(register_module("fc", torch::nn::Linear(dim, 4 * dim))),
        out_(register_module("out", torch::nn::Linear(4 * dim, dim))) {}

  // x: [B, T, D]; `causal`: [T, T] additive mask (0 on and below the diagonal, -inf above).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& causal) {
    const auto B = x.size(0), T = x.size(1), D = x.size(2), dh = D / heads_;
    auto qkv = qkv_(ln1_(x)).view({B, T, 3, heads_, dh}).permute({2, 0, 3, 1, 4});  // [3,B,h,T,dh]
    auto att = at::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
    auto y = at::matmul(at::softmax(att + causal, -1), qkv[2]);  // [B, h, T, dh]
    auto h = x + proj_(y.transpose(1, 2).reshape({B, T, D}));
    return h + out_(at::gelu(fc_(ln2_(h))));
  }

 private:
  int64_t heads_;
  torch::nn::LayerNorm ln1_;
  torch::nn::Linear qkv_, proj_;
  torch::nn::LayerNorm ln2_;
  torch::nn::Linear fc_, out_;
};
TORCH_MODULE(Block);

class TinyGPTImpl : public torch::nn::Module {
 public:
  explicit TinyGPTImpl(const ModelConfig& cfg) {
    tok_ = register_module("tok", torch::nn::Embedding(cfg.vocab, cfg.dim));
    pos_ = register_parameter("pos", torch::randn({cfg.max_len, cfg.dim}) * 0.02);
    for (int64_t i = 0; i < cfg.layers; ++i) blocks_->push_back(Block(cfg.dim, cfg.heads));
    register_module("blocks", blocks_);
    ln_f_ = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({cfg.dim})));
    head_ = register_module(
        "head", torch::nn::Linear(torch::nn::LinearOptions(cfg.dim, cfg.vocab).bias(false)));
    for (auto& p : named_parameters()) {  // GPT-2's initialisation: small normal weights
      if (p.key().find("weight") != std::string::npos && p.value().dim() == 2) {
        torch::NoGradGuard no_grad;
        p.value().normal_(0.0, 0.02);
      }
    }
  }

  // Final hidden states [B, T, D] (after the last LayerNorm): what the fused op consumes.
  torch::Tensor hidden(const torch::Tensor& ids) {
    const auto T = ids.size(1);
    const auto causal =
        at::full({T, T}, -std::numeric_limits<float>::infinity(), ids.options().dtype(at::kFloat))
            .triu(1);
    auto x = tok_(ids) + pos_.narrow(0, 0, T);
    for (const auto& block : *blocks_) x = block->as<Block>()->forward(x, causal);
    return ln_f_(x);
  }
  // The LM-head weight [V, D] (no bias).
  const torch::Tensor& head_weight() const { return head_->weight; }
  torch::Tensor logits(const torch::Tensor& ids) {
    return at::matmul(hidden(ids), head_->weight.t());
  }

  // Greedy continuation of `prompts` [B, P] by `n` tokens: returns [B, n].
  torch::Tensor generate(torch::Tensor prompts, int64_t n) {
    torch::NoGradGuard no_grad;
    for (int64_t i = 0; i < n; ++i) {
      const auto next = logits(prompts).select(1, -1).argmax(-1, /*keepdim=*/true);
      prompts = at::cat({prompts, next}, 1);
    }
    return prompts.narrow(1, prompts.size(1) - n, n);
  }

 private:
  torch::nn::Embedding tok_{nullptr};
  torch::Tensor pos_;
  torch::nn::ModuleList blocks_;
  torch::nn::LayerNorm ln_f_{nullptr};
  torch::nn::Linear head_{nullptr};
};
TORCH_MODULE(TinyGPT);

}  // namespace demo
