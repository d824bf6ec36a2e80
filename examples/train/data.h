// SPDX-License-Identifier: Apache-2.0
// Preference data: reading the formats trainers use, tokenizing as TRL does, and batching in
// the order prefopt's ops expect.
//
// Formats (detected from the content; gzip is read transparently, so `.jsonl.gz` works):
//   - TRL's standard preference format, JSON Lines: {"prompt", "chosen", "rejected"}, each a
//     string or a list of messages [{"role", "content"}] (conversational). An optional
//     "reference" (TPO's gold response) is kept.
//   - TRL's implicit-prompt form {"chosen", "rejected"} with whole dialogues, as HH-RLHF ships
//     them (`ImplicitPrompt`): by default the prompt is the text through the last
//     "\n\nAssistant:" (TRL's HH-RLHF dataset scripts and the shared data README), pairs
//     whose two prompts differ being skipped and counted; rows without that marker, or every
//     row with kCommonPrefix, take TRL 1.16's trainers' `extract_prompt` (the longest common
//     character prefix). With message lists, the prompt is the messages the two sides share.
//     A "reference" (TPO) must start with the same prompt, which is stripped from it.
//   Rows mix no forms: a prompt given as messages needs its completions as messages too.
//   - TRL's unpaired (KTO) format, JSON Lines: {"prompt", "completion", "label": bool}.
//   - Stack Exchange pairs (a JSON array of {"question", "response_j", "response_k"}):
//     prompt "Question: " + question + "\n\nAnswer: ", chosen response_j, rejected response_k.
//
// Conversational rows are rendered with a plain template in HH-RLHF's own style: each message
// is "\n\n" + Role + ": " + content (Human for user, Assistant, System), and the prompt ends
// with the generation prompt "\n\nAssistant:", so a completion is " " + its content.
//
// Tokenization: the prompt and prompt + completion are tokenized whole (BOS first, as the
// tokenizer adds it), the completion is what follows the prompt's tokens (a token that
// straddles the boundary goes to the completion; TRL warns about those, the trainer counts
// them), and EOS ends it unless it already does. Truncation (`Truncation`):
// by default TRL 1.x's: the prompt ends where the sides' tokens first diverge from it (the
// shortest of the sides' prompts, as TRL ≥ 1.14), prompt + completion is cut from the right to
// `max_length`, and an example whose prompt alone fills `max_length` is dropped. Or TRL ≤ 0.11's
// classic truncation (`truncation_mode="keep_end"`), per pair: when prompt + the longer completion
// exceed `max_length`, the prompt keeps its last `max_prompt_length` tokens (BOS kept: it is cut
// from the left); if that is still too long, both completions keep their first `max_length −
// max_prompt_length` tokens. Labels are −100 on the prompt and on padding.
#pragma once

#include <ATen/ATen.h>
#include <zlib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tokenizer.h"

namespace train {

/// One preference pair, as text.
struct PreferenceExample {
  std::string prompt, chosen, rejected;
  std::string gold;  ///< TPO's gold response ("reference"); empty when the data has none
  int64_t row = 0;   ///< 0-based row (line) of the file
};

/// One unpaired (KTO) example, as text.
struct UnpairedExample {
  std::string prompt, completion;
  bool label = true;  ///< desirable
  int64_t row = 0;
};

struct Dataset {
  std::string path;
  std::string format;  ///< "preference", "implicit-prompt", "unpaired" or "stack-exchange"
  std::vector<PreferenceExample> pairs;
  std::vector<UnpairedExample> unpaired;
  std::vector<int64_t> skipped;    ///< implicit-prompt rows whose two prompts differ
  int64_t rows = 0;                ///< rows read
  bool conversational = false;     ///< some rows are message lists (rendered with the template)
  int64_t common_prefix_rows = 0;  ///< implicit-prompt rows split at TRL's common prefix
  /// Columns of the rows that no format here reads ("images", "tools", ...), in order of
  /// first appearance: the trainer reports them rather than dropping them without a word.
  std::vector<std::string> ignored_columns;
  bool paired() const { return format != "unpaired"; }
};

namespace detail {

/// The whole file, gunzipped if it is gzip (zlib reads plain files unchanged).
inline std::string read_maybe_gzip(const std::string& path) {
  if (!std::filesystem::exists(path)) throw std::runtime_error("data: no such file: " + path);
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("data: cannot open " + path);
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  const std::string what = msg ? msg : "";
  gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END))
    throw std::runtime_error("data: " + path + ": corrupt gzip data (" + what + ")");
  return out;
}

