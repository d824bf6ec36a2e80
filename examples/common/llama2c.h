// SPDX-License-Identifier: Apache-2.0
// A tiny Llama-2 for the examples: llama2.c checkpoints (stories260K) as ATen tensors, with a
// batched causal forward, and the llama2.c BPE tokenizer. Layouts: shared/data/README.md §3.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace llama2c {

struct Config {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0,
      seq_len = 0;
  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_size(); }
};

/// Weights in nn.Linear layout [out, in]; per-layer tensors stacked on dim 0.
struct Model {
  Config cfg;
  at::Tensor tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls;

  /// Loads a llama2.c (version-0) checkpoint. Throws std::runtime_error on a short file or a
  /// header that describes no model (a size not positive, heads that do not divide `dim`, KV
  /// heads that do not divide the heads, an odd head size).
  static Model load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("llama2c: cannot open " + path);
    int32_t h[7] = {};
    // Checked before any size is read from it: a short read leaves the rest unset.
    if (!in.read(reinterpret_cast<char*>(h), sizeof h))
      throw std::runtime_error("llama2c: " + path + " is truncated (no 28-byte header)");
    Model m;
    // A negative vocab_size marks an unshared classifier (INT32_MIN has no positive).
    m.cfg = {h[0], h[1], h[2], h[3], h[4], h[5] == INT32_MIN ? 0 : std::abs(h[5]), h[6]};
    const bool shared = h[5] > 0;
    {
      const auto& c = m.cfg;
      const bool positive = c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 &&
                            c.n_kv_heads > 0 && c.vocab_size > 0 && c.seq_len > 0;
      // head_size() divides by n_heads, GQA repeats KV heads n_heads / n_kv_heads times and
      // RoPE turns pairs of a head's dimensions.
      if (!positive || c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 ||
          c.head_size() % 2 != 0) {
        throw std::runtime_error(
            "llama2c: " + path + " has an invalid header (dim " + std::to_string(h[0]) +
            ", hidden_dim " + std::to_string(h[1]) + ", n_layers " + std::to_string(h[2]) +
            ", n_heads " + std::to_string(h[3]) + ", n_kv_heads " + std::to_string(h[4]) +
            ", vocab_size " + std::to_string(h[5]) + ", seq_len " + std::to_string(h[6]) + ")");
      }
    }
    const auto& c = m.cfg;
    auto next = [&](std::vector<int64_t> shape) {
      auto t = at::empty(shape, at::kFloat);
      in.read(reinterpret_cast<char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
      if (!in) throw std::runtime_error("llama2c: " + path + " is truncated");
      return t;
    };
    const int64_t L = c.n_layers, D = c.dim, F = c.hidden_dim, KV = c.kv_dim();
    m.tok_emb = next({c.vocab_size, D});
    m.rms_att = next({L, D});
    m.wq = next({L, D, D});
    m.wk = next({L, KV, D});
    m.wv = next({L, KV, D});
    m.wo = next({L, D, D});
    m.rms_ffn = next({L, D});
    m.w1 = next({L, F, D});
    m.w2 = next({L, D, F});
    m.w3 = next({L, F, D});
    m.rms_final = next({D});
    next({c.seq_len, c.head_size() / 2});  // legacy freq_cis_real
    next({c.seq_len, c.head_size() / 2});  // legacy freq_cis_imag
    m.wcls = shared ? m.tok_emb : next({c.vocab_size, D});
    return m;
  }

  std::vector<at::Tensor> parameters() const {
    std::vector<at::Tensor> p{tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final};
    if (!wcls.is_same(tok_emb)) p.push_back(wcls);
    return p;
  }

