// SPDX-License-Identifier: Apache-2.0
// safetensors, read and written: the file format of Hugging Face checkpoints.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON (padded with spaces), then
// the tensor data. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [b, e]}
// (offsets relative to the data, which the tensors cover back to back without gaps), plus an
// optional "__metadata__" object of strings ({"format": "pt"} from PyTorch).
//
// The reader maps the file (mmap) and hands out tensors that view the mapped bytes, so loading
// a checkpoint into a model costs one copy (into the parameters). It checks everything the
// reference implementation checks and says what is wrong: a truncated file, a header that is
// not JSON or not the layout above, offsets that do not match dtype × shape, gaps or overlaps.
// The writer produces what `safetensors.torch.load_file` and `transformers` accept, through a
// temporary file renamed into place, so an error never leaves half a file behind.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace train {

/// One tensor of a safetensors file, as its header describes it.
struct TensorEntry {
  std::string dtype;  ///< "F32", "F16" or "BF16"
  at::ScalarType scalar_type = at::kFloat;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< byte offsets relative to the start of the data
};

/// "F32" -> kFloat, "F16" -> kHalf, "BF16" -> kBFloat16; anything else throws.
inline at::ScalarType safetensors_scalar_type(const std::string& dtype, const std::string& where) {
  if (dtype == "F32") return at::kFloat;
  if (dtype == "F16") return at::kHalf;
  if (dtype == "BF16") return at::kBFloat16;
  throw std::runtime_error(where + ": dtype \"" + dtype +
                           "\" is not supported (this reader takes F32, F16 and BF16)");
}

inline std::string safetensors_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "F32";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    default:
      throw std::runtime_error(std::string("safetensors: cannot write dtype ") + c10::toString(t) +
                               " (F32, F16 and BF16 are supported)");
  }
}

namespace detail {

/// A read-only mapping of a whole file; tensors viewing it share its ownership.
class Mapping {
 public:
  explicit Mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      throw std::runtime_error("safetensors: cannot open " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw std::runtime_error("safetensors: cannot stat " + path);
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw std::runtime_error("safetensors: cannot map " + path + ": " + std::strerror(errno));
      }
      data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
  }
  ~Mapping() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Writes `bytes` to `path` through `path.tmp` + rename: readers see the old file or the new
/// one, never a partial one.
inline void write_file_atomically(const std::filesystem::path& path,
                                  const std::vector<std::pair<const void*, size_t>>& chunks) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp);
    for (const auto& [p, n] : chunks)
      out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
    out.flush();
    if (!out) {
      out.close();
      std::filesystem::remove(tmp);
      throw std::runtime_error("cannot write " + tmp + " (disk full?)");
    }
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace detail

