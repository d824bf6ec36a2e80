// SPDX-License-Identifier: Apache-2.0
// prefopt-train (examples/train/): the safetensors reader and writer, the tokenizer and the
// Llama model against Hugging Face's outputs (tests/fixtures/, written by
// examples/train/make_fixtures.py), the data formats and their errors, and the trainer end to
// end: a short run per loss family on HH-RLHF, the checkpoint round trip, the command line.
// Tests that read ../shared/data skip only when that folder is absent. No HH-RLHF text is
// printed: the data contain offensive material.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "run_command.h"

#include <prefopt/prefopt.h>

#include "support.h"
#include "train/data.h"
#include "train/llama.h"
#include "train/safetensors.h"
#include "train/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

fs::path data_dir() { return prefopt_test::data_dir(); }
fs::path model_dir() { return data_dir() / "tinystories-656k"; }
fs::path hh_path() { return data_dir() / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"; }
fs::path fixtures() { return fs::path(PREFOPT_SOURCE_DIR) / "tests" / "fixtures"; }

#define SKIP_WITHOUT_SHARED_DATA()                                                   \
  do {                                                                               \
    if (!fs::exists(data_dir())) GTEST_SKIP() << "no shared data at " << data_dir(); \
  } while (0)

fs::path scratch(const std::string& name) {
  const auto p = fs::path(PREFOPT_TRAIN_TEST_DIR) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Runs `f`, expecting a std::exception whose message contains `substr`.
template <typename Fn>
void expect_error(Fn&& f, const std::string& substr) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing: " << substr;
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(substr), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << substr;
  }
}

// A tiny Llama config for synthetic checkpoints.
train::LlamaConfig tiny_config(bool tied = true, const std::string& type = "llama",
                               bool attention_bias = false) {
  json j = {{"model_type", type},
            {"vocab_size", 16},
            {"hidden_size", 8},
            {"intermediate_size", 16},
            {"num_hidden_layers", 2},
            {"num_attention_heads", 2},
            {"num_key_value_heads", 1},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 10000.0},
            {"tie_word_embeddings", tied},
            {"attention_bias", attention_bias},
            {"torch_dtype", "float32"},
            {"max_position_embeddings", 64}};
  return train::LlamaConfig::from_json(j);
}

train::LlamaForCausalLM random_model(const train::LlamaConfig& c) {
  at::manual_seed(1);
  train::LlamaForCausalLM m(c);
  at::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.normal_(0.0, 0.5);
  return m;
}

// The named tensors of a model, for writing doctored checkpoints.
std::vector<std::pair<std::string, at::Tensor>> tensors_of(train::LlamaForCausalLM& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : m->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

void write_checkpoint(const fs::path& dir, const train::LlamaConfig& c,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  fs::create_directories(dir);
  write_text(dir / "config.json", c.json.dump());
  train::save_safetensors(dir / "model.safetensors", tensors);
}

void expect_bitwise_equal(train::LlamaForCausalLM& a, train::LlamaForCausalLM& b) {
  const auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) {
    const auto& x = item.value();
    const auto& y = pb[item.key()];
    ASSERT_EQ(x.sizes(), y.sizes()) << item.key();
    ASSERT_EQ(x.scalar_type(), y.scalar_type()) << item.key();
    EXPECT_EQ(std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()), 0)
        << item.key();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// safetensors

TEST(Safetensors, ReadsTheSharedCheckpoint) {
  SKIP_WITHOUT_SHARED_DATA();
  train::SafetensorsReader st((model_dir() / "model.safetensors").string());
  EXPECT_EQ(st.entries().size(), 20u);
  EXPECT_EQ(st.metadata().at("format"), "pt");
  const auto head = st.view("lm_head.weight");
  EXPECT_EQ(head.sizes(), (at::IntArrayRef{2048, 128}));
  EXPECT_EQ(head.scalar_type(), at::kFloat);
  EXPECT_TRUE(head.isfinite().all().item<bool>());
  // Tied: the file holds lm_head.weight only, with safetensors' alias in __metadata__.
  auto m = train::load_pretrained(model_dir());
  EXPECT_TRUE(at::equal(m->head_weight(), head));
  EXPECT_EQ(
      m->num_parameters(),
      2048 * 128 + 2 * (128 + 128 * 128 + 2 * 64 * 128 + 128 * 128 + 128 + 3 * 384 * 128) + 128);
}

TEST(Safetensors, WriterRoundTripAndLayout) {
  const auto dir = scratch("st-roundtrip");
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"b", at::randn({3, 5})},
      {"a", at::randn({7}).to(at::kHalf)},
      {"c", at::randn({2, 2, 3}).to(at::kBFloat16)},
      {"empty", at::zeros({0, 4})}};
  train::save_safetensors(dir / "x.safetensors", tensors, {{"format", "pt"}, {"note", "x"}});
  const auto bytes = read_text(dir / "x.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);  // padded, so the data is 8-byte aligned
  const auto header = json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["__metadata__"], (json{{"format", "pt"}, {"note", "x"}}));
  EXPECT_EQ(header["a"]["dtype"], "F16");
  EXPECT_EQ(header["c"]["dtype"], "BF16");
  EXPECT_EQ(header["a"]["data_offsets"], (json{0, 14}));  // name order
  train::SafetensorsReader st((dir / "x.safetensors").string());
  for (const auto& [name, t] : tensors) {
    const auto v = st.view(name);
    EXPECT_EQ(v.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(v, t)) << name;
  }
  EXPECT_FALSE(fs::exists(dir / "x.safetensors.tmp"));
}

TEST(Safetensors, TruncatedFiles) {
  const auto dir = scratch("st-truncated");
  train::save_safetensors(dir / "x.safetensors", {{"w", at::randn({64})}});
  const auto bytes = read_text(dir / "x.safetensors");
  for (const size_t keep : {size_t{0}, size_t{5}, size_t{20}, bytes.size() - 1}) {
    write_text(dir / "cut.safetensors", bytes.substr(0, keep));
    expect_error([&] { train::SafetensorsReader((dir / "cut.safetensors").string()); },
                 "truncated");
  }
  expect_error([&] { train::SafetensorsReader((dir / "nope.safetensors").string()); },
               "cannot open");
}

TEST(Safetensors, BadHeaders) {
  const auto dir = scratch("st-bad");
  const auto write = [&](const std::string& header, size_t data_bytes) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(uint64_t{header.size()} >> (8 * i));
    write_text(dir / "x.safetensors", s + header + std::string(data_bytes, '\0'));
    return (dir / "x.safetensors").string();
  };
  const std::vector<std::tuple<std::string, size_t, std::string>> cases = {
      {"{not json", 0, "not valid JSON"},
      {"[1, 2]", 0, "does not start with '{'"},
      {R"({"w": {"dtype": "F32", "shape": [2]}})", 8, "lacks dtype, shape or data_offsets"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 4,
       "data_offsets span 4"},
      {R"({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8,
       "dtype \"I64\" is not supported"},
      {R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4, "non-integer"},
      {R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8, "starts at byte 4"},
      {R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 12,
       "bytes after the last tensor"},
      {R"({"__metadata__": {"format": 1}})", 0, "is not a string"},
      // 2^62 · 2^2 · 4 bytes wraps to 0 in 64 bits: it must not pass as an empty tensor.
      {R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})", 0,
       "is too large"},
  };
  for (const auto& [header, data, message] : cases) {
    SCOPED_TRACE(header);
    const auto path = write(header, data);
    expect_error([&] { train::SafetensorsReader{path}; }, message);
  }
}

TEST(Safetensors, CheckpointCheckedAgainstTheConfig) {
  const auto root = scratch("st-config");
  const auto c = tiny_config();
  auto m = random_model(c);
  const auto good = tensors_of(m);
  const auto load = [&](const fs::path& dir) { return train::load_pretrained(dir); };

  // Missing key.
  auto missing = good;
  missing.erase(missing.begin() + 3);
  write_checkpoint(root / "missing", c, missing);
  expect_error([&] { load(root / "missing"); }, "missing tensor \"" + good[3].first + "\"");
  // Unknown key.
  auto unknown = good;
  unknown.emplace_back("model.layers.9.mlp.up_proj.weight", at::zeros({16, 8}));
  write_checkpoint(root / "unknown", c, unknown);
  expect_error([&] { load(root / "unknown"); },
               "unknown tensor \"model.layers.9.mlp.up_proj.weight\"");
  // Wrong dtype: config.json says float32.
  auto half = good;
  for (auto& [name, t] : half) t = t.to(at::kHalf);
  write_checkpoint(root / "half", c, half);
  expect_error([&] { load(root / "half"); }, "is F16 but config.json says torch_dtype \"float32\"");
  // The same file is fine when the config says float16 (and loads into fp32 parameters... of
  // the config's dtype: the model computes in fp32 here).
  auto c16 = c;
  c16.json["torch_dtype"] = "float16";
  write_checkpoint(root / "half16", train::LlamaConfig::from_json(c16.json), half);
  EXPECT_NO_THROW(load(root / "half16"));
  // Mixed dtypes.
  auto mixed = good;
  mixed[0].second = mixed[0].second.to(at::kBFloat16);
  auto cnone = c;
  cnone.json.erase("torch_dtype");
  write_checkpoint(root / "mixed", train::LlamaConfig::from_json(cnone.json), mixed);
  expect_error([&] { load(root / "mixed"); }, "but others are");
  // Wrong shape.
  auto shape = good;
  shape[1].second = at::zeros({3, 3});
  write_checkpoint(root / "shape", c, shape);
  expect_error([&] { load(root / "shape"); }, "has shape [3, 3] but config.json implies");
  // An untied config needs lm_head.weight.
  write_checkpoint(root / "untied", tiny_config(false), good);
  expect_error([&] { load(root / "untied"); }, "missing tensor \"lm_head.weight\"");
  // Tied, stored as lm_head.weight only (safetensors' save_model), or both halves.
  auto as_head = good;
  for (auto& [name, t] : as_head)
    if (name == "model.embed_tokens.weight") name = "lm_head.weight";
  write_checkpoint(root / "as-head", c, as_head);
  auto loaded = load(root / "as-head");
  expect_bitwise_equal(m, loaded);
  auto both = good;
  both.emplace_back("lm_head.weight", m->head_weight().clone());
  write_checkpoint(root / "both", c, both);
  EXPECT_NO_THROW(load(root / "both"));
  both.back().second += 1;
  write_checkpoint(root / "both-differ", c, both);
  expect_error([&] { load(root / "both-differ"); }, "lm_head.weight differs");
  // Bad config.
  write_text(root / "missing" / "config.json", R"({"model_type": "llama"})");
  expect_error([&] { load(root / "missing"); }, "needs a positive integer \"vocab_size\"");
  write_text(root / "missing" / "config.json", R"({"model_type": "gpt2"})");
  expect_error([&] { load(root / "missing"); }, "not a Llama-style model");
}

