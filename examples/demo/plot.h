// SPDX-License-Identifier: Apache-2.0
// Training curves drawn by gnuplot (pngcairo): the data goes in as inline datablocks through a
// pipe, so no temporary files and no plotting code of our own.
#pragma once
#include <prefopt/metrics.h>

#include <fmt/core.h>

#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace demo {

using History = std::vector<std::pair<int64_t, prefopt::Metrics>>;

// One panel: a title and up to two (metric name, legend) series from `block`.
struct Panel {
  std::string title;
  std::string block;  // "train" or "eval"
  std::vector<std::pair<std::string, std::string>> series;
  std::string key = "top left";  // gnuplot's legend position
};

namespace detail {

inline std::string datablock(const std::string& name, const History& rows,
                             const std::vector<std::string>& columns) {
  std::string out = fmt::format("${} << EOD\n", name);
  for (const auto& [step, m] : rows) {
    out += std::to_string(step);
    for (const auto& c : columns) {
      const double* v = m.find(c);
      out += v && std::isfinite(*v) ? fmt::format(" {:.9g}", *v) : std::string(" NaN");
    }
    out += "\n";
  }
  return out + "EOD\n";
}

// `s` inside gnuplot's single quotes, where a quote is written twice: an --out folder such as
// "bob's runs" otherwise ended the string early and gnuplot failed.
inline std::string quoted(const std::string& s) {
  std::string out;
  for (const char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out;
}

}  // namespace detail

// Writes a PNG of `panels` (3 per row) to `path`. Returns false, with the reason in `error`,
// when gnuplot is not installed or fails.
inline bool plot_png(const std::string& path, const std::string& title, const History& train,
                     const History& eval, const std::vector<Panel>& requested, std::string& error) {
  // A series no record has a finite value of (KTO logs no rewards/accuracies) would make
  // gnuplot fail on an empty x range: leave it out, and panels left without series.
  const auto present = [&](const Panel& p, const std::string& name) {
    for (const auto& [step, m] : p.block == "train" ? train : eval) {
      const double* v = m.find(name);
      if (v && std::isfinite(*v)) return true;
    }
    return false;
  };
  std::vector<Panel> panels;
  for (auto p : requested) {
    p.series.erase(std::remove_if(p.series.begin(), p.series.end(),
                                  [&](const auto& s) { return !present(p, s.first); }),
                   p.series.end());
    if (!p.series.empty()) panels.push_back(std::move(p));
  }
  if (panels.empty()) {
    error = "no metric to plot";
    return false;
  }
  std::vector<std::string> train_cols, eval_cols;
  for (const auto& p : panels) {
    auto& cols = p.block == "train" ? train_cols : eval_cols;
    for (const auto& s : p.series) cols.push_back(s.first);
  }
  const auto column = [&](const Panel& p, const std::string& name) {
    const auto& cols = p.block == "train" ? train_cols : eval_cols;
    for (size_t i = 0; i < cols.size(); ++i)
      if (cols[i] == name) return i + 2;  // column 1 is the step
    return size_t{0};
  };

  std::string script = "set datafile missing 'NaN'\n";
  script +=
      detail::datablock("train", train, train_cols) + detail::datablock("eval", eval, eval_cols);
  const int rows = static_cast<int>((panels.size() + 2) / 3);
  script += fmt::format(
      "set terminal pngcairo size 1500,{} font 'sans,10'\nset output '{}'\n"
      "set multiplot layout {},3 title '{}' font 'sans,13'\nset grid\n"
      "set xlabel 'step'\n",
      430 * rows + 40, detail::quoted(path), rows, detail::quoted(title));
  for (const auto& p : panels) {
    script += fmt::format("set title '{}'\nset key {}\nplot ", detail::quoted(p.title), p.key);
    for (size_t i = 0; i < p.series.size(); ++i) {
      script += fmt::format("{}${} using 1:{} with linespoints pt 7 ps 0.4 lw 2 title '{}'",
                            i ? ", " : "", p.block, column(p, p.series[i].first),
                            detail::quoted(p.series[i].second));
    }
    script += "\n";
  }
  script += "unset multiplot\n";

  // Without gnuplot the shell exits at once, and the script written to its closed pipe raised
  // SIGPIPE, whose default action ended the demo (status 141) before its summary. Ignored while
  // gnuplot runs, the write fails instead and pclose gives the shell's status.
  struct sigaction ignore = {}, previous = {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ::sigaction(SIGPIPE, &ignore, &previous);
  FILE* gp = popen("gnuplot 2>&1", "w");
  if (!gp) {
    ::sigaction(SIGPIPE, &previous, nullptr);
    error = "could not start gnuplot";
    return false;
  }
  std::fwrite(script.data(), 1, script.size(), gp);
  const int rc = pclose(gp);
  ::sigaction(SIGPIPE, &previous, nullptr);
  if (rc != 0) {
    // 127: the shell found no gnuplot; anything else is gnuplot's own error, printed above.
    error = WIFEXITED(rc) && WEXITSTATUS(rc) == 127
                ? "gnuplot is not installed (apt-get install gnuplot-nox)"
                : fmt::format("gnuplot failed with status {}", rc);
    return false;
  }
  return true;
}

}  // namespace demo
