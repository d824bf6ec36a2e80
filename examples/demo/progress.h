// SPDX-License-Identifier: Apache-2.0
// A progress bar with step, rate and ETA on a terminal; periodic plain lines otherwise (a log
// file or CI), so logs stay readable.
#pragma once
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include <unistd.h>

namespace demo {

class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  // `lines`: how many plain lines to print over the run when stdout is not a terminal.
  Progress(std::string label, int64_t total, int lines = 10)
      : label_(std::move(label)),
        total_(std::max<int64_t>(total, 1)),
        every_(std::max<int64_t>(total_ / std::max(lines, 1), 1)),
        tty_(isatty(fileno(stdout)) != 0),
        start_(Clock::now()) {}

  // Text shown after the ETA until replaced (e.g. the last logged loss).
  void status(std::string text) { status_ = std::move(text); }

  // Call after each step. A terminal is redrawn at most 10 times a second.
  void update(int64_t step) {
    const double elapsed = seconds();
    if (tty_ && step < total_ && elapsed - drawn_ < 0.1) return;
    drawn_ = elapsed;
    const double rate = step / std::max(elapsed, 1e-9);
    const double eta = (total_ - step) / std::max(rate, 1e-9);
    if (tty_) {
      constexpr int kWidth = 28;
      const int filled = static_cast<int>(kWidth * step / total_);
      fmt::print("\r{} [{:=<{}}{:<{}}] {}/{} {:.1f} it/s ETA {} {}\033[K", label_, "", filled,
                 step < total_ ? ">" : "", kWidth - filled, step, total_, rate, clock(eta),
                 status_);
      if (step == total_) fmt::print("\n");
      std::fflush(stdout);
      active_ = step < total_;
    } else if (step % every_ == 0 || step == total_) {
      fmt::print("{} {}/{} {:.1f} it/s elapsed {} ETA {} {}\n", label_, step, total_, rate,
                 clock(elapsed), clock(eta), status_);
      std::fflush(stdout);
    }
  }

  // Prints a full line without tearing the bar: the bar is redrawn on the next update.
  void print_line(const std::string& line) {
    if (tty_ && active_) fmt::print("\r\033[K");
    fmt::print("{}\n", line);
    std::fflush(stdout);
  }

  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  static std::string clock(double s) {
    const auto t = static_cast<int64_t>(s + 0.5);
    return fmt::format("{}:{:02}", t / 60, t % 60);
  }

 private:
  std::string label_;
  int64_t total_, every_;
  bool tty_;
  bool active_ = false;
  double drawn_ = -1.0;
  std::string status_;
  Clock::time_point start_;
};

}  // namespace demo