inline std::string role_name(const std::string& role) {
  if (role == "user") return "Human";
  if (role == "assistant") return "Assistant";
  if (role == "system") return "System";
  return role.empty() ? role
                      : std::string(1, static_cast<char>(std::toupper(role[0]))) + role.substr(1);
}

}  // namespace detail

/// Where the implicit-prompt form's prompt ends.
enum class ImplicitPrompt {
  /// Through the last "\n\nAssistant:" (TRL's HH-RLHF dataset scripts, which wrote the
  /// trl-lib/hh-rlhf datasets' explicit prompts); rows without the marker take TRL's common
  /// prefix below and are counted (`Dataset::common_prefix_rows`).
  kAssistantTurn,
  /// TRL 1.16's trainers' `extract_prompt` on every row: the longest common character prefix
  /// of chosen and rejected, less a space it ends with (message lists: the common messages).
  kCommonPrefix,
};

namespace detail {

// TRL's `extract_prompt` on two strings: the prompt ends at the first differing character,
// one back when the character before it is a space; when one side is a prefix of the other,
// Python's loop variable stops at the last index, so the prompt is one character short of
// the shorter side (kept as TRL has it). Sides that differ at their first character give an
// empty prompt (TRL would look at chosen[-1], the last character, a quirk not copied).
inline size_t common_prefix_prompt(const std::string& a, const std::string& b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return i > 0 && a[i - 1] == ' ' ? i - 1 : i;
  return n > 0 ? n - 1 : 0;
}

}  // namespace detail

