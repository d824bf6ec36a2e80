// SPDX-License-Identifier: Apache-2.0
// The examples' llama2.c model and tokenizer reproduce upstream's published outputs for
// stories260K (shared/data/README.md §3). Skipped only when the shared data folder is absent.
#include <gtest/gtest.h>
#include <unistd.h>

#include <prefopt/logprobs.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/llama2c.h"
#include "support.h"

namespace {

class Stories260K : public ::testing::Test {
 protected:
  void SetUp() override {
    // Skipped where the data folder is absent; a folder without stories260K fails.
    if (!std::filesystem::is_directory(prefopt_test::data_dir()))
      GTEST_SKIP() << "shared data not found at " << prefopt_test::data_dir();
    dir_ = prefopt_test::data_dir() / "stories260K";
    ASSERT_TRUE(std::filesystem::exists(dir_ / "stories260K.bin"))
        << (dir_ / "stories260K.bin") << " is missing from the shared data folder";
  }
  std::filesystem::path dir_;
};

TEST_F(Stories260K, TokenizerMatchesLlama2c) {
  const llama2c::Tokenizer tok((dir_ / "tok512.bin").string());
  EXPECT_EQ(tok.vocab_size(), 512);
  const std::vector<int64_t> expect{403, 407, 261, 378, 432, 383, 286, 261,
                                    376, 298, 315, 421, 395, 317, 426};
  EXPECT_EQ(tok.encode("Once upon a time, there was a little girl named Lily."), expect);
  EXPECT_EQ(tok.decode(1, 403) + tok.decode(403, 407), "Once upon");
}

TEST_F(Stories260K, GreedyDecodingMatchesUpstream) {
  const auto model = llama2c::Model::load((dir_ / "stories260K.bin").string());
  std::vector<int64_t> ids{llama2c::Tokenizer::kBos};
  for (int step = 0; step < 16; ++step) {
    const auto logits = model.forward(at::tensor(ids, at::kLong).unsqueeze(0));
    ids.push_back(logits[0][-1].argmax().item<int64_t>());
  }
  const std::vector<int64_t> expect{1,   403, 407, 261, 378, 432, 383, 286, 261,
                                    376, 298, 315, 421, 395, 317, 426, 338};
  EXPECT_EQ(ids, expect);
  // Token accuracy of the model on its own greedy text is 1 by construction: gathered
  // log-probs agree with argmax.
  const auto tokens = at::tensor(ids, at::kLong).unsqueeze(0);
  const auto lp = prefopt::functional::gather_logprobs(
      model.forward(tokens), tokens, prefopt::GatherLogprobsOptions().with_token_accuracy(true));
  EXPECT_EQ(lp.correct[0].item<int64_t>(), 16);
  EXPECT_EQ(lp.count[0].item<int64_t>(), 16);
  EXPECT_LT(lp.mean[0].item<float>(), 0.0f);
}

// A checkpoint's header is checked before anything is sized from it. A file shorter than the
// header left part of it uninitialised (sizes from stack garbage), and a zero-filled header
// divided by zero heads: SIGFPE, not an error. Needs no shared data.
TEST(Llama2cFiles, CorruptFilesAreErrors) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("prefopt_llama2c_header_" + std::to_string(::getpid()) + ".bin");
  const auto write = [&](const std::vector<int32_t>& header) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(header.data()),
              static_cast<std::streamsize>(header.size() * sizeof(int32_t)));
  };
  const auto message = [&]() -> std::string {
    try {
      llama2c::Model::load(path.string());
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string file = path.string();
  write({});
  EXPECT_EQ(message(), "llama2c: " + file + " is truncated (no 28-byte header)");
  write({64, 172, 5});
  EXPECT_EQ(message(), "llama2c: " + file + " is truncated (no 28-byte header)");
  write({0, 0, 0, 0, 0, 0, 0});
  EXPECT_EQ(message(), "llama2c: " + file +
                           " has an invalid header (dim 0, hidden_dim 0, n_layers 0, n_heads 0, "
                           "n_kv_heads 0, vocab_size 0, seq_len 0)");
  // stories260K's header but 7 heads: 64 is not a multiple of 7.
  write({64, 172, 5, 7, 4, 512, 512});
  EXPECT_EQ(message(), "llama2c: " + file +
                           " has an invalid header (dim 64, hidden_dim 172, n_layers 5, n_heads "
                           "7, n_kv_heads 4, vocab_size 512, seq_len 512)");
  // A valid header and no weights: truncated, as before.
  write({64, 172, 5, 8, 4, 512, 512});
  EXPECT_EQ(message(), "llama2c: " + file + " is truncated");
  // The tokenizer: a piece of negative length (std::length_error or bad_alloc before).
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const int32_t max_len = 8, len = -3;
    const float score = 0.0f;
    out.write(reinterpret_cast<const char*>(&max_len), 4);
    out.write(reinterpret_cast<const char*>(&score), 4);
    out.write(reinterpret_cast<const char*>(&len), 4);
  }
  std::string tokenizer_error = "no error";
  try {
    llama2c::Tokenizer tok(file);
  } catch (const std::runtime_error& e) {
    tokenizer_error = e.what();
  }
  EXPECT_EQ(tokenizer_error, "llama2c: " + file + " is corrupt (a piece of length -3)");
  std::filesystem::remove(path);
}

}  // namespace