TEST(Safetensors, SavePretrainedRoundTripsBitForBit) {
  for (const auto& [tied, type, bias] : std::vector<std::tuple<bool, std::string, bool>>{
           {true, "llama", false}, {false, "llama", true}, {false, "qwen2", false}}) {
    SCOPED_TRACE(type + (tied ? " tied" : " untied") + (bias ? " bias" : ""));
    const auto dir = scratch("roundtrip");
    auto m = random_model(tiny_config(tied, type, bias));
    train::save_pretrained(m, dir);
    train::SafetensorsReader st((dir / "model.safetensors").string());
    EXPECT_EQ(st.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
    // transformers' save_pretrained stores tied embeddings once, as the input embedding.
    EXPECT_TRUE(st.contains("model.embed_tokens.weight"));
    EXPECT_EQ(st.contains("lm_head.weight"), !tied);
    EXPECT_EQ(st.contains("model.layers.0.self_attn.q_proj.bias"), bias || type == "qwen2");
    EXPECT_EQ(st.contains("model.layers.0.self_attn.o_proj.bias"), bias);
    auto back = train::load_pretrained(dir);
    expect_bitwise_equal(m, back);
    const auto ids = at::randint(16, {2, 5}, at::kLong);
    EXPECT_TRUE(at::equal(m->logits(ids), back->logits(ids)));
    EXPECT_EQ(json::parse(read_text(dir / "config.json"))["model_type"], type);
  }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer and model parity with Hugging Face (fixtures from make_fixtures.py)

TEST(Tokenizer, MatchesHuggingFaceTokenizers) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto tok = train::Tokenizer::load(model_dir());
  EXPECT_EQ(tok.vocab_size(), 2048);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.unk_id(), 0);
  const auto f = json::parse(read_text(fixtures() / "tinystories_tokenizer.json"));
  ASSERT_GE(f["cases"].size(), 100u);
  size_t checked = 0;
  for (const auto& c : f["cases"]) {
    const auto text = c["text"].get<std::string>();
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(tok.encode(text), ids) << "text: " << json(text).dump();
    EXPECT_EQ(tok.decode(ids), c["decoded"].get<std::string>()) << "text: " << json(text).dump();
    ++checked;
  }
  for (const auto& c : f["decode_cases"])
    EXPECT_EQ(tok.decode(c["ids"].get<std::vector<int64_t>>()), c["text"].get<std::string>());
  EXPECT_EQ(checked, f["cases"].size());
  // Without special tokens, and skipping them on decode.
  EXPECT_EQ(tok.encode("Hello world", false), (std::vector<int64_t>{80, 1288, 139, 410, 555}));
  EXPECT_EQ(tok.decode({1, 80, 1288, 139, 410, 555, 2}, true), "Hello world");
}

TEST(Tokenizer, RefusesWhatItDoesNotImplement) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("tok-bad");
  auto j = json::parse(read_text(model_dir() / "tokenizer.json"));
  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  write_text(dir / "tokenizer.json", j.dump());
  expect_error([&] { train::Tokenizer::load(dir); }, "pre_tokenizer ByteLevel is not supported");
  j["pre_tokenizer"] = nullptr;
  j["model"]["type"] = "Unigram";
  write_text(dir / "tokenizer.json", j.dump());
  expect_error([&] { train::Tokenizer::load(dir); }, "model Unigram is not supported");
  write_text(dir / "tokenizer.json", "{");
  expect_error([&] { train::Tokenizer::load(dir); }, "not valid JSON");
}

TEST(Llama, LogitsMatchTransformers) {
  SKIP_WITHOUT_SHARED_DATA();
  prefopt_test::warm_up_cpu_math();
  auto m = train::load_pretrained(model_dir());
  m->eval();
  at::NoGradGuard no_grad;
  const auto f = json::parse(read_text(fixtures() / "tinystories_model.json"));
  train::SafetensorsReader ref((fixtures() / "tinystories_logits.safetensors").string());
  const auto to_tensor = [](const json& v) {
    std::vector<int64_t> flat;
    int64_t rows = 0;
    for (const auto& r : v) flat.insert(flat.end(), r.begin(), r.end()), ++rows;
    return at::tensor(flat, at::kLong).view({rows, -1});
  };
  // Relative to each row's scale: |a − e| ≤ 1e-4 · max(|e|) per position.
  const auto expect_close = [](const at::Tensor& actual, const at::Tensor& expected) {
    const auto scale = expected.abs().amax(-1, true).clamp_min(1e-6);
    const auto err = ((actual - expected).abs() / scale).max().item<double>();
    EXPECT_LT(err, 1e-4) << "max relative error " << err;
  };
  // A right-padded batch with its attention mask: every real position, all 2048 logits.
  const auto ids = to_tensor(f["batch_ids"]);
  const auto mask = to_tensor(f["batch_attention_mask"]);
  const auto logits = m->logits(ids, mask) * mask.unsqueeze(-1).to(at::kFloat);
  expect_close(logits, ref.view("batch_logits"));
  // A longer sequence (86 positions): logsumexp and target logits everywhere, the last row.
  const auto long_ids =
      at::tensor(f["long_ids"].get<std::vector<int64_t>>(), at::kLong).unsqueeze(0);
  const auto l = m->logits(long_ids)[0];
  const auto lse = l.logsumexp(-1);
  EXPECT_LT(((lse - ref.view("long_logsumexp")).abs() / ref.view("long_logsumexp").abs())
                .max()
                .item<double>(),
            1e-4);
  const auto target = l.narrow(0, 0, l.size(0) - 1)
                          .gather(1, long_ids[0].narrow(0, 1, l.size(0) - 1).unsqueeze(1))
                          .squeeze(1);
  expect_close(target.unsqueeze(0), ref.view("long_target_logits").unsqueeze(0));
  expect_close(l[-1].unsqueeze(0), ref.view("long_last_logits").unsqueeze(0));
  // The fused op on hidden states + head weight gives the log-probs of the logits.
  const auto labels = long_ids.clone();
  labels.narrow(1, 0, 10).fill_(-100);
  const auto fused =
      prefopt::functional::fused_logprobs(m->hidden(long_ids), m->head_weight(), {}, labels);
  const auto direct = (l.log_softmax(-1)
                           .narrow(0, 9, l.size(0) - 10)
                           .gather(1, long_ids[0].narrow(0, 10, l.size(0) - 10).unsqueeze(1)))
                          .sum();
  EXPECT_NEAR(fused.sum.item<double>(), direct.item<double>(), 1e-3);
  // Padding does not change a sequence's logits (right padding; left padding via positions).
  const auto one = ids.narrow(0, 1, 1).narrow(1, 0, 4);
  const auto alone = m->logits(one);
  expect_close(logits.narrow(0, 1, 1).narrow(1, 0, 4)[0], alone[0]);
  const auto left = at::cat({at::zeros({1, 2}, at::kLong), one}, 1);
  const auto left_mask = at::cat({at::zeros({1, 2}, at::kLong), at::ones({1, 4}, at::kLong)}, 1);
  expect_close(m->logits(left, left_mask)[0].narrow(0, 2, 4), alone[0]);
}

TEST(Llama, GreedyStoryFromTheDataReadme) {
  SKIP_WITHOUT_SHARED_DATA();
  auto m = train::load_pretrained(model_dir());
  m->eval();
  at::NoGradGuard no_grad;
  auto ids = at::tensor(std::vector<int64_t>{1}, at::kLong).unsqueeze(0);
  for (int i = 0; i < 10; ++i)
    ids = at::cat({ids, m->logits(ids).select(1, -1).argmax(-1, true)}, 1);
  // shared/data/README.md: the first ids of greedy decoding from [1].
  EXPECT_EQ(std::vector<int64_t>(ids.data_ptr<int64_t>() + 1, ids.data_ptr<int64_t>() + 11),
            (std::vector<int64_t>{147, 201, 282, 215, 286, 598, 1662, 356, 499, 826}));
}

// transformers 5 saves RoPE as "rope_parameters" (no top-level rope_theta); transformers 4's
// "rope_scaling" takes its place when set. Anything but plain RoPE is refused.
TEST(Llama, RopeParametersAsTransformers5) {
  auto j = tiny_config().json;
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  EXPECT_EQ(train::LlamaConfig::from_json(j).rope_theta, 1e6);
  j.erase("rope_parameters");
  EXPECT_EQ(train::LlamaConfig::from_json(j).rope_theta, 10000.0);  // transformers' default
  j["rope_theta"] = 5e5;
  j["rope_parameters"] = nullptr;
  EXPECT_EQ(train::LlamaConfig::from_json(j).rope_theta, 5e5);
  j["rope_scaling"] = {{"type", "default"}};
  EXPECT_EQ(train::LlamaConfig::from_json(j).rope_theta, 5e5);
  // The rotation follows theta: position 1 of a one-token-apart pair differs between thetas.
  const auto with_theta = [&](double theta) {
    auto k = tiny_config().json;
    k["rope_theta"] = theta;
    auto m = random_model(train::LlamaConfig::from_json(k));
    at::NoGradGuard no_grad;
    return m->logits(at::tensor(std::vector<int64_t>{3, 5, 7}, at::kLong).unsqueeze(0));
  };
  EXPECT_GT((with_theta(1e6) - with_theta(1e4)).abs().max().item<double>(), 1e-3);
  const std::vector<std::pair<json, std::string>> refused = {
      {{{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}}}, "rope_type \"llama3\""},
      {{{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e4}}}}, "rope_type \"yarn\""},
      {{{"rope_parameters", {{"rope_theta", 1e4}, {"partial_rotary_factor", 0.5}}}},
       "partial_rotary_factor 0.5"},
      {{{"rope_parameters", {{"full_attention", {{"rope_theta", 1e4}}}}}}, "per-layer-type"},
      {{{"rope_parameters", {{"rope_theta", "big"}}}}, "rope_parameters.rope_theta is \"big\""},
  };
  for (const auto& [extra, message] : refused) {
    SCOPED_TRACE(message);
    auto k = tiny_config().json;
    k.update(extra);
    expect_error([&] { train::LlamaConfig::from_json(k); }, message);
  }
}

// Sliding-window attention (Mistral; Qwen2 with use_sliding_window): with one layer and RoPE's
// relative rotation, the last position's logits under a window of w equal full attention over
// the last w tokens alone, an independent reference.
TEST(Llama, SlidingWindowAttention) {
  auto j = tiny_config().json;
  j["num_hidden_layers"] = 1;
  const auto full_config = train::LlamaConfig::from_json(j);
  EXPECT_EQ(full_config.sliding_window, 0);
  j["model_type"] = "mistral";
  j["sliding_window"] = 3;
  const auto window_config = train::LlamaConfig::from_json(j);
  ASSERT_EQ(window_config.sliding_window, 3);
  auto windowed = random_model(window_config);
  auto full = random_model(full_config);
  expect_bitwise_equal(windowed, full);  // the same weights
  at::NoGradGuard no_grad;
  const auto ids = at::tensor(std::vector<int64_t>{3, 5, 7, 1, 2, 9, 4}, at::kLong).unsqueeze(0);
  const auto last = windowed->logits(ids).select(1, -1);
  const auto reference = full->logits(ids.narrow(1, 4, 3)).select(1, -1);
  EXPECT_LT((last - reference).abs().max().item<double>(), 1e-4);
  EXPECT_GT((last - full->logits(ids).select(1, -1)).abs().max().item<double>(), 1e-3);
  // Within the window nothing changes.
  EXPECT_TRUE(
      at::allclose(windowed->logits(ids.narrow(1, 0, 3)), full->logits(ids.narrow(1, 0, 3))));
  // MistralConfig's default is 4096; null means none.
  j.erase("sliding_window");
  EXPECT_EQ(train::LlamaConfig::from_json(j).sliding_window, 4096);
  j["sliding_window"] = nullptr;
  EXPECT_EQ(train::LlamaConfig::from_json(j).sliding_window, 0);
  // Qwen2: only with use_sliding_window, from max_window_layers on, or as layer_types says.
  auto q = tiny_config(true, "qwen2").json;
  q["sliding_window"] = 8;
  EXPECT_EQ(train::LlamaConfig::from_json(q).sliding_window, 0);
  q["use_sliding_window"] = true;
  q["max_window_layers"] = 1;
  EXPECT_EQ(train::LlamaConfig::from_json(q).sliding_layers, (std::vector<bool>{false, true}));
  q["layer_types"] = {"sliding_attention", "full_attention"};
  EXPECT_EQ(train::LlamaConfig::from_json(q).sliding_layers, (std::vector<bool>{true, false}));
  q["layer_types"] = {"sliding_attention"};
  expect_error([&] { train::LlamaConfig::from_json(q); },
               "layer_types must list one type per layer");
}