/// Reads a data file in any of the formats above. Throws std::runtime_error naming the file
/// and, for a bad row, the 1-based row ("row 7: missing field \"rejected\"").
inline Dataset load_dataset(const std::string& path,
                            ImplicitPrompt implicit = ImplicitPrompt::kAssistantTurn) {
  using json = nlohmann::json;
  Dataset d;
  d.path = path;
  const std::string text = detail::read_maybe_gzip(path);
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) throw std::runtime_error("data: " + path + " is empty");

  std::vector<json> rows;
  if (text[first] == '[') {  // one JSON array (the Stack Exchange sample)
    json all;
    try {
      all = json::parse(text);
    } catch (const json::exception& e) {
      throw std::runtime_error("data: " + path + ": not valid JSON (" + e.what() + ")");
    }
    for (auto& r : all) rows.push_back(std::move(r));
  } else {  // JSON Lines
    size_t at = 0;
    int64_t line = 0;
    while (at < text.size()) {
      auto end = text.find('\n', at);
      if (end == std::string::npos) end = text.size();
      ++line;
      const auto s = text.substr(at, end - at);
      at = end + 1;
      if (s.find_first_not_of(" \t\r") == std::string::npos) {
        if (at < text.size())
          throw std::runtime_error("data: " + path + ": row " + std::to_string(line) +
                                   ": empty line");
        continue;
      }
      try {
        rows.push_back(json::parse(s));
      } catch (const json::exception& e) {
        throw std::runtime_error("data: " + path + ": row " + std::to_string(line) +
                                 ": not valid JSON (" + e.what() + ")");
      }
    }
  }
  d.rows = static_cast<int64_t>(rows.size());
  if (rows.empty()) throw std::runtime_error("data: " + path + " has no rows");

  const auto& r0 = rows.front();
  if (!r0.is_object()) throw std::runtime_error("data: " + path + ": row 1: not a JSON object");
  if (r0.contains("question") && r0.contains("response_j"))
    d.format = "stack-exchange";
  else if (r0.contains("completion") || r0.contains("label"))
    d.format = "unpaired";
  else if (r0.contains("prompt"))
    d.format = "preference";
  else
    d.format = "implicit-prompt";

  static const std::vector<std::string> kRead = {"prompt",    "chosen",     "rejected",
                                                 "reference", "completion", "label",
                                                 "question",  "response_j", "response_k"};
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    const auto fail = [&](const std::string& what) -> std::runtime_error {
      return std::runtime_error("data: " + path + ": row " + std::to_string(i + 1) + ": " + what);
    };
    if (!r.is_object()) throw fail("not a JSON object");
    for (const auto& [key, value] : r.items())
      if (std::find(kRead.begin(), kRead.end(), key) == kRead.end() &&
          std::find(d.ignored_columns.begin(), d.ignored_columns.end(), key) ==
              d.ignored_columns.end())
        d.ignored_columns.push_back(key);
    const auto field = [&](const char* key) -> const json& {
      if (!r.contains(key))
        throw fail(std::string("missing field \"") + key + "\" (a " + d.format + " row needs it)");
      return r[key];
    };
    const auto string = [&](const char* key) {
      const auto& v = field(key);
      if (!v.is_string()) throw fail(std::string("field \"") + key + "\" is not a string");
      return v.get<std::string>();
    };
    // A string, or a list of messages rendered with the template (`generation`: the
    // messages are a prompt, so "\n\nAssistant:" is appended; `completion`: the first message
    // is the assistant's answer to the prompt, so its "\n\nAssistant:" is already there).
    const auto render = [&](const char* key, const json& v, bool generation, bool completion) {
      if (v.is_string()) return v.get<std::string>();
      if (!v.is_array())
        throw fail(std::string("field \"") + key + "\" is neither a string nor a list of messages");
      d.conversational = true;
      std::string out;
      for (size_t m = 0; m < v.size(); ++m) {
        const auto& msg = v[m];
        if (!msg.is_object() || !msg.contains("role") || !msg.contains("content") ||
            !msg["role"].is_string() || !msg["content"].is_string())
          throw fail(std::string("field \"") + key + "\" message " + std::to_string(m) +
                     " is not {\"role\": string, \"content\": string}");
        const auto role = msg["role"].get<std::string>();
        const auto content = msg["content"].get<std::string>();
        if (completion && m == 0) {
          if (role != "assistant")
            throw fail(std::string("field \"") + key + "\" must start with an assistant message");
          out += " " + content;
        } else {
          out += "\n\n" + detail::role_name(role) + ": " + content;
        }
      }
      if (generation) out += "\n\nAssistant:";
      return out;
    };
    // TRL fails on a row that mixes text and messages; rendering it would glue a bare string
    // to the template ("Assistant:" + text, no space).
    const auto same_form = [&](const char* key, const char* like, bool messages) {
      if (r.contains(key) && !r[key].is_null() && r[key].is_array() != messages)
        throw fail(std::string("field \"") + key + "\" is " +
                   (messages ? "a string" : "a list of messages") + " but \"" + like + "\" is " +
                   (messages ? "a list of messages" : "a string") +
                   ": a row is all text or all messages");
    };
    const auto row = static_cast<int64_t>(i);
    if (d.format == "stack-exchange") {
      d.pairs.push_back({"Question: " + string("question") + "\n\nAnswer: ", string("response_j"),
                         string("response_k"), "", row});
    } else if (d.format == "unpaired") {
      const auto& label = field("label");
      if (!label.is_boolean()) throw fail("field \"label\" is not true or false");
      const auto& p = field("prompt");
      const bool conversational = p.is_array();
      same_form("completion", "prompt", conversational);
      d.unpaired.push_back({render("prompt", p, conversational, false),
                            render("completion", field("completion"), false, conversational),
                            label.get<bool>(), row});
    } else if (d.format == "preference") {
      const auto& p = field("prompt");
      const bool conversational = p.is_array();
      for (const char* k : {"chosen", "rejected", "reference"})
        same_form(k, "prompt", conversational);
      PreferenceExample e{render("prompt", p, conversational, false),
                          render("chosen", field("chosen"), false, conversational),
                          render("rejected", field("rejected"), false, conversational), "", row};
      if (r.contains("reference") && !r["reference"].is_null())
        e.gold = render("reference", r["reference"], false, conversational);
      d.pairs.push_back(std::move(e));
    } else {  // implicit prompt
      const auto& c = field("chosen");
      const auto& rj = field("rejected");
      const bool gold = r.contains("reference") && !r["reference"].is_null();
      same_form("rejected", "chosen", c.is_array());
      same_form("reference", "chosen", c.is_array());
      if (c.is_array()) {
        size_t k = 0;
        while (k < c.size() && k < rj.size() && c[k] == rj[k]) ++k;
        // One side a prefix of the other: TRL's loop variable stops at the last shared index.
        if (k == std::min(c.size(), rj.size()) && k > 0) --k;
        if (k == 0) throw fail("chosen and rejected share no prompt messages");
        const auto tail = [&](const json& v) {
          return json(std::vector<json>(v.begin() + static_cast<std::ptrdiff_t>(k), v.end()));
        };
        const json prompt(std::vector<json>(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(k)));
        PreferenceExample e{render("chosen", prompt, true, false),
                            render("chosen", tail(c), false, true),
                            render("rejected", tail(rj), false, true), "", row};
        if (gold) {  // TPO's triples (TRL's `_extract_triple_prompt`): the same prompt first
          const auto& g = r["reference"];
          if (g.size() < k ||
              !std::equal(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(k), g.begin()))
            throw fail(
                "field \"reference\" does not start with the prompt messages that "
                "\"chosen\" and \"rejected\" share");
          e.gold = render("reference", tail(g), false, true);
        }
        d.pairs.push_back(std::move(e));
        continue;
      }
      const auto chosen = string("chosen"), rejected = string("rejected");
      static const std::string kMarker = "\n\nAssistant:";
      const auto pc = chosen.rfind(kMarker), pr = rejected.rfind(kMarker);
      std::string prompt;
      if (implicit == ImplicitPrompt::kAssistantTurn && pc != std::string::npos &&
          pr != std::string::npos) {
        prompt = chosen.substr(0, pc + kMarker.size());
        if (prompt != rejected.substr(0, pr + kMarker.size())) {
          d.skipped.push_back(row);
          continue;
        }
      } else {
        if (chosen.empty() || rejected.empty())
          throw fail(
              "no \"prompt\" field, and \"chosen\" or \"rejected\" is empty: no prompt "
              "to extract");
        prompt = chosen.substr(0, detail::common_prefix_prompt(chosen, rejected));
        ++d.common_prefix_rows;
      }
      PreferenceExample e{prompt, chosen.substr(prompt.size()), rejected.substr(prompt.size()), "",
                          row};
      if (gold) {
        const auto g = string("reference");
        if (g.compare(0, prompt.size(), prompt) != 0)
          throw fail(
              "field \"reference\" does not start with the prompt that \"chosen\" and "
              "\"rejected\" share: give an explicit \"prompt\" column");
        e.gold = g.substr(prompt.size());
      }
      d.pairs.push_back(std::move(e));
    }
  }
  return d;
}

