// SPDX-License-Identifier: Apache-2.0
// The examples' task: fixed-width addition, generated deterministically from a seed and scored
// by a program. "047+038=" is the prompt, "085" the answer (n + 1 digits, zero-padded, most
// significant first). The typical wrong answer is the one with every carry dropped ("075").
// Standard library only: prefopt-demo adds its libtorch batches in examples/demo/arith.h, and
// the Eigen example (examples/eigen_dpo/) uses this as it is.
#pragma once

#include <cstdint>
#include <random>
#include <unordered_set>
#include <vector>

namespace arith {

/// Tokens: the digits are their own ids, then '+' and '='.
constexpr int64_t kPlus = 10, kEquals = 11, kVocab = 12;

/// One problem a + b.
struct Problem {
  int64_t a = 0, b = 0;
};

/// Addition of `digits`-digit numbers.
class Task {
 public:
  explicit Task(int digits) : digits_(digits) {
    for (int i = 0; i < digits; ++i) limit_ *= 10;
  }

  int digits() const { return digits_; }
  int64_t prompt_len() const { return 2 * digits_ + 2; }
  int answer_len() const { return digits_ + 1; }
  int64_t seq_len() const { return prompt_len() + answer_len(); }
  int64_t limit() const { return limit_; }

  static int64_t correct(const Problem& p) { return p.a + p.b; }
  /// Digit-wise sum with every carry dropped: 47 + 38 -> 75, 95 + 17 -> 2 ("002").
  int64_t dropped_carry(const Problem& p) const {
    int64_t out = 0, scale = 1, a = p.a, b = p.b;
    for (int i = 0; i < digits_; ++i, a /= 10, b /= 10, scale *= 10)
      out += (a % 10 + b % 10) % 10 * scale;
    return out;
  }
  bool has_carry(const Problem& p) const { return dropped_carry(p) != correct(p); }

  /// The prompt's tokens followed by the answer's digits.
  std::vector<int64_t> tokens(const Problem& p, int64_t answer) const {
    std::vector<int64_t> out;
    out.reserve(static_cast<size_t>(seq_len()));
    append_digits(out, p.a, digits_);
    out.push_back(kPlus);
    append_digits(out, p.b, digits_);
    out.push_back(kEquals);
    append_digits(out, answer, digits_ + 1);
    return out;
  }

  /// The `width` digits of `v`, most significant first.
  static std::vector<int> digits_of(int64_t v, int width) {
    std::vector<int> out(static_cast<size_t>(width));
    for (int i = width - 1; i >= 0; --i, v /= 10)
      out[static_cast<size_t>(i)] = static_cast<int>(v % 10);
    return out;
  }
  /// The value of answer digits, most significant first.
  static int64_t value(const std::vector<int>& digits) {
    int64_t v = 0;
    for (int d : digits) v = v * 10 + d;
    return v;
  }
  /// The value of `n` generated answer tokens; a token that is not a digit counts as 0.
  static int64_t value(const int64_t* tokens, int64_t n) {
    int64_t v = 0;
    for (int64_t i = 0; i < n; ++i) v = v * 10 + (tokens[i] < 10 ? tokens[i] : 0);
    return v;
  }

 private:
  static void append_digits(std::vector<int64_t>& out, int64_t v, int width) {
    for (int d : digits_of(v, width)) out.push_back(d);
  }

  int digits_;
  int64_t limit_ = 1;
};

/// Draws problems from a seeded generator, never one of the held-out set (the evaluation
/// prompts are kept out of every training stage).
class Sampler {
 public:
  Sampler(const Task& task, uint64_t seed, const std::unordered_set<int64_t>& held_out)
      : task_(task), rng_(seed), held_out_(held_out) {}

  Problem draw() {
    std::uniform_int_distribution<int64_t> d(0, task_.limit() - 1);
    for (;;) {
      Problem p{d(rng_), d(rng_)};
      if (!held_out_.count(p.a * task_.limit() + p.b)) return p;
    }
  }
  std::vector<Problem> draw(int64_t n) {
    std::vector<Problem> out(static_cast<size_t>(n));
    for (auto& p : out) p = draw();
    return out;
  }
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  std::mt19937_64& rng() { return rng_; }

 private:
  const Task& task_;
  std::mt19937_64 rng_;
  const std::unordered_set<int64_t>& held_out_;
};

/// The held-out prompts: `n` distinct problems drawn from their own seed; `keys` collects them.
inline std::vector<Problem> held_out_problems(const Task& task, uint64_t seed, int64_t n,
                                              std::unordered_set<int64_t>& keys) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  std::uniform_int_distribution<int64_t> d(0, task.limit() - 1);
  std::vector<Problem> out;
  while (static_cast<int64_t>(out.size()) < n) {
    Problem p{d(rng), d(rng)};
    if (keys.insert(p.a * task.limit() + p.b).second) out.push_back(p);
  }
  return out;
}

/// The rejected answer of a preference pair: the typical mistake on this problem. With a
/// carry, the carry dropped; without one, a slip of one digit by one (so every prompt has a
/// pair).
inline int64_t rejected_answer(const Task& task, const Problem& p, std::mt19937_64& rng) {
  if (task.has_carry(p)) return task.dropped_carry(p);
  int64_t scale = 1;
  for (int i = std::uniform_int_distribution<int>(0, task.digits() - 1)(rng); i > 0; --i)
    scale *= 10;
  const int64_t sum = Task::correct(p), digit = sum / scale % 10;
  const bool up = digit == 0 || (digit != 9 && (rng() & 1));
  return sum + (up ? scale : -scale);
}

}  // namespace arith