// ---------------------------------------------------------------------------------------------
// Data formats

TEST(Data, StandardPreferenceFormats) {
  const auto dir = scratch("data-formats");
  // Plain text and conversational rows, a TPO gold response.
  write_text(
      dir / "pairs.jsonl",
      R"({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "reference": " blue!"})"
      "\n"
      R"({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}], )"
      R"("chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]})"
      "\n");
  const auto d = train::load_dataset((dir / "pairs.jsonl").string());
  EXPECT_EQ(d.format, "preference");
  ASSERT_EQ(d.pairs.size(), 2u);
  EXPECT_EQ(d.pairs[0].prompt, "The sky is");
  EXPECT_EQ(d.pairs[0].gold, " blue!");
  EXPECT_EQ(d.pairs[1].prompt, "\n\nSystem: Be kind.\n\nHuman: Hi?\n\nAssistant:");
  EXPECT_EQ(d.pairs[1].chosen, " Hello!");
  EXPECT_EQ(d.pairs[1].rejected, " Go away.");
  // Implicit prompt: dialogues split at the last "\n\nAssistant:", differing prompts skipped.
  write_text(
      dir / "implicit.jsonl",
      R"({"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D", "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"})"
      "\n"
      R"({"chosen": "\n\nHuman: X\n\nAssistant: Y", "rejected": "\n\nHuman: Z\n\nAssistant: Y"})"
      "\n"
      R"({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}], "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]})"
      "\n");
  const auto imp = train::load_dataset((dir / "implicit.jsonl").string());
  EXPECT_EQ(imp.format, "implicit-prompt");
  ASSERT_EQ(imp.pairs.size(), 2u);
  EXPECT_EQ(imp.pairs[0].prompt, "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:");
  EXPECT_EQ(imp.pairs[0].chosen, " D");
  EXPECT_EQ(imp.pairs[0].rejected, " E");
  EXPECT_EQ(imp.skipped, (std::vector<int64_t>{1}));
  EXPECT_EQ(imp.pairs[1].prompt, "\n\nHuman: Q\n\nAssistant:");
  EXPECT_EQ(imp.pairs[1].chosen, " good");
  EXPECT_EQ(imp.pairs[1].row, 2);
  // Unpaired (KTO).
  write_text(
      dir / "kto.jsonl",
      R"({"prompt": "P", "completion": " yes", "label": true})"
      "\n"
      R"({"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "no"}], "label": false})"
      "\n");
  const auto u = train::load_dataset((dir / "kto.jsonl").string());
  EXPECT_EQ(u.format, "unpaired");
  ASSERT_EQ(u.unpaired.size(), 2u);
  EXPECT_TRUE(u.unpaired[0].label);
  EXPECT_FALSE(u.unpaired[1].label);
  EXPECT_EQ(u.unpaired[1].prompt, "\n\nHuman: P\n\nAssistant:");
  EXPECT_EQ(u.unpaired[1].completion, " no");
}

// TRL 1.16's trainers' extract_prompt (data_utils.py), worked by hand: the prompt ends at the
// first differing character, one back over a space; a side that is a prefix of the other
// leaves the prompt one character short of it (Python's loop variable). TPO's triples strip
// the same prompt from the reference (tpo_trainer.py `_extract_triple_prompt`).
TEST(Data, ImplicitPromptsAndTriplesAsTrl) {
  const auto dir = scratch("data-implicit");
  write_text(
      dir / "p.jsonl",
      R"({"chosen": "The sky is blue.", "rejected": "The sky is green."})"
      "\n"
      R"({"chosen": "ab", "rejected": "abc"})"
      "\n"
      R"({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hi there.", "reference": "\n\nHuman: Hi\n\nAssistant: Hey.", "images": [], "tools": null})"
      "\n"
      R"({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}], "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}], "reference": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "best"}]})"
      "\n");
  // Default: rows with "\n\nAssistant:" split after its last one, the others at TRL's prefix.
  const auto a = train::load_dataset((dir / "p.jsonl").string());
  ASSERT_EQ(a.pairs.size(), 4u);
  EXPECT_EQ(a.common_prefix_rows, 2);
  EXPECT_EQ(a.pairs[0].prompt, "The sky is");
  EXPECT_EQ(a.pairs[0].chosen, " blue.");
  EXPECT_EQ(a.pairs[0].rejected, " green.");
  EXPECT_EQ(a.pairs[1].prompt, "a");
  EXPECT_EQ(a.pairs[1].chosen, "b");
  EXPECT_EQ(a.pairs[1].rejected, "bc");
  EXPECT_EQ(a.pairs[2].prompt, "\n\nHuman: Hi\n\nAssistant:");
  EXPECT_EQ(a.pairs[2].gold, " Hey.");
  EXPECT_EQ(a.pairs[3].prompt, "\n\nHuman: Q\n\nAssistant:");
  EXPECT_EQ(a.pairs[3].gold, " best");
  EXPECT_TRUE(a.conversational);
  EXPECT_EQ(a.ignored_columns, (std::vector<std::string>{"images", "tools"}));
  // common_prefix: every row as TRL's trainers: "...Assistant: H" is shared (no space to drop).
  const auto c =
      train::load_dataset((dir / "p.jsonl").string(), train::ImplicitPrompt::kCommonPrefix);
  EXPECT_EQ(c.common_prefix_rows, 3);
  EXPECT_EQ(c.pairs[2].prompt, "\n\nHuman: Hi\n\nAssistant: H");
  EXPECT_EQ(c.pairs[2].chosen, "ello.");
  EXPECT_EQ(c.pairs[2].rejected, "i there.");
  EXPECT_EQ(c.pairs[2].gold, "ey.");
}

TEST(Data, MalformedRowsNameTheRow) {
  const auto dir = scratch("data-bad");
  const std::string good = R"({"prompt": "a", "chosen": "b", "rejected": "c"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good + "\n" + good + "\n{\"prompt\": \"a\", \"chosen\"\n", "row 3: not valid JSON"},
      {good + "\n" + R"({"prompt": "a", "chosen": "b"})" + "\n",
       "row 2: missing field \"rejected\""},
      {good + "\n" + good + "\n" + good + "\n" + R"({"prompt": "a", "chosen": 5, "rejected": "c"})",
       "row 4: field \"chosen\" is neither a string nor a list of messages"},
      {good + "\n[1]\n", "row 2: not a JSON object"},
      {good + "\n\n" + good + "\n", "row 2: empty line"},
      {R"({"prompt": [{"role": "user"}], "chosen": [], "rejected": []})",
       "row 1: field \"prompt\" message 0"},
      {R"({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], "rejected": []})",
       "row 1: field \"chosen\" must start with an assistant message"},
      {R"({"prompt": "a", "completion": "b", "label": "yes"})",
       "row 1: field \"label\" is not true or false"},
      {R"({"prompt": "a", "completion": "b", "label": true})"
       "\n"
       R"({"prompt": "a", "label": false})",
       "row 2: missing field \"completion\""},
      {R"({"chosen": "", "rejected": "x"})", "row 1: no \"prompt\" field, and \"chosen\" or"},
      // TRL refuses rows that mix text and messages.
      {R"({"prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "y"})",
       "row 1: field \"chosen\" is a string but \"prompt\" is a list of messages"},
      {R"({"prompt": "q", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"})",
       "row 1: field \"chosen\" is a list of messages but \"prompt\" is a string"},
      {R"({"prompt": [{"role": "user", "content": "q"}], "completion": "x", "label": true})",
       "row 1: field \"completion\" is a string"},
      {R"({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c", "reference": "other"})",
       "row 1: field \"reference\" does not start with the prompt"},
      {"   \n", "is empty"},
  };
  for (const auto& [text, message] : cases) {
    SCOPED_TRACE(message);
    write_text(dir / "bad.jsonl", text);
    expect_error([&] { train::load_dataset((dir / "bad.jsonl").string()); }, message);
  }
  expect_error([&] { train::load_dataset((dir / "missing.jsonl").string()); }, "no such file");
  write_text(dir / "bad.json", "[{\"question\": 1");
  expect_error([&] { train::load_dataset((dir / "bad.json").string()); }, "not valid JSON");
}

TEST(Data, HhRlhfAndStackExchange) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto hh = train::load_dataset(hh_path().string());
  EXPECT_EQ(hh.format, "implicit-prompt");
  EXPECT_EQ(hh.rows, 2312);
  EXPECT_EQ(hh.skipped, (std::vector<int64_t>{1254, 1688, 1950, 1952, 2036}));
  EXPECT_EQ(hh.pairs.size(), 2307u);
  for (const auto& p : hh.pairs) {
    ASSERT_EQ(p.prompt.rfind("\n\nAssistant:"), p.prompt.size() - 12);
    ASSERT_EQ(p.chosen.find("\n\nAssistant:"), std::string::npos);
  }
  EXPECT_EQ(hh.common_prefix_rows, 0);
  // TRL's trainers' extract_prompt keeps every row; its prompt takes in the shared start of
  // the answers in 444 of the 2307 pairs (counted independently with TRL 1.16's Python).
  const auto trl = train::load_dataset(hh_path().string(), train::ImplicitPrompt::kCommonPrefix);
  EXPECT_EQ(trl.pairs.size(), 2312u);
  EXPECT_TRUE(trl.skipped.empty());
  int64_t longer = 0;
  for (const auto& p : hh.pairs) {
    const auto& q = trl.pairs[static_cast<size_t>(p.row)];
    ASSERT_EQ(q.prompt + q.chosen, p.prompt + p.chosen);
    ASSERT_EQ(q.prompt.compare(0, p.prompt.size(), p.prompt), 0);
    longer += q.prompt.size() > p.prompt.size();
  }
  EXPECT_EQ(longer, 444);
  const auto se = train::load_dataset(
      (data_dir() / "stack-exchange-paired-tiny" / "stack_exchange_paired_tiny.json").string());
  EXPECT_EQ(se.format, "stack-exchange");
  ASSERT_EQ(se.pairs.size(), 25u);
  EXPECT_EQ(se.pairs[0].prompt.rfind("Question: ", 0), 0u);
  EXPECT_EQ(se.pairs[0].prompt.substr(se.pairs[0].prompt.size() - 10), "\n\nAnswer: ");
}

