// SPDX-License-Identifier: Apache-2.0
// The Llama architecture in libtorch's C++ frontend, configured from a Hugging Face
// `config.json` and loaded from / saved to `model.safetensors`, parameter names and all.
//
//   x = embed_tokens(ids)
//   per layer:  x += o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n =
//   RMSNorm(x)
//               x += down_proj(silu(gate_proj(m)) * up_proj(m)),                       m =
//               RMSNorm(x)
//   hidden = RMSNorm(x);  logits = hidden · lm_headᵀ  (lm_head = embed_tokens when tied)
//
// RMSNorm in fp32 (weight · x / sqrt(mean(x²) + eps)); rotary embeddings in Hugging Face's
// rotate_half convention (dimension i pairs with i + head_dim/2, angle pos · θ^(−2i/head_dim));
// grouped-query attention (query head h reads key/value head h / (heads / kv_heads)), causal,
// softmax in fp32; SwiGLU MLP. `attention_bias` puts biases on q, k, v and o (Llama); a
// `qwen2` config puts them on q, k and v only, as Qwen2 does. RoPE's θ is read as
// transformers 5 reads it (`rope_parameters`, then `rope_theta`); Mistral's and Qwen2's
// sliding-window attention is applied per layer. The trainer asks for
// `hidden(ids, mask)` and `head_weight()`: prefopt's fused op takes those instead of logits.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "safetensors.h"

namespace train {

/// The fields of a Hugging Face Llama (or Qwen2/Mistral-style) `config.json` this model uses.
struct LlamaConfig {
  std::string model_type = "llama";
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0,
          num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0,
          max_position_embeddings = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  bool qkv_bias = false, o_bias = false, mlp_bias = false;
  std::string torch_dtype;  ///< "float32", "float16", "bfloat16", or empty (not stated)
  /// Mistral's and Qwen2's sliding-window attention: a query at index i sees keys at indices
  /// j with i − window < j ≤ i in the layers flagged in `sliding_layers` (0: none).
  int64_t sliding_window = 0;
  std::vector<bool> sliding_layers;  ///< per layer; empty when sliding_window is 0
  nlohmann::json json;               ///< the file as read, written back (updated) on save

  /// Reads and checks `path`; throws std::runtime_error naming the file and the field.
  static LlamaConfig load(const std::filesystem::path& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("config: cannot open " + path.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error("config: " + path.string() + ": not valid JSON (" + e.what() + ")");
    }
    return from_json(j, path.string());
  }