/// Typographic quotes, dashes and the like mapped to ASCII. The TinyStories vocabulary has
/// none of them (0.64 % of HH-RLHF's characters would become <unk>).
inline std::string ascii_punctuation(const std::string& s) {
  static const std::vector<std::pair<std::string, std::string>> map = {
      {"\xE2\x80\x98", "'"}, {"\xE2\x80\x99", "'"}, {"\xE2\x80\x9C", "\""},  {"\xE2\x80\x9D", "\""},
      {"\xE2\x80\x93", "-"}, {"\xE2\x80\x94", "-"}, {"\xE2\x80\xA6", "..."}, {"\xC2\xA0", " "}};
  std::string out = s;
  for (const auto& [from, to] : map) {
    for (size_t at = out.find(from); at != std::string::npos; at = out.find(from, at + to.size()))
      out.replace(at, from.size(), to);
  }
  return out;
}

/// One tokenized sequence: prompt tokens then completion tokens (EOS last).
struct Sequence {
  std::vector<int64_t> ids;
  int64_t prompt_len = 0;
  int64_t completion_len() const { return static_cast<int64_t>(ids.size()) - prompt_len; }
};

/// How prompt + completion is cut to `max_length`.
enum class Truncation {
  /// TRL ≥ 1.0 (DPO's default `keep_start`, KTO, TPO; CPO and ORPO keep the whole prompt too
  /// since 1.15): the prompt whole, the sequence cut from the right to `max_length`. An example
  /// whose prompt alone fills `max_length` is dropped, as TRL's DPO and KTO drop it, for every
  /// loss here (TRL's CPO, ORPO and TPO keep it with an empty completion, whose
  /// length-normalised log-prob or NLL is 0/0). Pairs are tokenized, bounded and dropped as
  /// pairs, also for KTO, which TRL unpairs first: the two differ only where a pair's sides
  /// end their prompt tokens at different places.
  kKeepStart,
  /// TRL ≤ 0.11's `keep_end` (`max_prompt_length`), the BOS kept in front where TRL cut it off
  /// with the prompt's start: see the top of this file. (TRL 0.12-0.28 cut the prompt to
  /// `max_prompt_length` and each completion to `max_completion_length` unconditionally.)
  kClassic,
};