  /// Final hidden states [B, T, dim] of token ids [B, T] (causal; each row starts at position 0).
  /// With `cu_seqlens` ([S + 1], B = 1) the row holds S packed sequences: attention stays
  /// within each and positions restart at 0, as flash-attention's varlen kernels do.
  at::Tensor hidden(const at::Tensor& tokens, const at::Tensor& cu_seqlens = {}) const {
    const int64_t B = tokens.size(0), T = tokens.size(1), H = cfg.n_heads, KVH = cfg.n_kv_heads,
                  hs = cfg.head_size();
    auto pos = at::arange(T, at::kLong);
    auto blocked = at::ones({T, T}, at::kBool).triu(1);  // true: may not attend
    if (cu_seqlens.defined()) {
      const auto seg = at::repeat_interleave(cu_seqlens.slice(0, 1) - cu_seqlens.slice(0, 0, -1));
      pos = pos - cu_seqlens.index_select(0, seg);
      blocked = blocked | (seg.unsqueeze(1) != seg.unsqueeze(0));
    }
    auto x = tok_emb.index_select(0, tokens.reshape({-1})).view({B, T, cfg.dim});
    // Interleaved RoPE: pair (2i, 2i+1) of each head turns by pos · 10000^(−2i/hs).
    const auto inv = at::pow(10000.0, -at::arange(0, hs, 2, at::kFloat) / hs);
    const auto ang = at::outer(pos.to(at::kFloat), inv);  // [T, hs/2]
    const auto cos = ang.cos().view({1, T, 1, hs / 2}), sin = ang.sin().view({1, T, 1, hs / 2});
    auto rope = [&](const at::Tensor& v, int64_t heads) {
      const auto p = v.view({B, T, heads, hs / 2, 2});
      const auto a = p.select(-1, 0), b = p.select(-1, 1);
      return at::stack({a * cos - b * sin, a * sin + b * cos}, -1).view({B, T, heads, hs});
    };
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      const auto n = rmsnorm(x, rms_att[l]);
      auto q = rope(at::matmul(n, wq[l].t()), H).transpose(1, 2);  // [B, H, T, hs]
      auto k = rope(at::matmul(n, wk[l].t()), KVH).transpose(1, 2);
      auto v = at::matmul(n, wv[l].t()).view({B, T, KVH, hs}).transpose(1, 2);
      k = k.repeat_interleave(H / KVH, 1);  // GQA: query head h reads KV head h / (H / KVH)
      v = v.repeat_interleave(H / KVH, 1);
      auto s = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(hs));
      s = s.masked_fill(blocked, -std::numeric_limits<float>::infinity()).softmax(-1);
      const auto o = at::matmul(s, v).transpose(1, 2).reshape({B, T, cfg.dim});
      x = x + at::matmul(o, wo[l].t());
      const auto m = rmsnorm(x, rms_ffn[l]);
      x = x + at::matmul(at::silu(at::matmul(m, w1[l].t())) * at::matmul(m, w3[l].t()), w2[l].t());
    }
    return rmsnorm(x, rms_final);
  }

  /// Logits [B, T, vocab] of token ids [B, T] (packed when `cu_seqlens` is given, see hidden()).
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& cu_seqlens = {}) const {
    return at::matmul(hidden(tokens, cu_seqlens), wcls.t());
  }

 private:
  static at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w) {
    return x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-5) * w;
  }
};

/// The llama2.c BPE tokenizer (tok512.bin).
class Tokenizer {
 public:
  static constexpr int64_t kBos = 1;

  explicit Tokenizer(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("llama2c: cannot open " + path);
    int32_t max_len = 0;
    in.read(reinterpret_cast<char*>(&max_len), 4);
    float score;
    int32_t len;
    while (in.read(reinterpret_cast<char*>(&score), 4) &&
           in.read(reinterpret_cast<char*>(&len), 4)) {
      // A negative length would be a string of 2⁶⁴ − |len| bytes: an allocation failure.
      if (len < 0)
        throw std::runtime_error("llama2c: " + path + " is corrupt (a piece of length " +
                                 std::to_string(len) + ")");
      std::string piece(static_cast<size_t>(len), '\0');
      in.read(piece.data(), len);
      if (!in) throw std::runtime_error("llama2c: " + path + " is truncated");
      ids_.emplace(piece, static_cast<int64_t>(pieces_.size()));
      pieces_.push_back(std::move(piece));
      scores_.push_back(score);
    }
  }

  int64_t vocab_size() const { return static_cast<int64_t>(pieces_.size()); }

  /// Token ids of `text` (no BOS): a dummy-prefix space, code points (bytes as <0xHH> when
  /// unknown), then greedy merges of the best-scoring adjacent pair.
  std::vector<int64_t> encode(const std::string& text) const {
    std::vector<int64_t> out;
    if (text.empty()) return out;
    const std::string s = " " + text;
    for (size_t i = 0; i < s.size();) {
      size_t n = 1;  // UTF-8 code point length from the lead byte
      const auto c = static_cast<unsigned char>(s[i]);
      if (c >= 0xF0)
        n = 4;
      else if (c >= 0xE0)
        n = 3;
      else if (c >= 0xC0)
        n = 2;
      n = std::min(n, s.size() - i);
      const auto it = ids_.find(s.substr(i, n));
      if (it != ids_.end()) {
        out.push_back(it->second);
      } else {
        for (size_t j = 0; j < n; ++j) out.push_back(static_cast<unsigned char>(s[i + j]) + 3);
      }
      i += n;
    }
    while (true) {
      float best = -1e30f;
      int64_t best_id = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < out.size(); ++i) {
        const auto it = ids_.find(pieces_[out[i]] + pieces_[out[i + 1]]);
        if (it != ids_.end() && scores_[it->second] > best) {
          best = scores_[it->second];
          best_id = it->second;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      out[best_at] = best_id;
      out.erase(out.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    return out;
  }

  /// Text of one token, `prev` being the token before it (BOS drops the leading space).
  std::string decode(int64_t prev, int64_t id) const {
    std::string p = pieces_.at(static_cast<size_t>(id));
    if (prev == kBos && !p.empty() && p[0] == ' ') p.erase(0, 1);
    unsigned byte = 0;
    if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1)
      return std::string(1, static_cast<char>(byte));
    return p;
  }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int64_t> ids_;
};

}  // namespace llama2c