  static LlamaConfig from_json(const nlohmann::json& j, const std::string& where = "config.json") {
    const auto fail = [&](const std::string& what) {
      throw std::runtime_error("config: " + where + ": " + what);
    };
    if (!j.is_object()) fail("not a JSON object");
    LlamaConfig c;
    c.json = j;
    c.model_type = j.value("model_type", std::string("llama"));
    if (c.model_type != "llama" && c.model_type != "qwen2" && c.model_type != "mistral")
      fail("model_type \"" + c.model_type +
           "\" is not a Llama-style model (llama, qwen2, mistral)");
    const auto integer = [&](const char* key) -> int64_t {
      if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() <= 0)
        fail(std::string("needs a positive integer \"") + key + "\"");
      return j[key].get<int64_t>();
    };
    c.vocab_size = integer("vocab_size");
    c.hidden_size = integer("hidden_size");
    c.intermediate_size = integer("intermediate_size");
    c.num_hidden_layers = integer("num_hidden_layers");
    c.num_attention_heads = integer("num_attention_heads");
    c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                                ? integer("num_key_value_heads")
                                : c.num_attention_heads;
    c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null()
                     ? integer("head_dim")
                     : c.hidden_size / c.num_attention_heads;
    // The model classes' defaults when the key is absent.
    c.max_position_embeddings =
        j.value("max_position_embeddings", c.model_type == "mistral" ? int64_t{131072}
                                           : c.model_type == "qwen2" ? int64_t{32768}
                                                                     : int64_t{2048});
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    read_rope(j, c, fail);
    read_sliding_window(j, c, fail);
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);  // transformers' default
    const bool attention_bias = j.value("attention_bias", false);
    c.qkv_bias = attention_bias || c.model_type == "qwen2";
    c.o_bias = attention_bias;
    c.mlp_bias = j.value("mlp_bias", false);
    if (j.contains("torch_dtype") && j["torch_dtype"].is_string())
      c.torch_dtype = j["torch_dtype"].get<std::string>();
    else if (j.contains("dtype") && j["dtype"].is_string())
      c.torch_dtype = j["dtype"].get<std::string>();
    if (!c.torch_dtype.empty() && c.torch_dtype != "float32" && c.torch_dtype != "float16" &&
        c.torch_dtype != "bfloat16")
      fail("torch_dtype \"" + c.torch_dtype + "\" is not float32, float16 or bfloat16");
    if (j.value("hidden_act", std::string("silu")) != "silu")
      fail("hidden_act \"" + j["hidden_act"].get<std::string>() + "\": only silu is implemented");
    if (c.head_dim % 2 != 0) fail("head_dim must be even for rotary embeddings");
    if (c.num_attention_heads % c.num_key_value_heads != 0)
      fail("num_attention_heads (" + std::to_string(c.num_attention_heads) +
           ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_key_value_heads) +
           ")");
    return c;
  }

  /// RoPE as transformers 5 reads it: `rope_parameters` (or the older `rope_scaling`, which
  /// takes its place) holding `rope_type` and `rope_theta`, else the top-level `rope_theta`
  /// (transformers 4's spelling), else 10000. Only the plain ("default") rotation is
  /// implemented: any other type, a partial rotary factor or per-layer-type parameters are
  /// refused rather than computed differently.
  template <typename Fail>
  static void read_rope(const nlohmann::json& j, LlamaConfig& c, const Fail& fail) {
    // `rope_scaling or rope_parameters` in transformers: an empty object counts as absent.
    const auto given = [&](const char* key) {
      return j.contains(key) && !j[key].is_null() && !(j[key].is_object() && j[key].empty());
    };
    const char* key = given("rope_scaling") ? "rope_scaling" : "rope_parameters";
    const nlohmann::json params = given(key) ? j[key] : nlohmann::json::object();
    if (!params.is_object()) fail(std::string(key) + " is not a JSON object");
    for (const auto& [k, v] : params.items())
      if (v.is_object())
        fail(std::string(key) + " holds per-layer-type parameters (\"" + k +
             "\"): not implemented, only one plain RoPE for every layer");
    const auto number = [&](const nlohmann::json& where, const char* k, const std::string& name) {
      if (!where[k].is_number()) fail(name + " is " + where[k].dump() + ", not a number");
      return where[k].get<double>();
    };
    const char* type_key = params.contains("rope_type") ? "rope_type" : "type";
    const std::string type = !params.contains(type_key)     ? "default"
                             : params[type_key].is_string() ? params[type_key].get<std::string>()
                                                            : params[type_key].dump();
    if (type != "default")
      fail(std::string(key) + " has rope_type \"" + type +
           "\": only plain RoPE (\"default\") is implemented");
    for (const auto* where : {&params, &j})
      if (where->contains("partial_rotary_factor") &&
          !(*where)["partial_rotary_factor"].is_null() &&
          number(*where, "partial_rotary_factor", "partial_rotary_factor") != 1.0)
        fail("partial_rotary_factor " + (*where)["partial_rotary_factor"].dump() +
             ": only a rotation of the whole head (1.0) is implemented");
    const bool top = given("rope_theta");
    const double top_theta = top ? number(j, "rope_theta", "rope_theta") : 10000.0;
    c.rope_theta = top_theta;
    if (params.contains("rope_theta")) {
      c.rope_theta = number(params, "rope_theta", std::string(key) + ".rope_theta");
      // transformers 5 lets rope_parameters win; two different thetas is a config to look at.
      if (top && top_theta != c.rope_theta)
        TORCH_WARN("config: ", key, ".rope_theta = ", c.rope_theta, " and rope_theta = ", top_theta,
                   " differ; using ", c.rope_theta, " as transformers 5 does");
    }
    if (!(c.rope_theta > 0.0)) fail("rope_theta must be positive");
  }

  /// Sliding-window attention as transformers 5.25 configures it. Mistral: every layer when
  /// `sliding_window` is set (absent means MistralConfig's default, 4096; null means none).
  /// Qwen2: only with `use_sliding_window`, in the layers `layer_types` names
  /// "sliding_attention" (by default those from `max_window_layers`, 28, on). Llama: none.
  template <typename Fail>
  static void read_sliding_window(const nlohmann::json& j, LlamaConfig& c, const Fail& fail) {
    if (c.model_type == "llama") return;
    const auto flag = [&](const char* key, bool fallback) {
      if (!j.contains(key) || j[key].is_null()) return fallback;
      if (!j[key].is_boolean())
        fail(std::string(key) + " is " + j[key].dump() + ", not true or false");
      return j[key].get<bool>();
    };
    if (c.model_type == "qwen2" && !flag("use_sliding_window", false)) {
      // transformers refuses sliding layers without a window rather than running them full.
      if (j.contains("layer_types") && j["layer_types"].is_array())
        for (const auto& t : j["layer_types"])
          if (t == "sliding_attention")
            fail("layer_types names sliding_attention layers but use_sliding_window is false");
      return;
    }
    int64_t window = 4096;
    if (j.contains("sliding_window")) {
      if (j["sliding_window"].is_null()) return;
      if (!j["sliding_window"].is_number_integer() || j["sliding_window"].get<int64_t>() <= 0)
        fail("sliding_window must be a positive integer or null");
      window = j["sliding_window"].get<int64_t>();
    }
    c.sliding_window = window;
    c.sliding_layers.assign(static_cast<size_t>(c.num_hidden_layers), true);
    if (c.model_type != "qwen2") return;
    if (j.contains("layer_types") && !j["layer_types"].is_null()) {
      const auto& types = j["layer_types"];
      if (!types.is_array() || static_cast<int64_t>(types.size()) != c.num_hidden_layers)
        fail("layer_types must list one type per layer (" + std::to_string(c.num_hidden_layers) +
             ")");
      for (size_t i = 0; i < types.size(); ++i) {
        const auto t = types[i].is_string() ? types[i].get<std::string>() : std::string();
        if (t != "sliding_attention" && t != "full_attention")
          fail("layer_types[" + std::to_string(i) + "] is " + types[i].dump() +
               ", not \"full_attention\" or \"sliding_attention\"");
        c.sliding_layers[i] = t == "sliding_attention";
      }
    } else {
      int64_t first = 28;  // Qwen2Config's default
      if (j.contains("max_window_layers") && !j["max_window_layers"].is_null()) {
        if (!j["max_window_layers"].is_number_integer())
          fail("max_window_layers is " + j["max_window_layers"].dump() + ", not an integer");
        first = j["max_window_layers"].get<int64_t>();
      }
      for (int64_t i = 0; i < c.num_hidden_layers; ++i)
        c.sliding_layers[static_cast<size_t>(i)] = i >= first;
    }
  }

  /// The scalar type `torch_dtype` names (float32 when unstated).
  at::ScalarType dtype() const {
    if (torch_dtype == "float16") return at::kHalf;
    if (torch_dtype == "bfloat16") return at::kBFloat16;
    return at::kFloat;
  }
};

