// SPDX-License-Identifier: Apache-2.0
// A Hugging Face `tokenizer.json` BPE tokenizer of the SentencePiece kind (Llama 1/2, Mistral,
// TinyStories): what the `tokenizers` library does for it, in ~300 lines.
//
//   encode: split off the added tokens (matched in the normalized text when `normalized` is
//           true), normalize (Prepend "▁", Replace " " -> "▁"), then per piece: one symbol per
//           character (unknown characters -> `<0xXX>` byte tokens when the vocabulary has them,
//           else one `<unk>` per run of them: `fuse_unk`), merge adjacent pairs by rank (the
//           lowest rank first, the leftmost among equals), and apply the post-processor's
//           template (`<s> $A`).
//   decode: id -> token (an added token with `normalized` decodes as its normalized form),
//           Replace "▁" -> " ", ByteFallback, Fuse, Strip one leading space.
//
// Anything else in tokenizer.json (other normalizers, a pre-tokenizer such as ByteLevel for
// GPT-2/Llama 3/Qwen, WordPiece or Unigram models) is refused with a message that names it,
// rather than tokenized differently. No library for this exists in Debian, and the Rust
// `tokenizers` behind PyPI's wheel is not a C++ dependency a trainer wants; sentencepiece
// (libsentencepiece-dev) reads `.model` protobufs, not tokenizer.json, so it cannot read this
// checkpoint's tokenizer.
//
// The reference is `tokenizers` (0.23) loading the same file, which is also what transformers
// 4.x uses (`LlamaTokenizerFast`). transformers 5.x rebuilds LlamaTokenizer from the vocabulary
// with a Metaspace pre-tokenizer instead of this file's normalizer, and differs on leading
// spaces and unknown characters; tests/fixtures/tinystories_tokenizer.json records both.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace train {

class Tokenizer {
 public:
  Tokenizer() = default;

  /// Loads `tokenizer.json` (a file, or a checkpoint folder holding one), reading the files
  /// beside it as transformers 5.25 does. The post-processor decides what `encode` adds (BOS);
  /// `tokenizer_config.json` names BOS, EOS and padding (`bos_token`, `eos_token`,
  /// `pad_token`), overridden by `special_tokens_map.json` when the config is of the legacy
  /// kind without `added_tokens_decoder`. `add_bos_token` / `add_eos_token` are ignored, as
  /// transformers 5 ignores them when a tokenizer.json exists (transformers 4 rebuilt the
  /// post-processor from them): where they disagree with the post-processor, `notes()` says
  /// so. `config.json`'s `bos_token_id` / `eos_token_id`, which transformers never reads for
  /// the tokenizer, fill in only what those leave unnamed, with a note.
  static Tokenizer load(const std::filesystem::path& path_or_dir) {
    namespace fs = std::filesystem;
    const fs::path file =
        fs::is_directory(path_or_dir) ? path_or_dir / "tokenizer.json" : path_or_dir;
    Tokenizer t;
    t.path_ = file.string();
    const auto j = read_json(file);
    t.parse(j);
    const auto dir = file.parent_path();
    // A special token named by content, as a string or an AddedToken object.
    const auto named = [&t](const nlohmann::json& c, const char* key) -> std::optional<int64_t> {
      if (!c.contains(key)) return std::nullopt;
      const auto& v = c[key];
      const std::string s = v.is_string() ? v.get<std::string>()
                            : v.is_object() && v.contains("content") && v["content"].is_string()
                                ? v["content"].get<std::string>()
                                : std::string();
      const auto it = t.vocab_.find(s);
      if (s.empty() || it == t.vocab_.end()) return std::nullopt;
      return it->second;
    };
    nlohmann::json config = nlohmann::json::object();
    if (fs::exists(dir / "tokenizer_config.json")) {
      config = read_json(dir / "tokenizer_config.json");
      if (!config.is_object())
        throw std::runtime_error("tokenizer: " + (dir / "tokenizer_config.json").string() +
                                 ": not a JSON object");
    }
    if (!config.contains("added_tokens_decoder") && fs::exists(dir / "special_tokens_map.json")) {
      const auto map = read_json(dir / "special_tokens_map.json");
      for (const char* key : {"bos_token", "eos_token", "pad_token"})
        if (map.is_object() && map.contains(key)) config[key] = map[key];
    }
    if (auto id = named(config, "bos_token")) t.bos_id_ = *id;
    if (auto id = named(config, "eos_token")) t.eos_id_ = *id;
    if (auto id = named(config, "pad_token")) t.pad_id_ = *id;
    // transformers 4 rebuilt the post-processor from these flags; 5 follows tokenizer.json.
    const auto note_flag = [&](const std::string& token, bool adds) {
      const auto key = "add_" + token + "_token";
      if (!config.contains(key) || !config[key].is_boolean() || config[key].get<bool>() == adds)
        return;
      t.notes_.push_back("tokenizer_config.json says " + key + ": " + (adds ? "false" : "true") +
                         " but tokenizer.json's post-processor " + (adds ? "adds" : "adds no") +
                         " " + (token == "bos" ? "BOS" : "EOS") +
                         "; following tokenizer.json, as transformers 5 does (4.x followed "
                         "the flag)");
    };
    note_flag("bos", !t.prefix_.empty());
    note_flag("eos", !t.suffix_.empty());
    if (fs::exists(dir / "config.json") && (t.bos_id_ < 0 || t.eos_id_ < 0)) {
      const auto c = read_json(dir / "config.json");
      const auto id_of = [&](const char* key) -> int64_t {
        if (!c.contains(key)) return -1;
        const auto& v = c[key];
        if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
        return v.is_number_integer() ? v.get<int64_t>() : -1;
      };
      for (auto [id, key] :
           {std::make_pair(&t.bos_id_, "bos_token_id"), std::make_pair(&t.eos_id_, "eos_token_id")})
        if (*id < 0 && (*id = id_of(key)) >= 0)
          t.notes_.push_back(std::string("no ") + (key[0] == 'b' ? "BOS" : "EOS") +
                             " token in the tokenizer's files; using config.json's " + key + " = " +
                             std::to_string(*id) + " (transformers would have none)");
    }
    if (t.pad_id_ < 0) t.pad_id_ = t.unk_id_ >= 0 ? t.unk_id_ : std::max<int64_t>(t.eos_id_, 0);
    return t;
  }

