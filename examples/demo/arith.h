// SPDX-License-Identifier: Apache-2.0
// The demo's task (examples/common/arith.h) as libtorch batches.
#pragma once
#include <ATen/ATen.h>

#include "../common/arith.h"

namespace arith {

/// [B, seq_len] ids and labels (-100 on the prompt, so only the answer is scored).
inline void batch(const Task& task, const std::vector<Problem>& problems,
                  const std::vector<int64_t>& answers, at::Tensor& ids, at::Tensor& labels) {
  const auto B = static_cast<int64_t>(problems.size()), T = task.seq_len();
  std::vector<int64_t> flat;
  flat.reserve(static_cast<size_t>(B * T));
  for (size_t i = 0; i < problems.size(); ++i) {
    const auto t = task.tokens(problems[i], answers[i]);
    flat.insert(flat.end(), t.begin(), t.end());
  }
  ids = at::tensor(flat, at::kLong).view({B, T});
  labels = ids.clone();
  labels.narrow(1, 0, task.prompt_len()).fill_(-100);
}

}  // namespace arith