/// RMSNorm as Hugging Face computes it: in fp32, cast back, then scaled.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }
  at::Tensor forward(const at::Tensor& x) {
    const auto h = x.to(at::kFloat);
    const auto normed = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps_);
    return weight * normed.to(x.scalar_type());
  }
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

inline torch::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

/// Hugging Face's rotate_half: (x1, x2) -> (−x2, x1) over the two halves of the last dim.
inline at::Tensor rotate_half(const at::Tensor& x) {
  const auto half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const LlamaConfig& c)
      : heads_(c.num_attention_heads), kv_heads_(c.num_key_value_heads), head_dim_(c.head_dim) {
    q_proj = register_module("q_proj", linear(c.hidden_size, heads_ * head_dim_, c.qkv_bias));
    k_proj = register_module("k_proj", linear(c.hidden_size, kv_heads_ * head_dim_, c.qkv_bias));
    v_proj = register_module("v_proj", linear(c.hidden_size, kv_heads_ * head_dim_, c.qkv_bias));
    o_proj = register_module("o_proj", linear(heads_ * head_dim_, c.hidden_size, c.o_bias));
  }

  /// x: [B, T, D]; cos, sin: [B, T, head_dim]; blocked: [B, 1, T, T] bool, true where a query
  /// may not attend.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& blocked) {
    const auto B = x.size(0), T = x.size(1);
    auto q = q_proj(x).view({B, T, heads_, head_dim_}).transpose(1, 2);
    auto k = k_proj(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
    auto v = v_proj(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
    const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);
    q = q * c + rotate_half(q) * s;
    k = k * c + rotate_half(k) * s;
    if (heads_ != kv_heads_) {  // query head h reads key/value head h / n_rep
      k = k.repeat_interleave(heads_ / kv_heads_, 1);
      v = v.repeat_interleave(heads_ / kv_heads_, 1);
    }
    auto scores = at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(head_dim_)));
    // The lowest finite value rather than −inf, as Hugging Face does: a fully masked row
    // (left padding) gives a uniform row instead of NaN.
    scores = scores.masked_fill(blocked, std::numeric_limits<float>::lowest());
    const auto probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
    const auto y = at::matmul(probs, v).transpose(1, 2).reshape({B, T, heads_ * head_dim_});
    return o_proj(y);
  }

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  int64_t heads_, kv_heads_, head_dim_;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const LlamaConfig& c) {
    gate_proj =
        register_module("gate_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    down_proj =
        register_module("down_proj", linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
  }
  at::Tensor forward(const at::Tensor& x) { return down_proj(at::silu(gate_proj(x)) * up_proj(x)); }
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const LlamaConfig& c) {
    self_attn = register_module("self_attn", Attention(c));
    mlp = register_module("mlp", MLP(c));
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    post_attention_layernorm =
        register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& blocked) {
    x = x + self_attn(input_layernorm(x), cos, sin, blocked);
    return x + mlp(post_attention_layernorm(x));
  }
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(DecoderLayer);

/// The decoder stack ("model." in Hugging Face's parameter names).
class LlamaModelImpl : public torch::nn::Module {
 public:
  explicit LlamaModelImpl(const LlamaConfig& c) {
    embed_tokens =
        register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(DecoderLayer(c));
    register_module("layers", layers);
    norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

/// A Llama causal LM whose parameter names are Hugging Face's ("model.layers.0.self_attn.
/// q_proj.weight", ..., "lm_head.weight" when untied).
class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  explicit LlamaForCausalLMImpl(LlamaConfig c) : config(std::move(c)) {
    model = register_module("model", LlamaModel(config));
    if (!config.tie_word_embeddings)
      lm_head = register_module("lm_head", linear(config.hidden_size, config.vocab_size, false));
    // inv_freq as Hugging Face computes it (fp32): 1 / θ^(2i / head_dim).
    inv_freq_ = 1.0 / at::pow(config.rope_theta,
                              at::arange(0, config.head_dim, 2, at::kLong).to(at::kFloat) /
                                  static_cast<double>(config.head_dim));
  }

  /// Final hidden states [B, T, H] (after the last RMSNorm) of `ids` [B, T]. `attention_mask`
  /// [B, T] (1 = token, 0 = padding; optional) hides padding from attention and sets the
  /// positions to the count of real tokens before each one, so left and right padding both
  /// work; without it positions are 0..T−1.
  at::Tensor hidden(const at::Tensor& ids, const at::Tensor& attention_mask = {}) {
    TORCH_CHECK(ids.dim() == 2, "LlamaForCausalLM::hidden: expected ids [B, T], got ", ids.sizes());
    const auto B = ids.size(0), T = ids.size(1);
    const auto dev = ids.device();
    at::Tensor positions,
        blocked = at::ones({T, T}, at::TensorOptions(dev).dtype(at::kBool)).triu(1);
    blocked = blocked.view({1, 1, T, T});
    if (attention_mask.defined()) {
      const auto m = attention_mask.to(dev, at::kLong);
      positions = (m.cumsum(1) - 1).clamp_min(0);
      blocked = blocked | (m == 0).view({B, 1, 1, T});
    } else {
      positions = at::arange(T, at::TensorOptions(dev).dtype(at::kLong)).expand({B, T});
    }
    TORCH_CHECK(T <= config.max_position_embeddings || config.max_position_embeddings <= 0,
                "LlamaForCausalLM::hidden: ", T,
                " tokens exceed max_position_embeddings = ", config.max_position_embeddings);
    const auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq_.to(dev).view({1, 1, -1});
    const auto emb = at::cat({freqs, freqs}, -1);  // [B, T, head_dim]
    const auto dtype = model->embed_tokens->weight.scalar_type();
    const auto cos = emb.cos().to(dtype), sin = emb.sin().to(dtype);
    // Sliding-window layers also block keys `sliding_window` or more indices back (Hugging
    // Face's overlay: kv_idx > q_idx − window, on indices, not positions).
    at::Tensor blocked_window;
    if (config.sliding_window > 0 && T > config.sliding_window) {
      const auto i = at::arange(T, at::TensorOptions(dev).dtype(at::kLong));
      blocked_window =
          blocked | (i.view({T, 1}) - i.view({1, T}) >= config.sliding_window).view({1, 1, T, T});
    }
    auto x = model->embed_tokens(ids);
    size_t index = 0;
    for (const auto& layer : *model->layers) {
      const bool sliding = blocked_window.defined() && config.sliding_layers[index++];
      x = layer->as<DecoderLayer>()->forward(x, cos, sin, sliding ? blocked_window : blocked);
    }
    return model->norm(x);
  }

  /// The LM-head weight [V, H]: the embedding when tied.
  const at::Tensor& head_weight() const {
    return config.tie_word_embeddings ? model->embed_tokens->weight : lm_head->weight;
  }

  /// Full logits [B, T, V]; training uses `hidden` and the fused op instead.
  at::Tensor logits(const at::Tensor& ids, const at::Tensor& attention_mask = {}) {
    return at::matmul(hidden(ids, attention_mask), head_weight().t());
  }

  int64_t num_parameters() {
    int64_t n = 0;
    for (const auto& p : parameters()) n += p.numel();
    return n;
  }

  LlamaConfig config;
  LlamaModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  at::Tensor inv_freq_;
};
TORCH_MODULE(LlamaForCausalLM);

/// Copies the tensors of `st` into `m`'s parameters, checking the file against the config:
/// every parameter present with the config's shape, one dtype throughout and equal to the
/// config's `torch_dtype`, no tensor the model does not have. The loaded values are converted
/// to the parameters' dtype. Tied embeddings may be stored as `model.embed_tokens.weight`
/// (transformers' `save_pretrained`), as `lm_head.weight` (with or without the
/// `__metadata__` alias that `safetensors.torch.save_model` writes), or as both (equal).
inline void load_weights(LlamaForCausalLM& m, const SafetensorsReader& st) {
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error("checkpoint: " + st.path() + ": " + what);
  };
  const auto& cfg = m->config;
  std::set<std::string> unused;
  for (const auto& [name, e] : st.entries()) unused.insert(name);
  // Old checkpoints carry rotary buffers; transformers ignores them as well.
  for (auto it = unused.begin(); it != unused.end();)
    it = it->find("rotary_emb.inv_freq") != std::string::npos ? unused.erase(it) : std::next(it);
  std::string file_dtype;
  at::NoGradGuard no_grad;
  for (auto& item : m->named_parameters()) {
    const auto& name = item.key();
    std::string key = name;
    if (!st.contains(key)) {
      // A name the file stores under another: safetensors' save_model alias, or the tied head.
      const auto alias = st.metadata().find(key);
      if (alias != st.metadata().end() && st.contains(alias->second))
        key = alias->second;
      else if (cfg.tie_word_embeddings && name == "model.embed_tokens.weight" &&
               st.contains("lm_head.weight"))
        key = "lm_head.weight";
      else
        fail("missing tensor \"" + name + "\"" +
             (name == "lm_head.weight" ? " (config.json says tie_word_embeddings: false)" : ""));
    }
    unused.erase(key);
    const auto& e = st.entries().at(key);
    if (file_dtype.empty()) file_dtype = e.dtype;
    if (e.dtype != file_dtype)
      fail("tensor \"" + key + "\" is " + e.dtype + " but others are " + file_dtype);
    if (!cfg.torch_dtype.empty() && e.scalar_type != cfg.dtype())
      fail("tensor \"" + key + "\" is " + e.dtype + " but config.json says torch_dtype \"" +
           cfg.torch_dtype + "\"");
    if (e.shape != item.value().sizes().vec())
      fail("tensor \"" + key + "\" has shape " + detail::shape_string(e.shape) +
           " but config.json implies " + detail::shape_string(item.value().sizes().vec()));
    item.value().copy_(st.view(key));
  }
  if (cfg.tie_word_embeddings && unused.count("lm_head.weight")) {
    // Both halves of a tied pair stored: they must agree.
    const auto head = st.view("lm_head.weight");
    if (head.sizes() != m->head_weight().sizes() ||
        !at::equal(head.to(m->head_weight().scalar_type()), m->head_weight()))
      fail("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight");
    unused.erase("lm_head.weight");
  }
  if (!unused.empty())
    fail("unknown tensor \"" + *unused.begin() + "\" (not a parameter of " + cfg.model_type +
         " with this config.json)" +
         (unused.size() > 1 ? " and " + std::to_string(unused.size() - 1) + " more" : ""));
}

/// Loads `dir/config.json` and `dir/model.safetensors`.
inline LlamaForCausalLM load_pretrained(const std::filesystem::path& dir) {
  LlamaForCausalLM m(LlamaConfig::load(dir / "config.json"));
  load_weights(m, SafetensorsReader((dir / "model.safetensors").string()));
  return m;
}

/// Saves `model.safetensors` and `config.json` into `dir` as transformers' save_pretrained
/// does: tied embeddings stored once, as `model.embed_tokens.weight`; `__metadata__`
/// {"format": "pt"}; torch_dtype set to the parameters' dtype. `extra_files` (the tokenizer's
/// files, say) are copied beside them. Each file goes through a temporary name.
inline void save_pretrained(LlamaForCausalLM& m, const std::filesystem::path& dir,
                            const std::vector<std::filesystem::path>& extra_files = {}) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& item : m->named_parameters()) tensors.emplace_back(item.key(), item.value());
  auto json = m->config.json;
  const auto dtype = m->head_weight().scalar_type();
  json["torch_dtype"] = dtype == at::kHalf       ? "float16"
                        : dtype == at::kBFloat16 ? "bfloat16"
                                                 : "float32";
  if (json.contains("dtype")) json["dtype"] = json["torch_dtype"];
  const auto text = json.dump(2) + "\n";
  save_safetensors(dir / "model.safetensors", tensors);
  detail::write_file_atomically(dir / "config.json", {{text.data(), text.size()}});
  for (const auto& f : extra_files) {
    if (!fs::exists(f)) continue;
    const auto tmp = (dir / f.filename()).string() + ".tmp";
    fs::copy_file(f, tmp, fs::copy_options::overwrite_existing);
    fs::rename(tmp, dir / f.filename());
  }
}

}  // namespace train