struct TokenizeOptions {
  int64_t max_length = 192;         ///< TRL's max_length: prompt + completion
  int64_t max_prompt_length = 128;  ///< TRL ≤ 0.11's max_prompt_length (kClassic only)
  bool ascii = true;                ///< map typographic punctuation to ASCII first
  Truncation truncation = Truncation::kKeepStart;
  /// When set, counts the sequences whose prompt tokens are not a prefix of prompt +
  /// completion's (TRL warns once about them; the trainer reports the count).
  int64_t* prompt_merges = nullptr;
};

/// Prompt and completion tokens of prompt + completion, split as TRL splits them (see the top
/// of this file); EOS ends the completion unless it already does (TRL appends it only then);
/// no truncation. `prompt_merges`, when given, counts a prompt whose tokens are not a prefix
/// of the whole's (a token straddles the boundary). Throws when the tokenizer has no EOS.
inline std::pair<std::vector<int64_t>, std::vector<int64_t>> tokenize_answer(
    const Tokenizer& tok, std::string prompt, std::string completion, bool ascii,
    int64_t* prompt_merges = nullptr) {
  if (tok.eos_id() < 0)
    throw std::runtime_error("data: tokenizer " + tok.path() +
                             " names no EOS token (tokenizer_config.json's \"eos_token\"): "
                             "completions must end with one");
  if (ascii) prompt = ascii_punctuation(prompt), completion = ascii_punctuation(completion);
  const auto p = tok.encode(prompt);
  const auto full = tok.encode(prompt + completion);
  size_t start = 0;
  while (start < p.size() && start < full.size() && p[start] == full[start]) ++start;
  if (prompt_merges && start < p.size()) ++*prompt_merges;
  std::vector<int64_t> c(full.begin() + static_cast<std::ptrdiff_t>(start), full.end());
  if (c.empty() || c.back() != tok.eos_id()) c.push_back(tok.eos_id());
  return {std::vector<int64_t>(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(start)), c};
}

namespace detail {

// TRL 1.x's `keep_start`: prompt + completion, cut from the right to max_length.
inline Sequence keep_start(const std::vector<int64_t>& prompt,
                           const std::vector<int64_t>& completion, const TokenizeOptions& o) {
  Sequence s;
  s.prompt_len = static_cast<int64_t>(prompt.size());
  s.ids = prompt;
  s.ids.insert(s.ids.end(), completion.begin(), completion.end());
  if (static_cast<int64_t>(s.ids.size()) > o.max_length)
    s.ids.resize(static_cast<size_t>(o.max_length));
  return s;
}

// TRL ≥ 1.14's prompt/completion boundary of a pair: the shortest of the sides' prompts (each a
// prefix of the prompt's own tokens); a longer side's extra prompt tokens open its completion.
inline void common_prompt(std::vector<std::vector<int64_t>*> prompts,
                          std::vector<std::vector<int64_t>*> completions) {
  size_t b = SIZE_MAX;
  for (const auto* p : prompts) b = std::min(b, p->size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto& p = *prompts[i];
    auto& c = *completions[i];
    c.insert(c.begin(), p.begin() + static_cast<std::ptrdiff_t>(b), p.end());
    p.resize(b);
  }
}

// TRL's classic truncation of one side, given the longer completion of the example.
inline Sequence truncate(std::vector<int64_t> prompt, std::vector<int64_t> completion,
                         size_t longer, const TokenizeOptions& o, bool has_bos) {
  const auto max_len = static_cast<size_t>(o.max_length);
  const auto max_prompt = static_cast<size_t>(o.max_prompt_length);
  if (prompt.size() + longer > max_len && prompt.size() > max_prompt) {
    // Keep the end of the prompt; the BOS stays in front.
    const size_t keep = max_prompt - (has_bos ? 1 : 0);
    std::vector<int64_t> kept;
    if (has_bos) kept.push_back(prompt.front());
    kept.insert(kept.end(), prompt.end() - static_cast<std::ptrdiff_t>(keep), prompt.end());
    prompt = std::move(kept);
  }
  if (prompt.size() + longer > max_len && completion.size() > max_len - max_prompt)
    completion.resize(max_len - max_prompt);
  Sequence s;
  s.prompt_len = static_cast<int64_t>(prompt.size());
  s.ids = std::move(prompt);
  s.ids.insert(s.ids.end(), completion.begin(), completion.end());
  return s;
}

}  // namespace detail