/// A safetensors file, mapped and validated.
///
/// ```
/// train::SafetensorsReader st("model.safetensors");
/// for (const auto& [name, e] : st.entries()) ...;
/// param.copy_(st.view("model.norm.weight"));  // the only copy
/// ```
class SafetensorsReader {
 public:
  /// Maps and validates `path`; throws std::runtime_error ("safetensors: <path>: ...") when it
  /// is not a complete, well-formed file.
  explicit SafetensorsReader(const std::string& path)
      : path_(path), map_(std::make_shared<detail::Mapping>(path)) {
    const auto fail = [&](const std::string& what) {
      throw std::runtime_error("safetensors: " + path_ + ": " + what);
    };
    const size_t size = map_->size();
    if (size < 8)
      fail("truncated: " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | map_->data()[i];  // little-endian
    if (n > size - 8)
      fail("truncated: the header length is " + std::to_string(n) + " bytes but only " +
           std::to_string(size - 8) + " follow it (or this is not a safetensors file)");
    if (n > (uint64_t{100} << 20))
      fail("bad header: " + std::to_string(n) + " bytes (over 100 MB)");
    const char* text = reinterpret_cast<const char*>(map_->data() + 8);
    if (n == 0 || text[0] != '{') fail("bad header: it does not start with '{'");
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text, text + n);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("bad header: not valid JSON (") + e.what() + ")");
    }
    if (!header.is_object()) fail("bad header: not a JSON object");
    data_offset_ = 8 + n;
    const uint64_t data_size = size - data_offset_;

    std::vector<std::pair<uint64_t, std::string>> order;
    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) fail("bad header: __metadata__ is not an object");
        for (const auto& [k, v] : value.items()) {
          if (!v.is_string()) fail("bad header: __metadata__[\"" + k + "\"] is not a string");
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      const std::string where = "tensor \"" + name + "\"";
      if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
          !value.contains("data_offsets"))
        fail("bad header: " + where + " lacks dtype, shape or data_offsets");
      const auto& dt = value["dtype"];
      const auto& shape = value["shape"];
      const auto& off = value["data_offsets"];
      if (!dt.is_string()) fail("bad header: " + where + ": dtype is not a string");
      if (!shape.is_array()) fail("bad header: " + where + ": shape is not an array");
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
          !off[1].is_number_unsigned())
        fail("bad header: " + where + ": data_offsets is not [begin, end]");
      TensorEntry e;
      e.dtype = dt.get<std::string>();
      e.scalar_type = safetensors_scalar_type(e.dtype, "safetensors: " + path_ + ": " + where);
      // The byte count is checked against the offsets below, so it must not wrap: a crafted
      // shape whose product overflows could otherwise pass and be read past the mapping.
      constexpr uint64_t kMaxBytes = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      uint64_t need = c10::elementSize(e.scalar_type);
      for (const auto& d : shape) {
        if (!d.is_number_unsigned()) fail("bad header: " + where + ": shape has a non-integer");
        const auto n = d.get<uint64_t>();
        if (n > kMaxBytes || (n != 0 && need > kMaxBytes / n))
          fail("bad header: " + where + ": shape " + shape.dump() + " is too large");
        e.shape.push_back(static_cast<int64_t>(n));
        need *= n;
      }
      e.begin = off[0].get<uint64_t>();
      e.end = off[1].get<uint64_t>();
      if (e.end < e.begin || e.end - e.begin != need)
        fail("bad header: " + where + " is " + e.dtype + " " + detail::shape_string(e.shape) +
             " (" + std::to_string(need) + " bytes) but data_offsets span " +
             std::to_string(e.end - e.begin));
      order.emplace_back(e.begin, name);
      entries_.emplace(name, std::move(e));
    }
    // The tensors must tile the data exactly: sorted by offset, each starts where the last
    // ended, and the last ends where the file does.
    std::sort(order.begin(), order.end());
    uint64_t at = 0;
    for (const auto& [begin, name] : order) {
      const auto& e = entries_.at(name);
      if (e.begin != at)
        fail("bad header: tensor \"" + name + "\" starts at byte " + std::to_string(e.begin) +
             " of the data, expected " + std::to_string(at) + " (a gap or an overlap)");
      at = e.end;
    }
    if (at > data_size)
      fail("truncated: the tensors need " + std::to_string(at) + " bytes of data, the file has " +
           std::to_string(data_size));
    if (at < data_size)
      fail("bad header: " + std::to_string(data_size - at) +
           " bytes after the last tensor (the offsets do not cover the data)");
  }

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  /// A CPU tensor viewing `name`'s bytes in the mapping (read-only: copy before writing; no
  /// copy is made unless the bytes are misaligned for the dtype). It keeps the file mapped.
  at::Tensor view(const std::string& name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end())
      throw std::runtime_error("safetensors: " + path_ + ": no tensor \"" + name + "\"");
    const auto& e = it->second;
    const auto* p = map_->data() + data_offset_ + e.begin;
    const auto opts = at::TensorOptions().dtype(e.scalar_type);
    if (reinterpret_cast<uintptr_t>(p) % c10::elementSize(e.scalar_type) != 0) {
      auto t = at::empty(e.shape, opts);
      std::memcpy(t.data_ptr(), p, e.end - e.begin);
      return t;
    }
    auto keep = map_;
    return at::from_blob(
        const_cast<uint8_t*>(p), e.shape, [keep](void*) {}, opts);
  }

 private:
  std::string path_;
  std::shared_ptr<detail::Mapping> map_;
  uint64_t data_offset_ = 0;
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// Writes `tensors` (CPU or not; F32, F16 or BF16) to `path` as safetensors, with
/// `__metadata__` = `metadata` (Hugging Face writes {"format": "pt"}). Tensors are laid out in
/// name order; the header is padded with spaces to a multiple of 8 bytes, as the reference
/// writer does, so every tensor's data is 8-byte aligned. Written to a temporary file and
/// renamed into place.
inline void save_safetensors(const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             const std::map<std::string, std::string>& metadata = {
                                 {"format", "pt"}}) {
  std::vector<std::pair<std::string, at::Tensor>> sorted;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw std::runtime_error("safetensors: reserved name");
    sorted.emplace_back(name, t.detach().to(at::kCPU).contiguous());
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i].first == sorted[i - 1].first)
      throw std::runtime_error("safetensors: tensor \"" + sorted[i].first + "\" given twice");
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t at = 0;
  for (const auto& [name, t] : sorted) {
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", safetensors_dtype(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {at, at + bytes}}};
    at += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  std::vector<std::pair<const void*, size_t>> chunks = {{len, 8}, {text.data(), text.size()}};
  for (const auto& [name, t] : sorted)
    chunks.emplace_back(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  detail::write_file_atomically(path, chunks);
}

}  // namespace train