TEST(Data, TokenizationTruncationAndBatches) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto tok = train::Tokenizer::load(model_dir());
  const auto hh = train::load_dataset(hh_path().string());
  const train::TokenizeOptions o{96, 48, true, train::Truncation::kClassic};
  int64_t cut = 0;
  for (size_t i = 0; i < 300; ++i) {
    const auto& e = hh.pairs[i];
    const auto tp = train::tokenize_pair(tok, e, o);
    ASSERT_TRUE(tp.has_value());  // classic truncation drops nothing
    const auto& t = *tp;
    for (const auto* s : {&t.chosen, &t.rejected}) {
      ASSERT_LE(static_cast<int64_t>(s->ids.size()), o.max_length);
      ASSERT_EQ(s->ids.front(), tok.bos_id());  // BOS survives the cut from the left
      ASSERT_GE(s->completion_len(), 1);
      if (s->completion_len() < o.max_length - o.max_prompt_length) {
        ASSERT_EQ(s->ids.back(), tok.eos_id());  // a completion that was not cut ends with EOS
      }
    }
    if (t.chosen.prompt_len == o.max_prompt_length) {
      ++cut;
      // The prompt's end survives: the tokens just before the completion are the prompt's last.
      const auto full = train::tokenize_answer(tok, e.prompt, e.chosen, true).first;
      ASSERT_TRUE(
          std::equal(full.end() - 10, full.end(), t.chosen.ids.begin() + t.chosen.prompt_len - 10));
    }
  }
  EXPECT_GT(cut, 50);
  // Untruncated, the prompt and completion tokens are the whole text's tokens.
  const auto [p, c] =
      train::tokenize_answer(tok, "\n\nHuman: Hi\n\nAssistant:", " Hello there.", true);
  auto joined = p;
  joined.insert(joined.end(), c.begin(), c.end() - 1);
  EXPECT_EQ(joined, tok.encode("\n\nHuman: Hi\n\nAssistant: Hello there."));
  EXPECT_EQ(c.back(), tok.eos_id());
  // Typographic quotes become ASCII (the vocabulary has no others).
  EXPECT_EQ(train::ascii_punctuation("\xE2\x80\x9CHi\xE2\x80\x9D, it\xE2\x80\x99s"),
            "\"Hi\", it's");
  // A batch: right padding, −100 on prompt and padding, chosen rows then rejected rows.
  const auto t0 = *train::tokenize_pair(tok, hh.pairs[0], o),
             t1 = *train::tokenize_pair(tok, hh.pairs[1], o);
  const auto b = train::collate({&t0.chosen, &t1.chosen, &t0.rejected, &t1.rejected}, tok.pad_id());
  ASSERT_EQ(b.ids.size(0), 4);
  const auto lens = b.attention_mask.sum(1);
  EXPECT_EQ(lens[0].item<int64_t>(), static_cast<int64_t>(t0.chosen.ids.size()));
  EXPECT_EQ(lens[3].item<int64_t>(), static_cast<int64_t>(t1.rejected.ids.size()));
  EXPECT_EQ((b.labels[2] != -100).sum().item<int64_t>(), t0.rejected.completion_len());
  EXPECT_EQ(b.labels[0][t0.chosen.prompt_len - 1].item<int64_t>(), -100);
  EXPECT_EQ(b.labels[0][t0.chosen.prompt_len].item<int64_t>(), t0.chosen.ids[t0.chosen.prompt_len]);
}

// A completion that already ends with EOS gets no second one (TRL's add_eos checks first); the
// special tokens are read as transformers 5.25 reads them, config.json only filling in; a
// prompt whose last token merges with the completion's first is counted.
TEST(Data, EosOnceAndSpecialTokensAsTransformers) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto tok = train::Tokenizer::load(model_dir());
  const auto eos = tok.eos_id();
  ASSERT_EQ(eos, 2);  // "<|end_story|>" (tokenizer_config.json; config.json agrees)
  // The vocabulary's "<|end_story|>" matches after a space ("▁<|end_story|>").
  int64_t merges = 0;
  const auto [p1, c1] =
      train::tokenize_answer(tok, "Once upon a time.", " <|end_story|>", true, &merges);
  EXPECT_EQ(c1, std::vector<int64_t>{eos});
  EXPECT_EQ(merges, 0);  // "." ends a token in both
  const auto [p2, c2] = train::tokenize_answer(tok, "Once", " upon a time.", true, &merges);
  EXPECT_EQ(std::count(c2.begin(), c2.end(), eos), 1);
  EXPECT_EQ(c2.back(), eos);
  // "Once" is "On" "ce", but "Once upon" is "On" "ce▁" ...: the prompt's last token merges.
  EXPECT_EQ(merges, 1);
  const auto once = tok.encode("Once");
  EXPECT_EQ(p2, std::vector<int64_t>(once.begin(), once.end() - 1));

  const auto dir = scratch("tok-special");
  fs::copy_file(model_dir() / "tokenizer.json", dir / "tokenizer.json");
  auto config = json::parse(read_text(model_dir() / "tokenizer_config.json"));
  auto model_config = json::parse(read_text(model_dir() / "config.json"));
  const auto has_note = [](const train::Tokenizer& tk, const std::string& text) {
    for (const auto& n : tk.notes())
      if (n.find(text) != std::string::npos) return true;
    return false;
  };
  // config.json's ids do not override tokenizer_config.json's (transformers never reads them).
  model_config["eos_token_id"] = 0;
  write_text(dir / "config.json", model_config.dump());
  // transformers 5 ignores add_bos_token / add_eos_token beside a tokenizer.json: the
  // post-processor decides, and the disagreement is noted.
  config["add_bos_token"] = false;
  config["add_eos_token"] = true;
  write_text(dir / "tokenizer_config.json", config.dump());
  auto t = train::Tokenizer::load(dir);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.encode("Once"), once);
  EXPECT_TRUE(has_note(t, "add_bos_token: false but tokenizer.json's post-processor adds BOS"));
  EXPECT_TRUE(has_note(t, "add_eos_token: true but tokenizer.json's post-processor adds no EOS"));
  EXPECT_EQ(t.notes().size(), 2u);
  // Without an EOS in tokenizer_config.json, config.json's list gives the first, noted.
  config.erase("eos_token");
  config.erase("add_bos_token");
  config.erase("add_eos_token");
  write_text(dir / "tokenizer_config.json", config.dump());
  model_config["eos_token_id"] = json::array({2, 0});
  write_text(dir / "config.json", model_config.dump());
  t = train::Tokenizer::load(dir);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_TRUE(has_note(t, "using config.json's eos_token_id = 2"));
  // special_tokens_map.json: read only beside a legacy config (no added_tokens_decoder), and
  // then it overrides the config's names (transformers 5.25's legacy path).
  config["eos_token"] = "<|end_story|>";
  write_text(dir / "tokenizer_config.json", config.dump());
  write_text(dir / "special_tokens_map.json", R"({"eos_token": "<unk>"})");
  EXPECT_EQ(train::Tokenizer::load(dir).eos_id(), 2);
  config.erase("added_tokens_decoder");
  write_text(dir / "tokenizer_config.json", config.dump());
  EXPECT_EQ(train::Tokenizer::load(dir).eos_id(), 0);
  fs::remove(dir / "special_tokens_map.json");
  // No EOS anywhere: completions cannot end with one.
  config.erase("eos_token");
  write_text(dir / "tokenizer_config.json", config.dump());
  fs::remove(dir / "config.json");
  t = train::Tokenizer::load(dir);
  EXPECT_EQ(t.eos_id(), -1);
  expect_error([&] { train::tokenize_answer(t, "a", "b", true); }, "names no EOS token");
}

// TRL 1.x's truncation (the default): the prompt whole, ending where the sides' tokens first
// diverge from it (TRL ≥ 1.14), prompt + completion cut from the right to max_length, and a
// pair whose prompt alone fills max_length dropped. Checked against the untruncated tokens.
TEST(Data, KeepStartTruncation) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto tok = train::Tokenizer::load(model_dir());
  const auto hh = train::load_dataset(hh_path().string());
  const train::TokenizeOptions o{96, 0, true, train::Truncation::kKeepStart};
  int64_t dropped = 0, cut = 0, whole = 0;
  for (size_t i = 0; i < 300; ++i) {
    const auto& e = hh.pairs[i];
    const auto [pc, c] = train::tokenize_answer(tok, e.prompt, e.chosen, true);
    const auto [pr, r] = train::tokenize_answer(tok, e.prompt, e.rejected, true);
    const size_t prompt = std::min(pc.size(), pr.size());
    const auto t = train::tokenize_pair(tok, e, o);
    if (static_cast<int64_t>(prompt) >= o.max_length) {
      EXPECT_FALSE(t.has_value()) << "row " << i;
      ++dropped;
      continue;
    }
    ASSERT_TRUE(t.has_value()) << "row " << i;
    for (const auto& [s, p, comp] : {std::tie(t->chosen, pc, c), std::tie(t->rejected, pr, r)}) {
      EXPECT_EQ(s.prompt_len, static_cast<int64_t>(prompt));
      auto full = p;
      full.insert(full.end(), comp.begin(), comp.end());
      const size_t keep = std::min(full.size(), static_cast<size_t>(o.max_length));
      ASSERT_EQ(s.ids, std::vector<int64_t>(full.begin(), full.begin() + keep)) << "row " << i;
      ASSERT_GE(s.completion_len(), 1);
      (keep < full.size() ? cut : whole) += 1;
    }
  }
  // HH-RLHF's prompts are long: at max_length 96 all three cases occur often.
  EXPECT_GT(dropped, 30);
  EXPECT_GT(cut, 30);
  EXPECT_GT(whole, 30);
  // Sides whose prompt tokens end at different places (a token merged across the boundary on
  // one side): the shortest prompt is the pair's, and the longer side's extra prompt tokens
  // open its completion, so that every side's tokens stay the same.
  std::vector<int64_t> p1{1, 5, 6, 7}, c1{8, 2}, p2{1, 5, 6}, c2{9, 10, 2}, p3{1, 5, 6, 7}, c3{2};
  train::detail::common_prompt({&p1, &p2, &p3}, {&c1, &c2, &c3});
  EXPECT_EQ(p1, (std::vector<int64_t>{1, 5, 6}));
  EXPECT_EQ(p2, (std::vector<int64_t>{1, 5, 6}));
  EXPECT_EQ(p3, (std::vector<int64_t>{1, 5, 6}));
  EXPECT_EQ(c1, (std::vector<int64_t>{7, 8, 2}));
  EXPECT_EQ(c2, (std::vector<int64_t>{9, 10, 2}));
  EXPECT_EQ(c3, (std::vector<int64_t>{7, 2}));
  // Unpaired: the same rule.
  const auto& e = hh.pairs[0];
  const auto [p, c] = train::tokenize_answer(tok, e.prompt, e.chosen, true);
  const auto u = train::tokenize_unpaired(tok, e.prompt, e.chosen, o);
  EXPECT_EQ(u.has_value(), static_cast<int64_t>(p.size()) < o.max_length);
  const auto long_prompt = train::TokenizeOptions{static_cast<int64_t>(p.size()), 0, true};
  EXPECT_FALSE(train::tokenize_unpaired(tok, e.prompt, e.chosen, long_prompt).has_value());
}

// ---------------------------------------------------------------------------------------------
// prefopt-train end to end

namespace {

using Result = prefopt_test::CommandResult;

Result run_train(const std::string& args) { return prefopt_test::run_command(PREFOPT_TRAIN, args); }

// A run into a fresh scratch folder `name`, which it returns; it must succeed.
fs::path train_into(const std::string& name, const std::string& args) {
  const auto dir = scratch(name);
  const auto r = run_train(args + " --no-plot --no-save --output_dir " + dir.string());
  EXPECT_EQ(r.status, 0) << r.output;
  return dir;
}

// The records of a run's metrics.jsonl, in order.
std::vector<json> records_of(const fs::path& dir) {
  std::vector<json> out;
  std::ifstream f(dir / "metrics.jsonl");
  for (std::string line; std::getline(f, line);) out.push_back(json::parse(line));
  return out;
}

// A short run on the first 64 training pairs of HH-RLHF (4 epochs), 32 held out.
json short_run(const std::string& name, const std::string& args) {
  const auto dir = train_into(
      name,
      "--train_limit 64 --eval_limit 32 --max_steps 32 --max_length 128 --truncation classic "
      "--max_prompt_length 64 --logging_steps 8 --eval_steps 16 --eval_train_pairs 32 " +
          args);
  const auto text = read_text(dir / "summary.json");
  return text.empty() ? json::object() : json::parse(text);
}

// What every loss should do on its training pairs: lower the loss, rank more than 80 % of them
// by its implicit reward.
void expect_learns(const json& s) {
  ASSERT_TRUE(s.contains("before") && s.contains("after")) << s.dump();
  EXPECT_LT(s["after"]["train_loss"].get<double>(), s["before"]["train_loss"].get<double>())
      << s.dump(1);
  EXPECT_GT(s["after"]["train_rewards/accuracies"].get<double>(), 0.8) << s.dump(1);
  EXPECT_TRUE(s["after"].contains("eval_rewards/accuracies"));
  EXPECT_TRUE(s["after"].contains("eval_preference_accuracy"));
}

}  // namespace

