// SPDX-License-Identifier: Apache-2.0
// The examples' llama2.c model and tokenizer reproduce upstream's published outputs for
// stories260K (shared/data/README.md §3). Skipped only when the shared data folder is absent.
#include <gtest/gtest.h>

#include <prefopt/logprobs.h>

#include <filesystem>
#include <vector>

#include "common/llama2c.h"
#include "support.h"

namespace {

class Stories260K : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = prefopt_test::data_dir() / "stories260K";
    if (!std::filesystem::exists(dir_ / "stories260K.bin"))
      GTEST_SKIP() << "shared data not found at " << dir_;
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

}  // namespace