/// A tokenized pair (and TPO's gold response when the data has one).
struct TokenizedPair {
  Sequence chosen, rejected, gold;
  int64_t row = 0;
};

/// The pair tokenized and truncated as `o` says; none when kKeepStart drops it (its prompt
/// alone fills max_length).
inline std::optional<TokenizedPair> tokenize_pair(const Tokenizer& tok, const PreferenceExample& e,
                                                  const TokenizeOptions& o) {
  auto [pc, c] = tokenize_answer(tok, e.prompt, e.chosen, o.ascii, o.prompt_merges);
  auto [pr, r] = tokenize_answer(tok, e.prompt, e.rejected, o.ascii, o.prompt_merges);
  std::vector<int64_t> pg, g;
  const bool gold = !e.gold.empty();
  if (gold) std::tie(pg, g) = tokenize_answer(tok, e.prompt, e.gold, o.ascii, o.prompt_merges);
  TokenizedPair t;
  t.row = e.row;
  if (o.truncation == Truncation::kKeepStart) {
    if (gold)
      detail::common_prompt({&pc, &pr, &pg}, {&c, &r, &g});
    else
      detail::common_prompt({&pc, &pr}, {&c, &r});
    if (static_cast<int64_t>(pc.size()) >= o.max_length) return std::nullopt;
    t.chosen = detail::keep_start(pc, c, o);
    t.rejected = detail::keep_start(pr, r, o);
    if (gold) t.gold = detail::keep_start(pg, g, o);
    return t;
  }
  const size_t longer = std::max({c.size(), r.size(), g.size()});
  const bool bos = tok.bos_id() >= 0 && !pc.empty() && pc.front() == tok.bos_id();
  t.chosen = detail::truncate(std::move(pc), std::move(c), longer, o, bos);
  t.rejected = detail::truncate(std::move(pr), std::move(r), longer, o, bos);
  if (gold) t.gold = detail::truncate(std::move(pg), std::move(g), longer, o, bos);
  return t;
}

/// One unpaired (KTO) example, tokenized and truncated as `o` says; none when kKeepStart drops
/// it.
inline std::optional<Sequence> tokenize_unpaired(const Tokenizer& tok, const std::string& prompt,
                                                 const std::string& completion,
                                                 const TokenizeOptions& o) {
  auto [p, c] = tokenize_answer(tok, prompt, completion, o.ascii, o.prompt_merges);
  if (o.truncation == Truncation::kKeepStart) {
    if (static_cast<int64_t>(p.size()) >= o.max_length) return std::nullopt;
    return detail::keep_start(p, c, o);
  }
  const bool bos = tok.bos_id() >= 0 && !p.empty() && p.front() == tok.bos_id();
  const auto longer = c.size();
  return detail::truncate(std::move(p), std::move(c), longer, o, bos);
}

/// A padded batch: ids [N, T] (right-padded with `pad_id`), attention_mask [N, T], labels
/// [N, T] (the ids, −100 on prompt and padding), T the longest sequence.
struct Batch {
  at::Tensor ids, attention_mask, labels;
};

inline Batch collate(const std::vector<const Sequence*>& seqs, int64_t pad_id) {
  const auto N = static_cast<int64_t>(seqs.size());
  int64_t T = 1;
  for (const auto* s : seqs) T = std::max<int64_t>(T, static_cast<int64_t>(s->ids.size()));
  Batch b;
  b.ids = at::full({N, T}, pad_id, at::kLong);
  b.labels = at::full({N, T}, -100, at::kLong);
  b.attention_mask = at::zeros({N, T}, at::kLong);
  auto ids = b.ids.accessor<int64_t, 2>();
  auto labels = b.labels.accessor<int64_t, 2>();
  auto mask = b.attention_mask.accessor<int64_t, 2>();
  for (int64_t i = 0; i < N; ++i) {
    const auto& s = *seqs[static_cast<size_t>(i)];
    for (int64_t t = 0; t < static_cast<int64_t>(s.ids.size()); ++t) {
      ids[i][t] = s.ids[static_cast<size_t>(t)];
      mask[i][t] = 1;
      if (t >= s.prompt_len) labels[i][t] = s.ids[static_cast<size_t>(t)];
    }
  }
  return b;
}

}  // namespace train