TEST(Train, DpoSigmoid) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto s = short_run("dpo", "--loss sigmoid");
  expect_learns(s);
  // At the start the policy is its reference: every reward is exactly 0.
  EXPECT_EQ(s["before"]["eval_rewards/margins"].get<double>(), 0.0);
  EXPECT_EQ(s["before"]["train_rewards/accuracies"].get<double>(), 0.0);
  // metrics.jsonl: TRL's names, training records every 8 steps, evaluations at 0, 16, 32.
  std::vector<json> train, eval;
  for (const auto& r : records_of(fs::path(PREFOPT_TRAIN_TEST_DIR) / "dpo"))
    (r.contains("loss") ? train : eval).push_back(r);
  ASSERT_EQ(train.size(), 4u);
  ASSERT_EQ(eval.size(), 3u);
  for (const char* name :
       {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
        "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate", "epoch"})
    EXPECT_TRUE(train.front().contains(name)) << name;
  EXPECT_LT(train.back()["loss"].get<double>(), train.front()["loss"].get<double>());
  EXPECT_GT(train.back()["rewards/accuracies"].get<double>(), 0.8);
  EXPECT_EQ(train.back()["epoch"].get<double>(), 4.0);
  // learning_rate as HF's Trainer logs it: the rate of the record's own optimizer step (lr 1e-3,
  // 4 warmup steps of 32, then HF's cosine schedule), not the mean over the logging window.
  for (const auto& r : train) {
    const double progress = (r["step"].get<double>() - 1 - 4) / 28;
    EXPECT_NEAR(r["learning_rate"].get<double>(), 1e-3 * 0.5 * (1 + std::cos(M_PI * progress)),
                1e-12)
        << r.dump();
  }
}

TEST(Train, Sft) {
  SKIP_WITHOUT_SHARED_DATA();
  // TRL's SFT on the chosen completions: the token-mean NLL falls, and the chosen completions
  // of the training pairs become more likely.
  const auto s = short_run("sft", "--loss sft --learning_rate 3e-3");
  ASSERT_TRUE(s.contains("before") && s.contains("after")) << s.dump();
  EXPECT_LT(s["after"]["train_loss"].get<double>(), s["before"]["train_loss"].get<double>() - 0.05)
      << s.dump(1);
  EXPECT_FALSE(s["after"].contains("train_rewards/accuracies"));  // SFT has no rewards
}

TEST(Train, DpoIpo) {
  SKIP_WITHOUT_SHARED_DATA();
  expect_learns(short_run("ipo", "--loss ipo"));
}
TEST(Train, Orpo) {
  SKIP_WITHOUT_SHARED_DATA();
  expect_learns(short_run("orpo", "--loss orpo --learning_rate 3e-3"));
}
TEST(Train, Simpo) {
  SKIP_WITHOUT_SHARED_DATA();
  expect_learns(short_run("simpo", "--loss simpo"));
}
TEST(Train, Cpo) {
  SKIP_WITHOUT_SHARED_DATA();
  expect_learns(short_run("cpo", "--loss cpo --learning_rate 3e-3"));
}

TEST(Train, KtoOnTheUnpairedForm) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto s = short_run("kto", "--loss kto --per_device_train_batch_size 16");
  expect_learns(s);
  EXPECT_EQ(s["train_examples"].get<int64_t>(), 128);  // each pair: one desirable, one not
  // The KL estimate is measured on the pairs' mismatched completions: exactly 0 while the
  // policy is its reference, held out and on the training pairs.
  EXPECT_EQ(s["before"]["eval_kl"].get<double>(), 0.0);
  EXPECT_EQ(s["before"]["train_kl"].get<double>(), 0.0);
  EXPECT_TRUE(s["after"].contains("eval_kl"));
  EXPECT_TRUE(s["after"].contains("train_kl"));
}

// The training pairs are evaluated with KTO's KL estimate as the held-out pairs are: the same
// pairs given as both files give the same metrics, the loss included (with KL = 0 in its place
// it is not the loss that trains). Story-like rows (not HH-RLHF) and a light undesirable weight,
// so that the policy raises the other pairs' chosen completions and the estimate is above its
// clamp at 0.
TEST(Train, KtoTrainingPairsEvaluatedWithTheirKl) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("kto-kl");
  std::string pairs;
  const std::vector<std::string> names = {"Lily", "Tom", "Sue", "Ben", "Max", "Mia"};
  for (size_t i = 0; i < 24; ++i) {
    const auto& n = names[i % names.size()];
    pairs += json({{"prompt", "Once upon a time, " + n + " went to the park."},
                   {"chosen", " " + n + " played with a ball."},
                   {"rejected", " Ball ball the the."}})
                 .dump() +
             "\n";
  }
  const auto file = (dir / "pairs.jsonl").string();
  write_text(file, pairs);
  const auto r =
      run_train("--loss kto --undesirable_weight 0.1 --data " + file + " --eval_data " + file +
                " --max_steps 8 --no-plot --no-save --output_dir " + (dir / "out").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto after = json::parse(read_text(dir / "out" / "summary.json"))["after"];
  ASSERT_TRUE(after.contains("eval_kl")) << after.dump(1);
  EXPECT_GT(after["eval_kl"].get<double>(), 1.0) << after.dump(1);
  for (const std::string name :
       {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies"}) {
    ASSERT_TRUE(after.contains("train_" + name)) << name << "\n" << after.dump(1);
    EXPECT_EQ(after["train_" + name], after["eval_" + name]) << name;
  }
}

// --one_pass trains with prefopt's one-pass fused losses (loss and LM-head gradients in one
// pass) instead of fused_logprobs + the loss: every record of metrics.jsonl, the training
// metrics of each step and the evaluations, must match the two-pass run's. Both runs take the
// same steps on the same batches; the two ops sum in different orders, so equal within fp32
// rounding carried through a few AdamW steps (measured: at most 5e-5 relative; β times the
// log-probs' rounding, absolute, for the rewards near 0 of steps 1 and 2). The reward
// accuracies count pairs whose margin is strictly positive: while the policy is still its
// reference (steps 1 and 2, the first at learning rate 0) every margin is rounding noise, so
// they may differ by a pair or two there (libtorch 1.13: 0 against 0.25 of 8 pairs).
TEST(Train, OnePassMatchesTwoPass) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto records = [](const std::string& name, const std::string& args) {
    return records_of(train_into(
        name,
        // Classic truncation: keep_start at this max_length leaves pairs whose completions
        // are cut to a few tokens, and a held-out accuracy flipped by one such near-tie (libtorch
        // 1.13: 0.5625 against 0.625), whose sign is the two ways' rounding.
        "--train_limit 32 --eval_limit 16 --max_steps 4 --max_length 96 --truncation classic "
        "--max_prompt_length 48 --logging_steps 1 --eval_steps 2 --eval_train_pairs 16 " +
            args));
  };
  for (const char* loss : {"sigmoid,sft", "orpo", "simpo", "cpo", "kto"}) {
    SCOPED_TRACE(loss);
    const std::string args = std::string("--loss ") + loss;
    const auto two = records("two_pass", args);
    const auto one = records("one_pass", args + " --one_pass");
    ASSERT_EQ(two.size(), 7u);  // 4 training records, evaluations at 0, 2 and 4
    ASSERT_EQ(one.size(), two.size());
    int64_t compared = 0;
    for (size_t i = 0; i < two.size(); ++i) {
      ASSERT_EQ(one[i].size(), two[i].size()) << one[i].dump() << "\n" << two[i].dump();
      for (const auto& [key, want] : two[i].items()) {
        ASSERT_TRUE(one[i].contains(key)) << key;
        if (!want.is_number()) continue;
        const double a = one[i][key].get<double>(), b = want.get<double>();
        const bool count_at_zero_margin = key.find("accuracies") != std::string::npos &&
                                          two[i].contains("rewards/margins") &&
                                          std::abs(two[i]["rewards/margins"].get<double>()) < 1e-4;
        if (count_at_zero_margin) continue;
        // The absolute part: rewards and margins near 0 while the policy is its reference.
        EXPECT_NEAR(a, b, 1e-3 * std::abs(b) + 1e-4) << "record " << i << " " << key;
        ++compared;
      }
    }
    EXPECT_GT(compared, 60);
  }
}

TEST(Train, KtoAndTpoFromFiles) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("files");
  // Small story-like rows (not HH-RLHF): an unpaired KTO file and a TPO file with gold answers.
  std::string kto, tpo;
  const std::vector<std::string> names = {"Lily", "Tom", "Sue", "Ben", "Max", "Mia"};
  for (size_t i = 0; i < 24; ++i) {
    const auto& n = names[i % names.size()];
    const std::string prompt = "Once upon a time, " + n + " went to the park.";
    kto += json({{"prompt", prompt}, {"completion", " " + n + " was happy."}, {"label", true}})
               .dump() +
           "\n";
    kto += json({{"prompt", prompt}, {"completion", " The park was sad dog."}, {"label", false}})
               .dump() +
           "\n";
    tpo += json({{"prompt", prompt},
                 {"chosen", " " + n + " played with a ball."},
                 {"rejected", " Ball ball the the."},
                 {"reference", " " + n + " played all day."}})
               .dump() +
           "\n";
  }
  write_text(dir / "kto.jsonl", kto);
  write_text(dir / "tpo.jsonl", tpo);
  auto r = run_train("--loss kto --data " + (dir / "kto.jsonl").string() +
                     " --eval_start 40 --max_steps 4 --no-plot --no-save --output_dir " +
                     (dir / "kto").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("eval_kl="), std::string::npos) << r.output;
  r = run_train("--loss tpo --data " + (dir / "tpo.jsonl").string() +
                " --eval_start 20 --max_steps 4 --no-plot --no-save --output_dir " +
                (dir / "tpo").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("eval_rewards/accuracies="), std::string::npos) << r.output;
  // tpo_alpha 0: the gold responses are left out of the loss, which is not handed them (it
  // would warn that nothing reads them).
  r = run_train("--loss tpo --tpo_alpha 0 --data " + (dir / "tpo.jsonl").string() +
                " --eval_start 20 --max_steps 2 --no-plot --no-save --output_dir " +
                (dir / "tpo0").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("gold SequenceLogprobs are given"), std::string::npos) << r.output;
  // Unpaired data with a pairwise loss, and TPO without gold responses, are refused.
  r = run_train("--loss sigmoid --data " + (dir / "kto.jsonl").string() +
                " --eval_start 40 --output_dir " + (dir / "x").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("trains --loss kto or apo_zero_unpaired only"), std::string::npos)
      << r.output;
  r = run_train("--loss tpo --train_limit 4 --output_dir " + (dir / "x").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("needs a gold response"), std::string::npos) << r.output;
  // Held-out rows too: TRL's evaluation loss has the gold NLL term, and TRL tokenizes the
  // reference in every split.
  write_text(dir / "no_gold.jsonl", json({{"prompt", "Once upon a time, Tom went to the park."},
                                          {"chosen", " Tom played."},
                                          {"rejected", " Ball ball."}})
                                            .dump() +
                                        "\n");
  r = run_train("--loss tpo --data " + (dir / "tpo.jsonl").string() + " --eval_data " +
                (dir / "no_gold.jsonl").string() + " --output_dir " + (dir / "x").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("needs a gold response: " + (dir / "no_gold.jsonl").string() +
                          " row 1 has no \"reference\" field"),
            std::string::npos)
      << r.output;
}

