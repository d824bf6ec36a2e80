// SPDX-License-Identifier: Apache-2.0
// The task of the Eigen example, without libtorch: fixed-width addition generated from a seed
// and scored by a program, as examples/demo/arith.h generates it. "047+038=" is the prompt and
// "085" the answer (n + 1 digits, zero-padded, most significant first). The typical wrong answer
// drops every carry ("075").
#pragma once

#include <cstdint>
#include <random>
#include <unordered_set>
#include <vector>

namespace arith {

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
  int answer_len() const { return digits_ + 1; }
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

 private:
  int digits_;
  int64_t limit_ = 1;
};

/// Draws problems from a seeded generator, never one of the held-out set.
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
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  std::mt19937_64& rng() { return rng_; }

 private:
  const Task& task_;
  std::mt19937_64 rng_;
  const std::unordered_set<int64_t>& held_out_;
};

/// The held-out prompts: `n` distinct problems drawn from their own seed; `keys` collects them.
inline std::vector<Problem> held_out_problems(const Task& task, uint64_t seed, int n,
                                              std::unordered_set<int64_t>& keys) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  std::uniform_int_distribution<int64_t> d(0, task.limit() - 1);
  std::vector<Problem> out;
  while (static_cast<int>(out.size()) < n) {
    Problem p{d(rng), d(rng)};
    if (keys.insert(p.a * task.limit() + p.b).second) out.push_back(p);
  }
  return out;
}

/// The rejected answer of a preference pair: the typical mistake. With a carry, the carry
/// dropped; without one, a slip of one digit by one.
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