  /// Token ids of `text` (UTF-8), with the post-processor's special tokens (BOS) when
  /// `add_special_tokens`, as `tokenizer.encode(text).ids` in Python.
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const {
    std::vector<int64_t> ids;
    if (add_special_tokens) ids.insert(ids.end(), prefix_.begin(), prefix_.end());
    // Added tokens that are not normalized are matched in the raw text; the others in the
    // normalized text (their own content normalized too: "▁<unk>" for "<unk>").
    for (const auto& [raw, added] : split_added(text, raw_added_)) {
      if (added >= 0) {
        ids.push_back(added);
        continue;
      }
      for (const auto& [piece, id] : split_added(normalize(raw), normalized_added_)) {
        if (id >= 0)
          ids.push_back(id);
        else
          bpe(piece, ids);
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  /// Text of `ids`, as `tokenizer.decode(ids, skip_special_tokens=False)` in Python (ids out of
  /// range are skipped, as there). With `skip_special_tokens`, the special tokens' ids are left
  /// out. (The Python library fails to skip normalized special tokens such as this
  /// checkpoint's, because it compares their normalized form; transformers' default is False.)
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const {
    std::vector<std::string> tokens;
    for (const auto id : ids) {
      if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size()) || id_to_token_[id].empty())
        continue;
      if (skip_special_tokens && special_ids_.count(id)) continue;
      tokens.push_back(id_to_token_[static_cast<size_t>(id)]);
    }
    for (const auto& step : decoders_) step(tokens);
    std::string out;
    for (const auto& t : tokens) out += t;
    return out;
  }

  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  /// What `load` read differently from what some file says (see `load`), for the host to print.
  const std::vector<std::string>& notes() const { return notes_; }
  /// Whether unknown characters become `<0xXX>` byte tokens (else `<unk>`): the model's
  /// `byte_fallback` and all 256 byte tokens in the vocabulary (TinyStories' sets the flag but
  /// has none of them).
  bool byte_fallback() const {
    if (!byte_fallback_) return false;
    static const char* hex = "0123456789ABCDEF";
    for (int c = 0; c < 256; ++c)
      if (!vocab_.count(std::string("<0x") + hex[c >> 4] + hex[c & 15] + ">")) return false;
    return true;
  }
  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t unk_id() const { return unk_id_; }
  /// The token string of `id` (empty when unknown).
  const std::string& token(int64_t id) const { return id_to_token_.at(static_cast<size_t>(id)); }
  const std::string& path() const { return path_; }

 private:
  using Decoder = std::function<void(std::vector<std::string>&)>;
  static constexpr const char* kSpace = "\xE2\x96\x81";  // "▁", U+2581

  static nlohmann::json read_json(const std::filesystem::path& p) {
    std::ifstream in(p);
    if (!in) throw std::runtime_error("tokenizer: cannot open " + p.string());
    try {
      return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error("tokenizer: " + p.string() + ": not valid JSON (" + e.what() + ")");
    }
  }

  [[noreturn]] void unsupported(const std::string& what) const {
    throw std::runtime_error("tokenizer: " + path_ + ": " + what +
                             " is not supported by this tokenizer (it implements SentencePiece-"
                             "style BPE: see examples/train/tokenizer.h)");
  }

  static std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
      s.replace(at, from.size(), to);
    return s;
  }