namespace {

// Story-like pairs (not HH-RLHF) with TPO gold responses: 8 that train, and 3 held out whose
// completions differ in length and in how well the model ranks them, so that a mean over
// evaluation batches differs from the pooled mean. `held_out`: which of the 3 to write.
void write_story_pairs(const fs::path& train, const fs::path& eval,
                       const std::vector<size_t>& held_out) {
  const std::vector<std::string> names = {"Lily", "Tom", "Sue", "Ben", "Max", "Mia"};
  std::string text;
  for (size_t i = 0; i < 8; ++i) {
    const auto& n = names[i % names.size()];
    text += json({{"prompt", "Once upon a time, " + n + " went to the park."},
                  {"chosen", " " + n + " played with a ball."},
                  {"rejected", " Ball ball the the."},
                  {"reference", " " + n + " played all day."}})
                .dump() +
            "\n";
  }
  write_text(train, text);
  const std::vector<std::array<std::string, 3>> rows = {
      {"Once upon a time, Tom had a dog.",
       " The dog ran to Tom and they played in the sun all day long.", " Dog dog."},
      {"Once upon a time, Sue saw a bird.", " Sue smiled.",
       " The bird bird bird sad the was the tree and then it."},
      {"One day, Ben found a red box in the garden.",
       " Inside the box was a small toy car, and Ben was very happy.", " Box."}};
  text.clear();
  for (const auto i : held_out)  // the gold response is the chosen one
    text += json({{"prompt", rows[i][0]},
                  {"chosen", rows[i][1]},
                  {"rejected", rows[i][2]},
                  {"reference", rows[i][1]}})
                .dump() +
            "\n";
  write_text(eval, text);
}

}  // namespace

// Held-out metrics as TRL 1.16 + transformers 5.25 log them: TRL stores each evaluation batch's
// metrics (compute_loss / prediction_step) and its log() averages them, a mean of per-batch
// means; HF's evaluation_loop repeats each batch's loss per example (cut to the examples of the
// last batch) and averages, eval_loss = Σ_b |b|·loss_b / N. 3 held-out pairs in batches of 2
// (KTO: 4 examples, 2 pairs): the expected values come from runs whose held-out file is one of
// those batches alone (pairs 0-1, pair 2), where each record is that batch's value. The pooled
// mean over the 3 pairs weighs pair 2 by 1/3, not 1/2. preference_accuracy (prefopt's) and KTO's
// pair-based rewards/accuracies stay over all pairs.
TEST(Train, HeldOutMetricsPerEvalBatchAsTrl) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("eval-batches");
  const auto train = dir / "train.jsonl";
  write_story_pairs(train, dir / "all.jsonl", {0, 1, 2});
  write_story_pairs(train, dir / "first.jsonl", {0, 1});
  write_story_pairs(train, dir / "last.jsonl", {2});
  for (const std::string loss : {"sigmoid", "orpo", "tpo", "apo_zero_unpaired"}) {
    SCOPED_TRACE(loss);
    const bool kto = loss == "apo_zero_unpaired";
    const auto after = [&](const std::string& held_out) {
      const auto out = dir / ("out-" + held_out);
      const auto r = run_train("--loss " + loss + " --data " + train.string() + " --eval_data " +
                               (dir / (held_out + ".jsonl")).string() +
                               " --max_steps 3 --per_device_eval_batch_size " + (kto ? "4" : "2") +
                               " --no-plot --no-save --output_dir " + out.string());
      EXPECT_EQ(r.status, 0) << r.output;
      return json::parse(read_text(out / "summary.json"))["after"];
    };
    const auto all = after("all"), first = after("first"), last = after("last");
    int64_t compared = 0;
    for (const auto& [key, got] : all.items()) {
      if (key.rfind("eval_", 0) != 0) continue;
      ASSERT_TRUE(first.contains(key) && last.contains(key)) << key;
      const double a = first[key].get<double>(), b = last[key].get<double>();
      const bool pooled = key == "eval_loss" || key == "eval_preference_accuracy" ||
                          (kto && key == "eval_rewards/accuracies");
      const double want = pooled ? (2 * a + b) / 3 : (a + b) / 2;
      EXPECT_NEAR(got.get<double>(), want, 1e-5 * std::abs(want) + 1e-7) << key;
      ++compared;
    }
    EXPECT_GE(compared, 7);
    // The pooled mean would be far off: the test tells the two apart.
    const double a = first["eval_rewards/margins"].get<double>(),
                 b = last["eval_rewards/margins"].get<double>();
    EXPECT_GT(std::abs((a + b) / 2 - (2 * a + b) / 3), 1e-3) << a << " " << b;
  }
  // TRL's TPO evaluation loss has the gold NLL term: before training (--max_steps 0), TPO's
  // eval_loss less its tpo_alpha 0 form is the gold responses' NLL, here the chosen ones', which
  // is SFT's eval_loss over the same batches (each batch's token mean, weighted by its pairs).
  const auto before = [&](const std::string& args) {
    const auto out = dir / "out-tpo-nll";
    const auto r = run_train(args + " --data " + train.string() + " --eval_data " +
                             (dir / "all.jsonl").string() +
                             " --max_steps 0 --per_device_eval_batch_size 2 --no-plot --no-save "
                             "--output_dir " +
                             out.string());
    EXPECT_EQ(r.status, 0) << r.output;
    return json::parse(read_text(out / "summary.json"))["before"]["eval_loss"].get<double>();
  };
  const double nll = before("--loss sft");
  EXPECT_GT(nll, 1.0);
  EXPECT_NEAR(before("--loss tpo --tpo_alpha 0.5") - before("--loss tpo --tpo_alpha 0"), 0.5 * nll,
              1e-5 * nll);
}

// KTO on an unpaired held-out file: batches of --per_device_eval_batch_size examples in file
// order, each with its own metrics (a batch without undesirable examples has no rejected
// rewards and no margin, as in TRL), and eval_loss weighted by the batches' examples. 5 examples
// in batches of 2: (desirable, undesirable), (desirable, desirable), (undesirable); the expected
// values come from runs on each batch alone.
TEST(Train, HeldOutUnpairedMetricsPerEvalBatchAsTrl) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("eval-batches-unpaired");
  const std::vector<std::pair<std::string, bool>> rows = {
      {" The dog ran to Tom and they played in the sun all day long.", true},
      {" The bird bird sad the was the tree.", false},
      {" Ben was happy.", true},
      {" Tom and his mom went home and had some cake.", true},
      {" Box box.", false}};
  const auto file = [&](const std::string& name, size_t from, size_t to) {
    std::string text;
    for (size_t i = from; i < to; ++i)
      text += json({{"prompt", "Once upon a time, Tom had a dog."},
                    {"completion", rows[i].first},
                    {"label", rows[i].second}})
                  .dump() +
              "\n";
    write_text(dir / name, text);
    return (dir / name).string();
  };
  std::string train;
  for (int i = 0; i < 8; ++i)
    train += json({{"prompt", "Once upon a time, Lily went to the park."},
                   {"completion", i % 2 ? " Ball ball the the." : " Lily played with a ball."},
                   {"label", i % 2 == 0}})
                 .dump() +
             "\n";
  write_text(dir / "train.jsonl", train);
  const auto after = [&](const std::string& held_out) {
    const auto out = dir / "out";
    const auto r = run_train("--loss apo_zero_unpaired --data " + (dir / "train.jsonl").string() +
                             " --eval_data " + held_out +
                             " --max_steps 3 --per_device_eval_batch_size 2 --no-plot --no-save "
                             "--output_dir " +
                             out.string());
    EXPECT_EQ(r.status, 0) << r.output;
    return json::parse(read_text(out / "summary.json"))["after"];
  };
  const auto all = after(file("all.jsonl", 0, 5));
  const std::vector<json> batches = {after(file("b1.jsonl", 0, 2)), after(file("b2.jsonl", 2, 4)),
                                     after(file("b3.jsonl", 4, 5))};
  const double sizes[] = {2, 2, 1};
  int64_t compared = 0;
  for (const auto& [key, got] : all.items()) {
    if (key.rfind("eval_", 0) != 0) continue;
    double sum = 0, n = 0, weighted = 0;
    for (size_t b = 0; b < batches.size(); ++b)
      if (batches[b].contains(key)) {
        sum += batches[b][key].get<double>(), ++n;
        weighted += sizes[b] * batches[b][key].get<double>();
      }
    ASSERT_GT(n, 0) << key;
    const double want = key == "eval_loss" ? weighted / 5 : sum / n;
    EXPECT_NEAR(got.get<double>(), want, 1e-5 * std::abs(want) + 1e-7) << key;
    ++compared;
  }
  EXPECT_GE(compared, 6);
  // Pooled, the three desirable examples would weigh alike; per batch, batch 1's one weighs as
  // much as batch 2's two.
  const double c1 = batches[0]["eval_rewards/chosen"].get<double>(),
               c2 = batches[1]["eval_rewards/chosen"].get<double>();
  EXPECT_GT(std::abs((c1 + c2) / 2 - (c1 + 2 * c2) / 3), 1e-3) << c1 << " " << c2;
  EXPECT_FALSE(batches[1].contains("eval_rewards/margins"));  // no undesirable example
}

// TPO with tpo_alpha 0 does not forward the gold responses (TRL's collator drops that branch):
// 2 steps of 8 pairs and 2 evaluations of the 3 held-out and the 8 training pairs forward
// 2·(2·8 + 2·(3 + 8)) = 76 sequences, not 3 per training pair. Nothing else changes: TPO
// sigmoid with tpo_alpha 0 is CPO sigmoid with cpo_alpha 0 at the same β, and the two runs log
// the same numbers (CPO's nll_loss, 0, aside).
TEST(Train, TpoWithoutNllForwardsNoGold) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("tpo-no-gold");
  const auto train = dir / "train.jsonl", held_out = dir / "eval.jsonl";
  write_story_pairs(train, held_out, {0, 1, 2});
  const auto run = [&](const std::string& args) {
    const auto out = dir / "out";
    const auto r = run_train(
        args + " --beta 0.1 --data " + train.string() + " --eval_data " + held_out.string() +
        " --max_steps 2 --logging_steps 1 --no-plot --no-save --output_dir " + out.string());
    EXPECT_EQ(r.status, 0) << r.output;
    return std::make_pair(json::parse(read_text(out / "summary.json")), records_of(out));
  };
  const auto [tpo, tpo_records] = run("--loss tpo --tpo_alpha 0");
  EXPECT_EQ(tpo["forwarded_sequences"].get<int64_t>(), 76);
  const auto [cpo, cpo_records] = run("--loss cpo --cpo_alpha 0");
  EXPECT_EQ(cpo["forwarded_sequences"].get<int64_t>(), 76);
  EXPECT_EQ(tpo["forwarded_tokens"], cpo["forwarded_tokens"]);
  // With the NLL term the gold responses are forwarded: 3 sequences per pair throughout.
  EXPECT_EQ(run("--loss tpo --tpo_alpha 1").first["forwarded_sequences"].get<int64_t>(), 114);
  ASSERT_EQ(tpo_records.size(), 4u);  // evaluations at 0 and 2, training records 1 and 2
  ASSERT_EQ(cpo_records.size(), tpo_records.size());
  int64_t compared = 0;
  for (size_t i = 0; i < tpo_records.size(); ++i)
    for (const auto& [key, want] : cpo_records[i].items()) {
      if (key.find("nll_loss") != std::string::npos) continue;
      ASSERT_TRUE(tpo_records[i].contains(key)) << key;
      const double b = want.get<double>();
      EXPECT_NEAR(tpo_records[i][key].get<double>(), b, 1e-6 * std::abs(b) + 1e-9)
          << "record " << i << " " << key;
      ++compared;
    }
  EXPECT_GT(compared, 40);
}

