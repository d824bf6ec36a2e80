// SPDX-License-Identifier: Apache-2.0
// Opt-in fmt formatters for prefopt's metrics: a one-line log and an aligned table.
#pragma once

#include <fmt/format.h>
#include <prefopt/metrics.h>

#include <algorithm>

namespace fmt {

/// Formats `prefopt::Metrics`.
///
/// - `{}`: one line, `name=value` pairs separated by spaces, values as `{:.6g}`
///   (`loss=0.693147 rewards/chosen=0.0125 ...`);
/// - `{:t}`: one metric per line, names left-aligned to the longest, values right-aligned.
/// A precision changes the significant digits: `{:.4}`, `{:t.4}`.
///
/// Example:
/// ```
/// #include <prefopt/fmt.h>
/// fmt::print("step {} {}\n", step, metrics);
/// fmt::print("{:t}\n", metrics);
/// ```
template <>
struct formatter<prefopt::Metrics> {
  bool table = false;  ///< `{:t}`: one metric per line
  int precision = 6;   ///< significant digits, `{:.N}` (1 to 99)

  /// Parses `{}`, `{:t}`, `{:.N}` or `{:t.N}`; anything else is a `fmt::format_error`.
  constexpr auto parse(format_parse_context& ctx) -> decltype(ctx.begin()) {
    auto it = ctx.begin();
    const auto end = ctx.end();
    if (it != end && *it == 't') {
      table = true;
      ++it;
    } else if (it != end && *it == 'l') {
      ++it;
    }
    if (it != end && *it == '.') {
      ++it;
      precision = 0;
      // Bounded before it can overflow: a double has 17 significant digits anyway.
      while (it != end && *it >= '0' && *it <= '9') {
        precision = precision * 10 + (*it++ - '0');
        if (precision > 99) throw fmt::format_error("prefopt::Metrics: precision above 99");
      }
      if (precision < 1) throw fmt::format_error("prefopt::Metrics: precision below 1");
    }
    if (it != end && *it != '}')
      throw fmt::format_error("prefopt::Metrics: expected {}, {:t} or {:.N}");
    return it;
  }

  /// Writes `metrics` as the format string asked.
  template <typename FormatContext>
  auto format(const prefopt::Metrics& metrics, FormatContext& ctx) const -> decltype(ctx.out()) {
    auto out = ctx.out();
    if (!table) {
      bool first = true;
      for (const auto& [name, value] : metrics) {
        out = fmt::format_to(out, "{}{}={:.{}g}", first ? "" : " ", name, value, precision);
        first = false;
      }
      return out;
    }
    size_t width = 0;
    for (const auto& item : metrics) width = std::max(width, item.first.size());
    bool first = true;
    for (const auto& [name, value] : metrics) {
      out = fmt::format_to(out, "{}{:<{}}  {:>{}.{}g}", first ? "" : "\n", name, width, value,
                           precision + 7, precision);
      first = false;
    }
    return out;
  }
};

}  // namespace fmt