  // Length of the UTF-8 character starting at byte `c` (1 for invalid bytes).
  static size_t utf8_len(unsigned char c) {
    return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  }

  void parse(const nlohmann::json& j) {
    try {
      parse_model(j.at("model"));
      parse_added(j);
      parse_normalizer(j.contains("normalizer") ? j["normalizer"] : nlohmann::json());
      finish();
      if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null())
        unsupported("pre_tokenizer " + j["pre_tokenizer"].value("type", std::string("?")));
      parse_post_processor(j.contains("post_processor") ? j["post_processor"] : nlohmann::json());
      parse_decoder(j.contains("decoder") ? j["decoder"] : nlohmann::json());
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error("tokenizer: " + path_ + ": unexpected layout (" + e.what() + ")");
    }
  }

  void parse_model(const nlohmann::json& m) {
    if (m.value("type", std::string()) != "BPE")
      unsupported("model " + m.value("type", std::string("?")));
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"})
      if (m.contains(k) && !m[k].is_null()) unsupported(std::string("BPE ") + k);
    if (m.value("ignore_merges", false)) unsupported("BPE ignore_merges");
    for (const auto& [tok, id] : m.at("vocab").items()) {
      const auto i = id.get<int64_t>();
      vocab_[tok] = i;
      if (i >= static_cast<int64_t>(id_to_token_.size())) id_to_token_.resize(i + 1);
      id_to_token_[static_cast<size_t>(i)] = tok;
    }
    int64_t rank = 0;
    for (const auto& merge : m.at("merges")) {
      std::string a, b;
      if (merge.is_string()) {  // "a b"
        const auto s = merge.get<std::string>();
        const auto sp = s.find(' ');
        if (sp == std::string::npos) throw std::runtime_error("tokenizer: bad merge \"" + s + "\"");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {  // ["a", "b"]
        a = merge.at(0).get<std::string>(), b = merge.at(1).get<std::string>();
      }
      const auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
        throw std::runtime_error("tokenizer: " + path_ + ": merge \"" + a + " " + b +
                                 "\" names a token missing from the vocabulary");
      merges_.emplace(pair_key(ia->second, ib->second), std::make_pair(rank++, iab->second));
    }
    byte_fallback_ = m.value("byte_fallback", false);
    fuse_unk_ = m.value("fuse_unk", false);
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      const auto it = vocab_.find(m["unk_token"].get<std::string>());
      if (it != vocab_.end()) unk_id_ = it->second;
    }
  }

  void parse_added(const nlohmann::json& j) {
    if (!j.contains("added_tokens")) return;
    for (const auto& a : j["added_tokens"]) {
      for (const char* k : {"lstrip", "rstrip", "single_word"})
        if (a.value(k, false)) unsupported(std::string("added token ") + k);
      const auto id = a.at("id").get<int64_t>();
      const auto content = a.at("content").get<std::string>();
      const bool normalized = a.value("normalized", !a.value("special", false));
      if (id >= static_cast<int64_t>(id_to_token_.size())) id_to_token_.resize(id + 1);
      added_.push_back({content, id, normalized});
      if (a.value("special", false)) special_ids_.insert(id);
    }
  }

  void parse_normalizer(const nlohmann::json& n) {
    if (n.is_null()) return;
    const auto type = n.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const auto& s : n.at("normalizers")) parse_normalizer(s);
    } else if (type == "Prepend") {
      normalizers_.push_back({true, n.at("prepend").get<std::string>(), ""});
    } else if (type == "Replace" && n.at("pattern").contains("String")) {
      normalizers_.push_back(
          {false, n["pattern"]["String"].get<std::string>(), n.at("content").get<std::string>()});
    } else {
      unsupported("normalizer " + type);
    }
  }

  void parse_post_processor(const nlohmann::json& p) {
    if (p.is_null()) return;
    if (p.at("type").get<std::string>() != "TemplateProcessing")
      unsupported("post_processor " + p["type"].get<std::string>());
    bool seen_a = false;
    for (const auto& item : p.at("single")) {
      if (item.contains("Sequence")) {
        seen_a = true;
        continue;
      }
      const auto name = item.at("SpecialToken").at("id").get<std::string>();
      for (const auto& id : p.at("special_tokens").at(name).at("ids"))
        (seen_a ? suffix_ : prefix_).push_back(id.get<int64_t>());
    }
    if (!prefix_.empty()) bos_id_ = prefix_.front();
  }

  void parse_decoder(const nlohmann::json& d) {
    if (d.is_null()) return;
    const auto type = d.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const auto& s : d.at("decoders")) parse_decoder(s);
    } else if (type == "Replace" && d.at("pattern").contains("String")) {
      const auto from = d["pattern"]["String"].get<std::string>();
      const auto to = d.at("content").get<std::string>();
      decoders_.push_back([from, to](std::vector<std::string>& tokens) {
        for (auto& t : tokens) t = replace_all(t, from, to);
      });
    } else if (type == "ByteFallback") {
      // Runs of "<0xXX>" tokens become their bytes; a run that is not valid UTF-8 becomes one
      // U+FFFD per byte, as in the reference.
      decoders_.push_back([](std::vector<std::string>& tokens) {
        std::vector<std::string> out;
        std::string bytes;
        size_t run = 0;
        const auto flush = [&] {
          if (run == 0) return;
          if (valid_utf8(bytes)) {
            out.push_back(bytes);
          } else {
            for (size_t i = 0; i < run; ++i) out.emplace_back("\xEF\xBF\xBD");
          }
          bytes.clear(), run = 0;
        };
        for (auto& t : tokens) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4]))) {
            bytes.push_back(static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
            ++run;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
      });
    } else if (type == "Fuse") {
      decoders_.push_back([](std::vector<std::string>& tokens) {
        std::string all;
        for (const auto& t : tokens) all += t;
        tokens.assign(1, all);
      });
    } else if (type == "Strip") {
      const auto content = d.at("content").get<std::string>();
      const auto start = d.at("start").get<size_t>(), stop = d.at("stop").get<size_t>();
      if (content.size() != 1) unsupported("Strip decoder of a multi-byte character");
      decoders_.push_back([content, start, stop](std::vector<std::string>& tokens) {
        for (auto& t : tokens) {
          size_t b = 0, e = t.size();
          while (b < start && b < e && t[b] == content[0]) ++b;
          while (t.size() - e < stop && e > b && t[e - 1] == content[0]) --e;
          t = t.substr(b, e - b);
        }
      });
    } else {
      unsupported("decoder " + type);
    }
  }

  static bool valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
      const auto c = static_cast<unsigned char>(s[i]);
      size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
      if (n == 0 || i + n > s.size()) return false;
      for (size_t k = 1; k < n; ++k)
        if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
      i += n;
    }
    return true;
  }

  std::string normalize(const std::string& s) const {
    std::string out = s;
    for (const auto& n : normalizers_) {
      if (n.prepend) {
        if (!out.empty()) out = n.from + out;  // the reference leaves "" alone
      } else {
        out = replace_all(out, n.from, n.to);
      }
    }
    return out;
  }

  // Splits `text` around the leftmost-longest occurrences of `patterns` (pattern -> id).
  // Pieces that are not added tokens carry id -1.
  static std::vector<std::pair<std::string, int64_t>> split_added(
      const std::string& text, const std::vector<std::pair<std::string, int64_t>>& patterns) {
    std::vector<std::pair<std::string, int64_t>> out;
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      size_t best = 0;
      int64_t id = -1;
      for (const auto& [p, pid] : patterns) {
        if (p.size() > best && text.compare(i, p.size(), p) == 0) best = p.size(), id = pid;
      }
      if (best == 0) {
        ++i;
        continue;
      }
      if (i > start) out.emplace_back(text.substr(start, i - start), -1);
      out.emplace_back(text.substr(i, best), id);
      i += best;
      start = i;
    }
    if (start < text.size()) out.emplace_back(text.substr(start), -1);
    return out;
  }

  static uint64_t pair_key(int64_t a, int64_t b) {
    return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b);
  }

  // BPE of one piece: symbols per character, then merges by rank. Symbols are a linked list;
  // a heap holds candidate merges (rank, position), validated when popped (the reference's
  // algorithm, so ties between equal ranks resolve leftmost first, as there).
  void bpe(const std::string& piece, std::vector<int64_t>& out) const {
    struct Symbol {
      int64_t id;
      int prev, next;
      bool alive;
    };
    std::vector<Symbol> sym;
    int64_t pending_unk = -1;  // a fused run of unknown characters
    const auto push = [&](int64_t id) {
      const int n = static_cast<int>(sym.size());
      sym.push_back({id, n - 1, n + 1, true});
    };
    for (size_t i = 0; i < piece.size();) {
      const size_t n = std::min(utf8_len(static_cast<unsigned char>(piece[i])), piece.size() - i);
      const auto ch = piece.substr(i, n);
      i += n;
      const auto it = vocab_.find(ch);
      if (it != vocab_.end()) {
        if (pending_unk >= 0) push(pending_unk), pending_unk = -1;
        push(it->second);
        continue;
      }
      if (byte_fallback_) {
        std::vector<int64_t> bytes;
        for (const unsigned char c : ch) {
          static const char* hex = "0123456789ABCDEF";
          const auto b = vocab_.find(std::string("<0x") + hex[c >> 4] + hex[c & 15] + ">");
          if (b == vocab_.end()) break;
          bytes.push_back(b->second);
        }
        if (bytes.size() == ch.size()) {
          if (pending_unk >= 0) push(pending_unk), pending_unk = -1;
          for (const auto b : bytes) push(b);
          continue;
        }
      }
      if (unk_id_ < 0)
        throw std::runtime_error("tokenizer: " + path_ +
                                 ": a character is not in the "
                                 "vocabulary and there is no unk_token");
      if (pending_unk >= 0 && !fuse_unk_) push(pending_unk);
      pending_unk = unk_id_;
    }
    if (pending_unk >= 0) push(pending_unk);
    if (sym.empty()) return;
    sym.back().next = -1;

    struct Candidate {
      int64_t rank;
      int pos;
      int64_t left, right;  // the pair it was made for, to detect stale entries
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    const auto consider = [&](int left) {
      const int right = sym[left].next;
      if (right < 0) return;
      const auto m = merges_.find(pair_key(sym[left].id, sym[right].id));
      if (m != merges_.end()) heap.push({m->second.first, left, sym[left].id, sym[right].id});
    };
    for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) consider(i);
    while (!heap.empty()) {
      const auto c = heap.top();
      heap.pop();
      auto& left = sym[c.pos];
      if (!left.alive || left.next < 0 || left.id != c.left || sym[left.next].id != c.right)
        continue;
      auto& right = sym[left.next];
      left.id = merges_.at(pair_key(c.left, c.right)).second;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) sym[right.next].prev = c.pos;
      if (left.prev >= 0) consider(left.prev);
      consider(c.pos);
    }
    for (int i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
  }

  struct Normalizer {
    bool prepend;
    std::string from, to;
  };
  struct Added {
    std::string content;
    int64_t id;
    bool normalized;
  };

  // Called once the normalizer is known: the patterns added tokens are matched with, and the
  // strings they decode to.
  void finish() {
    for (const auto& a : added_) {
      const auto pattern = a.normalized ? normalize(a.content) : a.content;
      (a.normalized ? normalized_added_ : raw_added_).emplace_back(pattern, a.id);
      id_to_token_[static_cast<size_t>(a.id)] = pattern;
      vocab_.emplace(a.content, a.id);
    }
  }

  std::string path_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;  // (a, b) -> (rank, ab)
  std::vector<Added> added_;
  std::vector<std::pair<std::string, int64_t>> raw_added_, normalized_added_;
  std::unordered_set<int64_t> special_ids_;
  std::vector<Normalizer> normalizers_;
  std::vector<Decoder> decoders_;
  std::vector<int64_t> prefix_, suffix_;
  std::vector<std::string> notes_;
  bool byte_fallback_ = false, fuse_unk_ = false;
  int64_t unk_id_ = -1, bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
};

}  // namespace train