TEST(Train, CheckpointReloadsBitForBit) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto a = scratch("ckpt-a"), b = scratch("ckpt-b");
  const std::string common = " --train_limit 16 --eval_limit 8 --max_length 96 --no-plot ";
  auto r = run_train("--loss sigmoid --max_steps 3 --output_dir " + a.string() + common);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("reloaded bit for bit"), std::string::npos) << r.output;
  for (const char* f :
       {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"})
    EXPECT_TRUE(fs::exists(a / f)) << f;
  // Trained weights differ from the checkpoint it started from.
  EXPECT_NE(read_text(a / "model.safetensors"), read_text(model_dir() / "model.safetensors"));
  // A second run starts from the saved folder and saves it again untouched: the same bytes,
  // and its "before" evaluation is the first run's "after".
  r = run_train("--model " + a.string() + " --max_steps 0 --output_dir " + b.string() + common);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_text(a / "model.safetensors"), read_text(b / "model.safetensors"));
  const auto sa = json::parse(read_text(a / "summary.json")),
             sb = json::parse(read_text(b / "summary.json"));
  EXPECT_EQ(sa["after"]["eval_logps/chosen"], sb["before"]["eval_logps/chosen"]);
  EXPECT_EQ(sa["after"]["train_preference_accuracy"], sb["before"]["train_preference_accuracy"]);
  // transformers reads the config back: same architecture and dtype.
  const auto ca = json::parse(read_text(a / "config.json"));
  EXPECT_EQ(ca["architectures"], json({"LlamaForCausalLM"}));
  EXPECT_EQ(ca["torch_dtype"], "float32");
  EXPECT_EQ(ca["tie_word_embeddings"], true);
}

// --weight_decay as HF's Trainer applies it (get_decay_parameter_names): not to biases and norm
// weights. One AdamW step at the full learning rate from the same weights, with and without
// decay: a spared weight ends bit for bit the same; a decayed one differs by −lr·wd·w₀ (AdamW's
// decoupled decay, w·(1 − lr·wd) before the same Adam update).
TEST(Train, WeightDecaySparesNormWeightsAsHf) {
  SKIP_WITHOUT_SHARED_DATA();
  const std::string common =
      " --train_limit 8 --eval_limit 4 --max_length 64 --max_steps 1 --warmup_ratio 0 "
      "--learning_rate 1e-2 --no-plot --output_dir ";
  const auto a = scratch("wd-0"), b = scratch("wd-1");
  auto r = run_train("--weight_decay 0" + common + a.string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_train("--weight_decay 0.5" + common + b.string());
  ASSERT_EQ(r.status, 0) << r.output;
  auto m0 = train::load_pretrained(model_dir()), ma = train::load_pretrained(a),
       mb = train::load_pretrained(b);
  auto p0 = m0->named_parameters(), pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const char* name : {"model.norm.weight", "model.layers.0.input_layernorm.weight",
                           "model.layers.1.post_attention_layernorm.weight"}) {
    SCOPED_TRACE(name);
    EXPECT_FALSE(at::equal(pa[name], p0[name]));  // trained
    EXPECT_TRUE(at::equal(pa[name], pb[name]));   // not decayed
  }
  for (const char* name : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.1.mlp.down_proj.weight"}) {
    SCOPED_TRACE(name);
    const auto want = p0[name] * (-1e-2 * 0.5);
    EXPECT_TRUE(at::allclose(pb[name] - pa[name], want, 1e-3, 1e-6))
        << (pb[name] - pa[name] - want).abs().max().item<double>();
  }
}

// The steps of HF's Trainer with its default dataloader_drop_last=False (transformers 5.25,
// set_initial_training_values and _inner_training_loop): 9 pairs in batches of 2 are
// ceil(9/2) = 5 batches per epoch, the last of 1 pair, and 2 batches per optimizer step give
// ceil(5/2) = 3 steps per epoch, the last taking the 1 batch left; 2 epochs are 6 steps, and
// the learning-rate schedule runs over 6. The pairs are identical and the learning rate is
// 1e-30 (the first step, in warmup, at 0), so every step sees the same weights: each batch's
// mean loss and gradient are the same whatever its size, and so is every step's gradient norm
// when the last step divides its one batch's loss by 1, as HF's Trainer does
// (current_gradient_accumulation_steps), not by 2.
TEST(Train, PartialLastBatchAsHfTrainer) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("partial");
  std::string pairs;
  for (int i = 0; i < 9; ++i)
    pairs += json({{"prompt", "Once upon a time, Tom went to the park."},
                   {"chosen", " Tom played with a ball."},
                   {"rejected", " Ball ball the the."}})
                 .dump() +
             "\n";
  const auto file = (dir / "pairs.jsonl").string();
  write_text(file, pairs);
  const auto r = run_train("--data " + file + " --eval_data " + file +
                           " --num_train_epochs 2 --per_device_train_batch_size 2 "
                           "--gradient_accumulation_steps 2 --learning_rate 1e-30 "
                           "--logging_steps 1 --no-plot --no-save --output_dir " +
                           (dir / "out").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("training: sigmoid, 6 steps of 2 x 2 pairs (2.00 epochs)"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(json::parse(read_text(dir / "out" / "summary.json"))["steps"], 6);
  std::vector<json> train;
  for (const auto& rec : records_of(dir / "out"))
    if (rec.contains("loss")) train.push_back(rec);
  ASSERT_EQ(train.size(), 6u);
  // HF's epoch: batches done / batches per epoch. num_tokens counts the scored tokens seen, the
  // same t per pair: 4, 4 and 1 pairs per step, so the last step of an epoch reads only the
  // pair left.
  const double epochs[] = {0.4, 0.8, 1.0, 1.4, 1.8, 2.0};
  const int64_t pairs_seen[] = {4, 8, 9, 13, 17, 18};
  const double t = train[0]["num_tokens"].get<double>() / 4;
  ASSERT_GT(t, 0);
  const double grad_norm = train[0]["grad_norm"].get<double>();
  ASSERT_GT(grad_norm, 0);
  for (size_t i = 0; i < train.size(); ++i) {
    SCOPED_TRACE(train[i].dump());
    EXPECT_EQ(train[i]["step"].get<int64_t>(), static_cast<int64_t>(i) + 1);
    EXPECT_NEAR(train[i]["epoch"].get<double>(), epochs[i], 1e-12);
    EXPECT_EQ(train[i]["num_tokens"].get<double>(), t * static_cast<double>(pairs_seen[i]));
    EXPECT_NEAR(train[i]["loss"].get<double>(), std::log(2.0), 1e-6);  // rewards 0
    EXPECT_NEAR(train[i]["grad_norm"].get<double>(), grad_norm, 1e-5 * grad_norm);
    // HF's cosine over 6 steps after ceil(0.1 * 6) = 1 warmup step; step s reads s - 1.
    const double s = static_cast<double>(i);
    const double want = s < 1 ? 0.0 : 0.5 * (1 + std::cos(M_PI * (s - 1) / 5));
    EXPECT_NEAR(train[i]["learning_rate"].get<double>(), 1e-30 * want, 1e-42);
  }
}

// Gradient accumulation changes neither the loss nor the gradient: 2 pairs in 1 batch, and
// the same 2 pairs in 2 batches of 1 accumulated, give the same logged loss and gradient norm
// (the learning rate 1e-30 keeps the weights). TRL's SFT divides the step's NLL sum by its
// scored tokens (num_items_in_batch, loss_is_scaled_for_ga), not each batch's by its own
// tokens: the two completions here differ in length and in mean NLL, so a mean of the batches'
// token means differs. DPO's loss is the pairs' mean either way.
TEST(Train, AccumulationMatchesOneBatchAsTrl) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("accum");
  const std::string pairs =
      json({{"prompt", "Once upon a time,"},
            {"chosen", " Tom played."},
            {"rejected", " Ball ball."}})
          .dump() +
      "\n" +
      json({{"prompt", "Once upon a time,"},
            {"chosen", " Lily went to the park with her mom and they saw a big red ball."},
            {"rejected", " The the the."}})
          .dump() +
      "\n";
  const auto file = (dir / "pairs.jsonl").string();
  write_text(file, pairs);
  for (const std::string loss : {"sft", "sigmoid"}) {
    SCOPED_TRACE(loss);
    const auto record = [&](const std::string& batches) {
      const auto out = dir / "out";
      const auto r = run_train("--loss " + loss + " --data " + file + " --eval_data " + file +
                               " --learning_rate 1e-30 --logging_steps 1 " + batches +
                               " --no-plot --no-save --output_dir " + out.string());
      EXPECT_EQ(r.status, 0) << r.output;
      for (const auto& rec : records_of(out))
        if (rec.contains("loss")) return rec;
      return json::object();
    };
    const auto one = record("--per_device_train_batch_size 2");
    const auto two = record("--per_device_train_batch_size 1 --gradient_accumulation_steps 2");
    ASSERT_TRUE(one.contains("loss") && two.contains("loss")) << one << "\n" << two;
    EXPECT_EQ(one["step"], 1);
    EXPECT_EQ(two["step"], 1);
    const double loss_one = one["loss"].get<double>(), norm_one = one["grad_norm"].get<double>();
    EXPECT_NEAR(two["loss"].get<double>(), loss_one, 1e-6 * std::abs(loss_one));
    EXPECT_NEAR(two["grad_norm"].get<double>(), norm_one, 1e-5 * norm_one);
  }
}

// A run that does not write its model or plot removes the ones an earlier run (its
// summary.json) left in the output folder, saying so, so that the folder never shows them as
// this run's.
TEST(Train, StaleModelAndPlotAreRemoved) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("stale");
  const auto out = dir / "out";
  fs::create_directories(out);
  const auto leave = [&](const std::vector<std::string>& names) {
    for (const auto& n : names) write_text(out / n, "an earlier run's");
  };
  const std::string common =
      " --train_limit 2 --eval_limit 2 --max_length 64 --output_dir " + out.string();
  leave({"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "curves.png",
         "summary.json", "metrics.jsonl"});
  // A run refused on its inputs (here a malformed data file, found after the model is loaded)
  // removes nothing.
  write_text(dir / "bad.jsonl", "{\"prompt\": \"a\", \"chosen\": 1}\n");
  auto r = run_train("--max_steps 1 --no-save --no-plot --data " + (dir / "bad.jsonl").string() +
                     common);
  ASSERT_NE(r.status, 0) << r.output;
  for (const char* f : {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
                        "curves.png", "metrics.jsonl", "summary.json"})
    EXPECT_EQ(read_text(out / f), "an earlier run's") << f;
  r = run_train("--max_steps 1 --no-save --no-plot" + common);
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* f :
       {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "curves.png"})
    EXPECT_FALSE(fs::exists(out / f)) << f;
  EXPECT_NE(r.output.find("output: removed model.safetensors, config.json, tokenizer.json, "
                          "chat_template.jinja of an earlier run from " +
                          out.string() + " (--no-save)"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("output: removed curves.png of an earlier run from " + out.string() +
                          " (--no-plot)"),
            std::string::npos)
      << r.output;
  // Saving: the checkpoint has no chat template, so an earlier one would stay beside the new
  // model; a run without steps draws no plot.
  leave({"chat_template.jinja", "curves.png"});
  r = run_train("--max_steps 0" + common);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(read_text(out / "model.safetensors"), "an earlier run's");
  EXPECT_FALSE(fs::exists(out / "chat_template.jinja"));
  EXPECT_FALSE(fs::exists(out / "curves.png"));
  EXPECT_NE(r.output.find("removed chat_template.jinja of an earlier run"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("removed curves.png of an earlier run from " + out.string() +
                          " (no training steps to plot)"),
            std::string::npos)
      << r.output;
}

// An --output_dir in which no run of prefopt-train finished (no summary.json) may be another
// model's folder given by mistake: --no-save and --no-plot leave its files alone, with a note.
TEST(Train, ForeignOutputFolderKeepsItsFiles) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("foreign");
  const auto out = dir / "model";
  fs::create_directories(out);
  const std::vector<std::string> files = {"model.safetensors", "config.json", "tokenizer.json",
                                          "tokenizer_config.json", "curves.png"};
  for (const auto& n : files) write_text(out / n, "the user's");
  const auto r = run_train(
      "--max_steps 1 --no-save --no-plot --train_limit 2 --eval_limit 2 "
      "--max_length 64 --output_dir " +
      out.string());
  ASSERT_EQ(r.status, 0) << r.output;
  for (const auto& n : files) EXPECT_EQ(read_text(out / n), "the user's") << n;
  EXPECT_EQ(r.output.find("output: removed"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("output: kept model.safetensors, config.json, tokenizer.json, "
                          "tokenizer_config.json in " +
                          out.string() + ", which has no summary.json of an earlier run"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("output: kept curves.png in " + out.string()), std::string::npos)
      << r.output;
}

// The data line and summary.json count the training completions that max_length cut: with
// keep_start at the full length, with classic truncation at max_length - max_prompt_length,
// shorter than max_length when the prompt is short. Each chosen completion here is far longer
// than max_length, each rejected one a few tokens: 6 of the 12 are cut either way.
TEST(Train, CutCompletionsCounted) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("cut");
  std::string longer;
  for (int i = 0; i < 40; ++i) longer += " Tom ran and ran.";
  std::string pairs;
  for (int i = 0; i < 6; ++i)
    pairs +=
        json({{"prompt", "Once upon a time,"}, {"chosen", longer}, {"rejected", " Ran."}}).dump() +
        "\n";
  const auto file = (dir / "pairs.jsonl").string();
  write_text(file, pairs);
  for (const std::string truncation :
       {"--max_length 32", "--max_length 32 --truncation classic --max_prompt_length 16"}) {
    SCOPED_TRACE(truncation);
    const auto r =
        run_train("--data " + file + " --eval_data " + file + " " + truncation +
                  " --max_steps 0 --no-plot --no-save --output_dir " + (dir / "out").string());
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("; 6 of 12 training completions cut at max_length"), std::string::npos)
        << r.output;
    EXPECT_EQ(json::parse(read_text(dir / "out" / "summary.json"))["cut_completions"], 6);
  }
}

// The saved checkpoint keeps the chat template of the one it started from: transformers 5 keeps
// it in chat_template.jinja, and without it the trained model would load without one.
TEST(Train, CheckpointKeepsTheChatTemplate) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("ckpt-chat");
  const auto model = dir / "model";
  fs::create_directories(model);
  for (const char* f :
       {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(model_dir() / f, model / f);
  const std::string jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  write_text(model / "chat_template.jinja", jinja);
  const auto r = run_train("--model " + model.string() +
                           " --max_steps 0 --train_limit 2 --eval_limit 2 --no-plot --output_dir " +
                           (dir / "out").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_text(dir / "out" / "chat_template.jinja"), jinja);
}

TEST(Train, CommandLineErrors) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("cli");
  write_text(dir / "bad.jsonl", R"({"prompt": "a", "chosen": "b", "rejected": "c"})"
                                "\n"
                                R"({"prompt": "a", "chosen": "b"})"
                                "\n");
  std::string good;
  for (int i = 0; i < 4; ++i)
    good += R"({"prompt": "Once upon a time,", "chosen": " Tom ran.", "rejected": " Ran ran."})"
            "\n";
  write_text(dir / "good.jsonl", good);
  // Keeps a case that is wrongly accepted short.
  const std::string quick = " --max_steps 1 --train_limit 2 --eval_limit 2";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--loss nope", "unknown loss \"nope\""},
      {"--loss sigmoid,nope", "unknown loss \"nope\""},
      {"--bogus 1", "--bogus"},  // CLI11: "... not expected: 1 --bogus"
      {"--data /nonexistent/pairs.jsonl", "--data /nonexistent/pairs.jsonl: no such file"},
      {"--model /nonexistent", "--model /nonexistent: no such folder"},
      {"--data " + (dir / "bad.jsonl").string(), "row 2: missing field \"rejected\""},
      {"--truncation classic --max_length 64 --max_prompt_length 64", "must be below --max_length"},
      {"--max_prompt_length 32", "give --truncation classic with it"},
      {"--max_length 8 --train_limit 4", "no training rows left: all "},
      {"--truncation keep_end", "--truncation"},
      // Not blamed on the training rows that keep_start drops.
      {"--eval_start 5000", "no held-out rows: --eval_start 5000 is past the 2312 rows"},
      {"--lr_scheduler_type nope", "--lr_scheduler_type"},
      {"--config " + (dir / "missing.toml").string(), "missing.toml"},
      {"--loss hinge --label_smoothing 0.2 --max_steps 1 --train_limit 2 --eval_limit 2",
       "is not used by any of the loss types"},  // the library's own check, no backtrace
      {"--loss tpo --one_pass", "--one_pass: --loss tpo has no one-pass form"},
      {"--loss sigmoid,aot --one_pass", "aot and aot_unpaired sort the batch"},
      // An option of another loss family would change nothing (TRL's configs refuse it too).
      {"--loss orpo --simpo_gamma 7", "--simpo_gamma is not an option of --loss orpo"},
      {"--loss kto --rpo_alpha 1", "--rpo_alpha is not an option of --loss kto"},
      {"--loss sft --beta 0.2", "--beta is not an option of --loss sft"},
      {"--eval_start 10 --eval_data " + (dir / "bad.jsonl").string(), "give one of them"},
      // Options that only some loss types of the family read (TRL: "used only when ...").
      {"--loss sigmoid --discopop_tau 0.1" + quick,
       "--discopop_tau is read only by the discopop loss type"},
      {"--loss sigmoid --f_alpha_divergence_coef 0.3" + quick,
       "--f_alpha_divergence_coef is read only by --f_divergence_type alpha_divergence"},
      {"--loss cpo --simpo_gamma 1" + quick,
       "--simpo_gamma is read only by --cpo_loss_type simpo and alphapo"},
      {"--loss cpo --cpo_loss_type alphapo --cpo_alpha 1" + quick, "--cpo_alpha is read only by"},
      {"--loss tpo --tpo_l_gamma 1" + quick, "--tpo_l_gamma is read only by --tpo_loss_type tpo-l"},
      {"--weight_decay -0.1" + quick, "--weight_decay"},
      {"--cdpo" + quick, "--cdpo smooths sigmoid with --label_smoothing, which is 0"},
      // Only {chosen, rejected} rows have an implicit prompt: the message names the option,
      // the rows that need it and each file's format.
      {"--implicit_prompt common_prefix --eval_start 2 --data " + (dir / "good.jsonl").string() +
           quick,
       "--implicit_prompt common_prefix splits the prompt off implicit-prompt rows ({chosen, "
       "rejected} without a \"prompt\" field, format implicit-prompt, as HH-RLHF's), but --data " +
           (dir / "good.jsonl").string() + " is format preference: it would change nothing"},
      {"--implicit_prompt assistant --data " + (dir / "good.jsonl").string() + " --eval_data " +
           (dir / "good.jsonl").string() + quick,
       "is format preference and --eval_data " + (dir / "good.jsonl").string() +
           " is format preference: it would change nothing"},
  };
  for (const auto& [args, message] : cases) {
    SCOPED_TRACE(args);
    const auto r = run_train(args + " --no-plot --no-save --output_dir " + (dir / "out").string());
    EXPECT_EQ(r.status, 2);  // also for the errors CLI11 finds
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("Exception raised from"), std::string::npos) << r.output;
  }
}

// Message lists with a chat model: TRL applies the chat template, which this trainer cannot;
// refused unless --plain_chat_template. Paired and unpaired files do not mix.
TEST(Train, DataItCannotRenderAsTrlIsRefused) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("cli-chat");
  const auto model = dir / "model";
  fs::create_directories(model);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    fs::copy_file(model_dir() / f, model / f);
  auto config = json::parse(read_text(model_dir() / "tokenizer_config.json"));
  config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  write_text(model / "tokenizer_config.json", config.dump());
  std::string chat, unpaired;
  for (int i = 0; i < 12; ++i) {
    chat += json({{"prompt", {{{"role", "user"}, {"content", "Tell a story."}}}},
                  {"chosen", {{{"role", "assistant"}, {"content", "Tom ran."}}}},
                  {"rejected", {{{"role", "assistant"}, {"content", "Ran ran."}}}}})
                .dump() +
            "\n";
    unpaired +=
        json({{"prompt", "Once"}, {"completion", " Tom ran."}, {"label", i % 2 == 0}}).dump() +
        "\n";
  }
  write_text(dir / "chat.jsonl", chat);
  write_text(dir / "kto.jsonl", unpaired);
  const auto common = " --no-plot --no-save --max_steps 1 --output_dir " + (dir / "out").string();
  auto r = run_train("--model " + model.string() + " --data " + (dir / "chat.jsonl").string() +
                     " --eval_start 8" + common);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("the checkpoint has a chat template"), std::string::npos) << r.output;
  r = run_train("--model " + model.string() + " --data " + (dir / "chat.jsonl").string() +
                " --eval_start 8 --plain_chat_template" + common);
  EXPECT_EQ(r.status, 0) << r.output;
  r = run_train("--data " + (dir / "kto.jsonl").string() + " --loss kto --eval_data " +
                (dir / "chat.jsonl").string() + common);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("both must be pairs, or both unpaired"), std::string::npos) << r.output;
}

TEST(Train, ConfigFileAndHelp) {
  SKIP_WITHOUT_SHARED_DATA();
  const auto dir = scratch("config");
  write_text(dir / "run.toml",
             "# TRL's names\nloss = \"ipo\"\nmax_steps = 2\ntrain_limit = 8\neval_limit = 4\n"
             "max_length = 64\ntruncation = \"classic\"\nmax_prompt_length = 32\nbeta = 0.5\n"
             "no_plot = true\nno_ascii = true\n");
  auto r = run_train("--config " + (dir / "run.toml").string() + " --output_dir " +
                     (dir / "out").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("training: ipo, 2 steps"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("beta 0.5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("typographic punctuation kept as it is"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out" / "curves.png"));
  // The command line overrides the file.
  r = run_train("--config " + (dir / "run.toml").string() +
                " --max_steps 1 --no-save --output_dir " + (dir / "out").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("training: ipo, 1 steps"), std::string::npos) << r.output;
  // TinyStories' tokenizer has no byte fallback: mapped unless --no-ascii (the file's here).
  r = run_train("--config " + (dir / "run.toml").string() +
                " --max_steps 1 --ascii --no-save --output_dir " + (dir / "out").string());
  EXPECT_NE(r.status, 0);  // --ascii and the file's no_ascii exclude each other
  EXPECT_NE(r.output.find("excludes"), std::string::npos) << r.output;
  r = run_train(
      "--max_steps 1 --train_limit 8 --eval_limit 4 --max_length 64 --no-save "
      "--no-plot --output_dir " +
      (dir / "out").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("typographic punctuation mapped to ASCII"), std::string::npos)
      << r.output;
  write_text(dir / "bad.toml", "not_an_option = 3\n");
  r = run_train("--config " + (dir / "bad.toml").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("not_an_option"), std::string::npos) << r.output;

  r = run_train("--help");
  EXPECT_EQ(r.status, 0);
  for (const char* o : {"--model",
                        "--data",
                        "--eval_start",
                        "--eval_data",
                        "--output_dir",
                        "--loss",
                        "--num_train_epochs",
                        "--max_steps",
                        "--per_device_train_batch_size",
                        "--gradient_accumulation_steps",
                        "--learning_rate",
                        "--lr_scheduler_type",
                        "--warmup_ratio",
                        "--max_grad_norm",
                        "--max_length",
                        "--truncation",
                        "--max_prompt_length",
                        "--beta",
                        "--label_smoothing",
                        "--rpo_alpha",
                        "--loss_weights",
                        "--simpo_gamma",
                        "--cpo_alpha",
                        "--tpo_alpha",
                        "--desirable_weight",
                        "--undesirable_weight",
                        "--device",
                        "--config",
                        "--max-length"})
    EXPECT_NE(r.output.find(o), std::string::npos) << o;
}
