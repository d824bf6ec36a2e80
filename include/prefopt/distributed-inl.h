// SPDX-License-Identifier: Apache-2.0
// Process groups from torchrun's environment (Gloo, NCCL), all-reduces, and the cross-rank
// pieces of the losses (bco_pair's baseline, KTO's KL).
#pragma once

#include <prefopt/detail/check_enum.h>
#include <prefopt/distributed.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef PREFOPT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

PREFOPT_BEGIN_NAMESPACE

namespace detail {
namespace dist {

constexpr const char* kInit = "prefopt::init_process_group";

// The first line of a c10::Error: the message without libtorch's C++ backtrace.
PREFOPT_INLINE std::string first_line(const std::exception& e) {
  std::string msg = e.what();
  if (const auto* err = dynamic_cast<const c10::Error*>(&e)) msg = err->what_without_backtrace();
  const auto nl = msg.find('\n');
  return nl == std::string::npos ? msg : msg.substr(0, nl);
}

PREFOPT_INLINE std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// The option `option` of ProcessGroupOptions when set (not -1), else the environment variable
// `name`; either must be in [lo, hi].
PREFOPT_INLINE int env_int(const char* name, const char* option, int value, int lo, int hi) {
  if (value != -1) {
    TORCH_CHECK(value >= lo && value <= hi, kInit, ": expected ProcessGroupOptions::", option,
                " in [", lo, ", ", hi, "] (or -1: environment variable ", name, "), got ", value);
    return value;
  }
  const std::string v = env_or_empty(name);
  TORCH_CHECK(!v.empty(), kInit, ": environment variable ", name,
              " is not set; expected an integer (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR "
              "and MASTER_PORT), or pass it in ProcessGroupOptions");
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v.c_str(), &end, 10);
  TORCH_CHECK(errno == 0 && end != v.c_str() && *end == '\0' && x >= lo && x <= hi, kInit,
              ": environment variable ", name, "='", v, "' is not an integer in [", lo, ", ", hi,
              "]");
  return static_cast<int>(x);
}

PREFOPT_INLINE bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

using Clock = std::chrono::steady_clock;

// How long a failed step took, as an error states it: a failure that came before the timeout
// says after how long, not that the timeout passed.
PREFOPT_INLINE std::string took(Clock::time_point t0, std::chrono::milliseconds timeout) {
  const auto d = Clock::now() - t0;
  std::ostringstream os;
  os.precision(3);
  if (d >= timeout) {
    os << "within the " << std::chrono::duration<double>(timeout).count() << " s timeout";
  } else {
    os << "after " << std::chrono::duration<double>(d).count() << " s, before the "
       << std::chrono::duration<double>(timeout).count() << " s timeout";
  }
  return os.str();
}

// A non-blocking TCP connection to host:port made within `limit`, or -1 (and why in `error`).
PREFOPT_INLINE int connect_tcp(const std::string& host, int port, std::chrono::milliseconds limit,
                               std::string* error = nullptr) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) {
    if (error) *error = std::string("cannot resolve ") + host + ": " + ::gai_strerror(rc);
    return -1;
  }
  if (error) *error = "timed out";
  int out = -1;
  for (addrinfo* a = found; a != nullptr && out < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    bool ok = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    if (!ok && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof(err);
      ok = ::poll(&p, 1, static_cast<int>(limit.count())) == 1 &&
           ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
      if (err != 0 && error) *error = std::strerror(err);
    } else if (!ok && error) {
      *error = std::strerror(errno);
    }
    if (ok) {
      out = fd;
    } else {
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  return out;
}

// Whether something at host:port accepts a TCP connection within `limit`.
PREFOPT_INLINE bool accepts_connections(const std::string& host, int port,
                                        std::chrono::milliseconds limit) {
  const int fd = connect_tcp(host, port, limit);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

#if PREFOPT_TORCH_VERSION < 200
// libtorch 1.13's store client starts a thread that reads whatever the server sends, and a
// listener that is no c10d store (one that greets, say) aborts the process there. Before
// making one, ask host:port a store query over a connection of our own: a CHECK of one key
// (query 4, a count and a length-prefixed key), answered by one byte, 0 or 1. Retries the
// connection until `deadline`, as the client would; `connected` is set once one is made.
PREFOPT_INLINE void probe_store(const std::string& host, int port, Clock::time_point deadline,
                                std::atomic<bool>& connected) {
  int fd = -1;
  std::string error;
  while (fd < 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    fd = connect_tcp(host, port, std::max(left, std::chrono::milliseconds(1)), &error);
    if (fd >= 0) break;
    if (Clock::now() >= deadline) throw std::runtime_error("no connection: " + error);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  connected = true;
  const std::string key = "prefopt/probe";
  std::string query(1, '\x04');
  const uint64_t count = 1, size = key.size();
  query.append(reinterpret_cast<const char*>(&count), sizeof(count));
  query.append(reinterpret_cast<const char*>(&size), sizeof(size));
  query += key;
  std::string problem;
  if (::send(fd, query.data(), query.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(query.size())) {
    problem = "the query could not be sent";
  } else {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd p{fd, POLLIN, 0};
    unsigned char answer = 0xff;
    if (::poll(&p, 1, static_cast<int>(std::max<int64_t>(left.count(), 1))) != 1) {
      problem = "no answer to a store query";
    } else if (::recv(fd, &answer, 1, 0) != 1) {
      problem = "the connection closed at a store query";
    } else if (answer > 1) {
      problem = "a store query answered with byte " + std::to_string(answer) + ", not 0 or 1";
    }
  }
  ::close(fd);
  if (!problem.empty()) throw std::runtime_error(problem);
}
#endif

// Calls f(fd, inode) for each open socket of this process.
template <typename F>
void for_each_socket(F&& f) {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (const dirent* e = ::readdir(dir)) {
    struct stat st {};
    const int fd = e->d_name[0] == '.' ? -1 : std::atoi(e->d_name);
    if (fd >= 0 && ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) f(fd, st.st_ino);
  }
  ::closedir(dir);
}

// The inodes of this process's open sockets.
PREFOPT_INLINE std::vector<ino_t> socket_inodes() {
  std::vector<ino_t> out;
  for_each_socket([&out](int, ino_t inode) { out.push_back(inode); });
  return out;
}

// Shuts down (without closing) this process's sockets connected to port `port` that are not
// among `before`: a client blocked reading one of them wakes up with an error.
PREFOPT_INLINE void shut_new_sockets(const std::vector<ino_t>& before, int port) {
  for_each_socket([&](int fd, ino_t inode) {
    if (std::find(before.begin(), before.end(), inode) != before.end()) return;
    sockaddr_storage peer{};
    socklen_t len = sizeof(peer);
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) return;
    int peer_port = -1;
    if (peer.ss_family == AF_INET)
      peer_port = ntohs(reinterpret_cast<sockaddr_in*>(&peer)->sin_port);
    if (peer.ss_family == AF_INET6)
      peer_port = ntohs(reinterpret_cast<sockaddr_in6*>(&peer)->sin6_port);
    if (peer_port == port) ::shutdown(fd, SHUT_RDWR);
  });
}

// What the thread that connects to the store and meets the other ranks leaves behind.
struct Meeting {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  std::atomic<bool> connected{false};  // the TCPStore was made
  std::atomic<bool> answered{false};   // and it answered a first query
  c10::intrusive_ptr<c10d::Store> store;
  std::string why;  // meet's verdict
  std::exception_ptr error;
};

// prefopt's meeting at the store, before the backend's: every rank publishes the WORLD_SIZE it
// was told under kWorldKey + rank; rank 0 reads them all and publishes its verdict under
// kVerdictKey ("ok", "differs <rank> <world>" or "missing <ranks>"), which the others wait for
// (and acknowledge under kAckKey).
// A mismatch then fails on every rank, naming it, and a rank that never joins is named at the
// timeout, instead of either surfacing (or hanging) inside the backend's rendezvous.
constexpr const char* kWorldKey = "prefopt/init/world_size/";
constexpr const char* kVerdictKey = "prefopt/init/verdict";
constexpr const char* kAckKey = "prefopt/init/acks";

PREFOPT_INLINE std::vector<uint8_t> to_bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

// Waits until `key` is in `store`, polling with backoff; false once `deadline` passes.
PREFOPT_INLINE bool poll_key(c10d::Store& store, const std::string& key,
                             Clock::time_point deadline) {
  auto pause = std::chrono::milliseconds(1);
  while (!store.check({key})) {
    const auto now = Clock::now();
    if (now >= deadline) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(pause, deadline - now));
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
  return true;
}

// The WORLD_SIZE rank `r` published ("?" when unreadable).
PREFOPT_INLINE std::string world_of(c10d::Store& store, int r) {
  const auto v = store.get(kWorldKey + std::to_string(r));
  std::string s(v.begin(), v.end());
  const bool digits =
      !s.empty() && s.size() < 12 &&
      std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
  return digits ? s : "?";
}

// "rank 2", "ranks 1, 2", or the first 8 of many, for the ranks in [0, world) that have not
// published their WORLD_SIZE.
PREFOPT_INLINE std::string missing_ranks(c10d::Store& store, int world) {
  std::vector<int> missing;
  for (int r = 0; r < world; ++r)
    if (!store.check({kWorldKey + std::to_string(r)})) missing.push_back(r);
  std::ostringstream os;
  os << (missing.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < missing.size() && i < 8; ++i) os << (i ? ", " : "") << missing[i];
  if (missing.size() > 8) os << " and " << missing.size() - 8 << " more";
  return os.str();
}

// After a failing verdict, rank 0 gives the other ranks until `until` to read it (they count
// themselves under kAckKey) before it throws and its store goes away: all of them after a
// mismatch (some may start late), those that joined after a timeout.
PREFOPT_INLINE void await_acks(c10d::Store& store, int world, bool all, Clock::time_point until) {
  int64_t expected = world - 1;
  if (!all) {
    expected = 0;
    for (int r = 1; r < world; ++r) expected += store.check({kWorldKey + std::to_string(r)});
  }
  while (store.add(kAckKey, 0) < expected && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

// The meeting (see kWorldKey) for rank `rank` of `world`, until `deadline`: an empty string
// when every rank joined with the same WORLD_SIZE, else why not. Store failures propagate;
// `answered` is set once the store answered a first query.
PREFOPT_INLINE std::string meet(c10d::Store& store, int rank, int world, Clock::time_point deadline,
                                std::atomic<bool>& answered) {
  const std::string w = std::to_string(world);
  const std::string never =
      " (never started, crashed, or has another MASTER_ADDR or MASTER_PORT; a longer timeout "
      "helps ranks that start slowly)";
  store.set(kWorldKey + std::to_string(rank), to_bytes(w));
  if (!store.check({kWorldKey + std::to_string(rank)}))
    throw std::runtime_error("the key this rank had just set is not there");
  answered = true;
  if (rank == 0) {
    const auto fail = [&](const std::string& verdict, const std::string& why) {
      store.set(kVerdictKey, to_bytes(verdict));
      const bool all = verdict.rfind("differs", 0) == 0;
      await_acks(store, world, all, std::min(deadline, Clock::now() + std::chrono::seconds(5)));
      return why;
    };
    for (int r = 1; r < world; ++r) {
      if (!poll_key(store, kWorldKey + std::to_string(r), deadline)) {
        const std::string m = missing_ranks(store, world);
        return fail("missing " + m, m + " did not join" + never);
      }
      const std::string v = world_of(store, r);
      if (v != w)
        return fail("differs " + std::to_string(r) + " " + v,
                    "the ranks disagree on WORLD_SIZE: rank " + std::to_string(r) + " was told " +
                        v + ", this rank " + w);
    }
    store.set(kVerdictKey, to_bytes("ok"));
    return "";
  }
  const auto decide = [&]() -> std::string {
    if (!poll_key(store, std::string(kWorldKey) + "0", deadline))
      return "rank 0 did not join, though its store answers";
    const std::string v0 = world_of(store, 0);
    if (v0 != w)
      return "the ranks disagree on WORLD_SIZE: rank 0 was told " + v0 + ", this rank " + w;
    if (!poll_key(store, kVerdictKey, deadline))
      return missing_ranks(store, world) + " did not join" + never;
    const auto b = store.get(kVerdictKey);
    const std::string verdict(b.begin(), b.end());
    if (verdict == "ok") return "";
    std::istringstream in(verdict);
    std::string kind, r, v;
    in >> kind >> r >> v;
    if (kind == "differs")
      return "the ranks disagree on WORLD_SIZE: rank " + r + " was told " + v +
             ", rank 0 and this rank " + w;
    return verdict.substr(std::min<size_t>(verdict.size(), 8)) + " did not join" + never;
  };
  const std::string why = decide();
  store.add(kAckKey, 1);
  return why;
}

// The timeout of `group`'s Gloo backend, when it has one.
PREFOPT_INLINE std::optional<std::chrono::milliseconds> gloo_timeout(c10d::ProcessGroup* group) {
  try {
#if PREFOPT_TORCH_VERSION >= 200
    auto backend = group->getBackend(c10::DeviceType::CPU);
    if (auto* gloo = dynamic_cast<c10d::ProcessGroupGloo*>(backend.get()))
      return gloo->getOptions()->timeout;
#else
    if (auto* gloo = dynamic_cast<c10d::ProcessGroupGloo*>(group))
      return gloo->getOptions()->timeout;
#endif
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

PREFOPT_INLINE bool says_timed_out(std::string msg) {
  std::transform(msg.begin(), msg.end(), msg.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return msg.find("timed out") != std::string::npos || msg.find("timeout") != std::string::npos;
}

PREFOPT_INLINE c10::intrusive_ptr<c10d::ProcessGroup> make_gloo(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, const std::string& master,
    std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  // Single-machine jobs talk over loopback; others use GLOO_SOCKET_IFNAME or the address this
  // host's name resolves to, as torch.distributed does.
  const std::string ifname = env_or_empty("GLOO_SOCKET_IFNAME");
  if (!ifname.empty()) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (is_loopback(master)) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
#if PREFOPT_TORCH_VERSION >= 200
  // libtorch 2.x: a ProcessGroup front end dispatching to backends per device type.
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  const auto type = c10d::ProcessGroup::BackendType::GLOO;
  pg->setDefaultBackend(type);
  c10::intrusive_ptr<c10d::Backend> backend = gloo;
  pg->setBackend(c10::DeviceType::CPU, type, backend);
  pg->setBackend(c10::DeviceType::CUDA, type, backend);
  return pg;
#else
  return gloo;
#endif
}

#ifdef PREFOPT_WITH_NCCL
PREFOPT_INLINE c10::intrusive_ptr<c10d::ProcessGroup> make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
    std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#if PREFOPT_TORCH_VERSION >= 200
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  const auto type = c10d::ProcessGroup::BackendType::NCCL;
  pg->setDefaultBackend(type);
  c10::intrusive_ptr<c10d::Backend> backend = nccl;
  pg->setBackend(c10::DeviceType::CUDA, type, backend);
  return pg;
#else
  return nccl;
#endif
}
#endif

}  // namespace dist

PREFOPT_INLINE bool cuda_only(c10d::ProcessGroup* group) {
  return group != nullptr && group->getSize() > 1 && group->getBackendName() == "nccl";
}

PREFOPT_INLINE at::Tensor on_group_device(const at::Tensor& t, c10d::ProcessGroup* group) {
  return cuda_only(group) && !t.is_cuda() ? t.to(at::Device(at::kCUDA)) : t;
}

PREFOPT_INLINE void all_reduce(at::Tensor& tensor, c10d::ProcessGroup* group, c10d::ReduceOp op,
                               const char* what) {
  // This rank's own argument errors, named before any peer waits on the collective (inside it
  // they would read as a dead peer).
  TORCH_CHECK(tensor.defined(), what,
              ": expected a defined tensor to all-reduce, got an undefined one");
  const bool strided = tensor.layout() == at::kStrided;
  TORCH_CHECK(!strided || at::has_internal_overlap(tensor) != at::MemOverlap::Yes, what,
              ": expected a tensor whose elements do not share memory, got shape ", tensor.sizes(),
              " and strides ", tensor.strides(), " (an expand()ed view?)");
  if (group == nullptr || group->getSize() == 1) return;
  TORCH_CHECK(!cuda_only(group) || tensor.is_cuda(), what,
              ": expected a CUDA tensor to all-reduce over an NCCL group, got one on ",
              tensor.device());
  // The backends reduce numel() elements from data_ptr(): a strided view would be reduced
  // wrong and memory outside it overwritten. Reduce a contiguous copy and write it back.
  const bool staged = strided && !tensor.is_contiguous();
  std::vector<at::Tensor> buffers{staged ? tensor.contiguous() : tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = op;
  const auto t0 = dist::Clock::now();
  try {
    group->allreduce(buffers, opts)->wait();
  } catch (const std::exception& e) {
    const std::string msg = dist::first_line(e);
    const int n = group->getSize(), me = group->getRank();
    const auto timeout = dist::gloo_timeout(group);
    // A frozen or hung peer keeps its connections open: only the timeout ends the wait.
    const bool timed_out =
        dist::says_timed_out(msg) || (timeout && dist::Clock::now() - t0 >= *timeout);
    const std::string peer = n == 2 ? "rank " + std::to_string(1 - me) : "a peer";
    std::ostringstream limit;
    limit.precision(3);
    if (timeout) limit << " " << std::chrono::duration<double>(*timeout).count() << " s";
    TORCH_CHECK(!timed_out, what, ": all-reduce over ", n, " ranks failed on rank ", me,
                ": no answer within the", limit.str(), " timeout; ", peer,
                " is frozen or hung, or did not reach this collective: ", msg);
    TORCH_CHECK(false, what, ": all-reduce over ", n, " ranks failed on rank ", me,
                " (a peer died, or did not reach the collective in time): ", msg);
  }
  if (staged) tensor.copy_(buffers[0]);
}

PREFOPT_INLINE void check_no_rank_failed(const char* fn, const std::vector<int>& failed) {
  if (failed.empty()) return;
  std::string ranks;
  for (size_t i = 0; i < failed.size(); ++i) ranks += (i ? ", " : "") + std::to_string(failed[i]);
  TORCH_CHECK(false, fn, ": rank", failed.size() > 1 ? "s " : " ", ranks,
              " rejected its arguments (its error says why); every rank stops before the ",
              "collectives");
}

PREFOPT_INLINE at::Tensor sum_checked(const char* fn, c10d::ProcessGroup* group,
                                      const at::Tensor& stats, int64_t n,
                                      const std::exception_ptr& error, at::Device device) {
  const int world = group == nullptr ? 1 : group->getSize();
  const int rank = group == nullptr ? 0 : group->getRank();
  // [stats (n), failed (world)], each rank's flag in its own slot.
  auto buffer = at::zeros({n + world}, at::TensorOptions(at::kDouble).device(device));
  if (!error) buffer.narrow(0, 0, n).copy_(stats);
  buffer[n + rank] = error ? 1.0 : 0.0;
  buffer = device.is_cuda() ? buffer : on_group_device(buffer, group);  // NCCL meets on CUDA
  try {
    all_reduce(buffer, group, c10d::ReduceOp::SUM, fn);
  } catch (...) {
    if (error) std::rethrow_exception(error);
    throw;
  }
  if (error) std::rethrow_exception(error);
  const auto flags = buffer.narrow(0, n, world).cpu();
  std::vector<int> failed;
  for (int r = 0; r < world; ++r)
    if (flags[r].item<double>() != 0) failed.push_back(r);
  check_no_rank_failed(fn, failed);
  return buffer.narrow(0, 0, n);
}

}  // namespace detail

PREFOPT_INLINE bool has_nccl() {
#ifdef PREFOPT_WITH_NCCL
  return true;
#else
  return false;
#endif
}

PREFOPT_INLINE DistributedContext init_process_group(const ProcessGroupOptions& o) {
  // A peer that dies closes its sockets, and the next write to one raises SIGPIPE, whose
  // default action kills this process before the failure can surface as an error. Python, the
  // usual host of c10d, ignores SIGPIPE; do the same where the host left the default in place.
  struct sigaction pipe_action {};
  if (::sigaction(SIGPIPE, nullptr, &pipe_action) == 0 && pipe_action.sa_handler == SIG_DFL) {
    ::signal(SIGPIPE, SIG_IGN);
  }
  DistributedContext ctx;
  ctx.world_size = detail::dist::env_int("WORLD_SIZE", "world_size", o.world_size(), 1, 1 << 20);
  ctx.rank = detail::dist::env_int("RANK", "rank", o.rank(), 0, 1 << 20);
  TORCH_CHECK(ctx.rank < ctx.world_size, detail::dist::kInit,
              ": expected RANK in [0, WORLD_SIZE = ", ctx.world_size, "), got ", ctx.rank);
  const std::string local = detail::dist::env_or_empty("LOCAL_RANK");
  ctx.local_rank =
      local.empty() ? ctx.rank : detail::dist::env_int("LOCAL_RANK", "", -1, 0, 1 << 20);
  const std::string addr =
      o.master_addr().empty() ? detail::dist::env_or_empty("MASTER_ADDR") : o.master_addr();
  TORCH_CHECK(!addr.empty(), detail::dist::kInit,
              ": environment variable MASTER_ADDR is not set; expected rank 0's host name or "
              "address, or pass ProcessGroupOptions::master_addr");
  const int port = detail::dist::env_int("MASTER_PORT", "master_port", o.master_port(), 1, 65535);
  // At most poll()'s int milliseconds: a longer one ("wait for ever",
  // milliseconds::max()) overflowed the steady clock's nanosecond deadlines here and in
  // libtorch's store, and read as one already past.
  constexpr int64_t kMaxTimeoutMs = std::numeric_limits<int>::max();
  TORCH_CHECK(o.timeout().count() > 0 && o.timeout().count() <= kMaxTimeoutMs, detail::dist::kInit,
              ": expected a timeout in [1, ", kMaxTimeoutMs, "] ms (about 24.8 days), got ",
              o.timeout().count(), " ms");

  DistBackend backend = o.backend();
  detail::check_enum(detail::dist::kInit, "backend", "a DistBackend", backend, DistBackend::kNCCL);
  if (backend == DistBackend::kAuto)
    backend = has_nccl() && detail::cuda_available() ? DistBackend::kNCCL : DistBackend::kGloo;
  TORCH_CHECK(backend != DistBackend::kNCCL || has_nccl(), detail::dist::kInit,
              ": NCCL asked for, but this build of prefopt has no NCCL (it needs a CUDA libtorch "
              "built with NCCL); use DistBackend::kGloo");
  ctx.backend = backend;

  const auto elapsed = [&o](detail::dist::Clock::time_point t0) {
    return detail::dist::took(t0, o.timeout());
  };
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = ctx.rank == 0;
  so.numWorkers = ctx.world_size;
  so.waitWorkers = false;
  so.timeout = o.timeout();
  const std::string where = addr + ":" + std::to_string(port);
  const std::string who =
      "rank " + std::to_string(ctx.rank) + " of " + std::to_string(ctx.world_size);
  // A thread connects to the store and meets the other ranks there; past the deadline (and a
  // grace for the last queries), a client still blocked reading is woken by shutting down its
  // sockets: libtorch's store clients wait for some answers without a timeout, so a listener
  // that is no c10d store, or a frozen master, would otherwise hold this rank forever.
  auto t0 = detail::dist::Clock::now();
  const auto deadline = t0 + o.timeout();
  const auto meeting = std::make_shared<detail::dist::Meeting>();
  const auto before = detail::dist::socket_inodes();
  std::thread helper([meeting, addr, so, rank = ctx.rank, world = ctx.world_size, deadline] {
    std::string why;
    std::exception_ptr error;
    try {
#if PREFOPT_TORCH_VERSION < 200
      if (rank != 0) detail::dist::probe_store(addr, so.port, deadline, meeting->connected);
#endif
      c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(addr, so);
      meeting->store = store;
      meeting->connected = true;
      why = detail::dist::meet(*store, rank, world, deadline, meeting->answered);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(meeting->mutex);
    meeting->why = std::move(why);
    meeting->error = error;
    meeting->done = true;
    meeting->done_cv.notify_all();
  });
  bool stuck = false;
  {
    std::unique_lock<std::mutex> lock(meeting->mutex);
    const auto grace = std::chrono::milliseconds(500);
    if (!meeting->done_cv.wait_until(lock, deadline + grace, [&] { return meeting->done; })) {
      stuck = true;
      for (int i = 0; i < 10 && !meeting->done; ++i) {
        lock.unlock();
        detail::dist::shut_new_sockets(before, port);
        lock.lock();
        meeting->done_cv.wait_for(lock, std::chrono::milliseconds(100),
                                  [&] { return meeting->done; });
      }
    }
  }
  if (meeting->done) {
    helper.join();
  } else {
    // Still blocked, or asleep between connection attempts: it owns what it uses.
    helper.detach();
  }
  const bool connected = meeting->connected, answered = meeting->answered;
  std::string why;
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(meeting->mutex);
    why = meeting->why;
    error = meeting->error;
    if (meeting->done && error == nullptr) ctx.store = meeting->store;
  }
  const auto cause = [&]() -> std::string {
    // Past the deadline the client's error is the one its shut-down socket gave it.
    if (stuck) return connected ? "no answer" : "no connection";
    if (error == nullptr) return "";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      return detail::dist::first_line(e);
    } catch (...) {
      return "unknown error";
    }
  };
  if (error != nullptr || stuck) {
    const std::string msg = cause();
    if (answered)
      TORCH_CHECK(false, detail::dist::kInit, ": ", who, " lost the TCPStore at ", where, " ",
                  elapsed(t0), " (did rank 0 freeze, exit or crash?): ", msg);
    // Connected, or a client that gave up while something takes connections there: a listener
    // that is no c10d store (or a frozen one).
    if (ctx.rank != 0 && (connected || detail::dist::accepts_connections(
                                           addr, port, std::chrono::milliseconds(1000))))
      TORCH_CHECK(false, detail::dist::kInit, ": ", who, ": the listener at ", where,
                  " is not a c10d TCPStore (or its process is frozen): no valid answer to a "
                  "store query ",
                  elapsed(t0), ": ", msg);
    TORCH_CHECK(
        false, detail::dist::kInit, ": ", who,
        ctx.rank == 0 ? " could not host the TCPStore at " : " could not reach the master at ",
        where, " ", elapsed(t0), ": ", msg);
  }
  TORCH_CHECK(why.empty(), detail::dist::kInit, ": ", who, " could not form the group through ",
              where, " ", elapsed(t0), ": ", why);
  t0 = detail::dist::Clock::now();
  try {
#ifdef PREFOPT_WITH_NCCL
    if (backend == DistBackend::kNCCL) {
      ctx.group = detail::dist::make_nccl(ctx.store, ctx.rank, ctx.world_size, o.timeout());
      return ctx;
    }
#endif
    ctx.group = detail::dist::make_gloo(ctx.store, ctx.rank, ctx.world_size, addr, o.timeout());
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false, detail::dist::kInit, ": rank ", ctx.rank, " of ", ctx.world_size,
        " could not form the group through ", addr, ":", port, " ", elapsed(t0),
        " (did every rank start, with the same WORLD_SIZE?): ", detail::dist::first_line(e));
  }
  return ctx;
}

PREFOPT_INLINE void all_reduce_sum(at::Tensor& tensor, c10d::ProcessGroup* group,
                                   const char* what) {
  detail::all_reduce(tensor, group, c10d::ReduceOp::SUM, what);
}

PREFOPT_INLINE at::Tensor update_bco_baseline(BCOBaseline& baseline,
                                              const at::Tensor& chosen_rewards,
                                              const at::Tensor& rejected_rewards,
                                              c10d::ProcessGroup* group) {
  constexpr const char* fn = "prefopt::update_bco_baseline";
  // [m, m², 1] per rank with rewards: the gathered per-rank means' moments, in one collective
  // that a rank with bad arguments joins too (then every rank throws).
  at::Tensor stats;
  std::exception_ptr error;
  try {
    TORCH_CHECK(chosen_rewards.defined() && rejected_rewards.defined(), fn,
                ": expected defined chosen and rejected rewards");
    TORCH_CHECK(chosen_rewards.device() == rejected_rewards.device(), fn,
                ": expected the chosen and rejected rewards on one device, got ",
                chosen_rewards.device(), " and ", rejected_rewards.device());
    const auto all =
        at::cat({chosen_rewards.detach().flatten(), rejected_rewards.detach().flatten()})
            .to(at::kDouble);
    stats = at::zeros({3}, all.options());
    if (all.numel() > 0) {
      const auto m = all.mean();
      stats = at::stack({m, m * m, at::ones({}, all.options())});
    }
  } catch (...) {
    error = std::current_exception();
  }
  const auto device = stats.defined()            ? stats.device()
                      : chosen_rewards.defined() ? chosen_rewards.device()
                                                 : at::Device(at::kCPU);
  const auto s = detail::sum_checked(fn, group, stats, 3, error, device).cpu();
  const double n = s[2].item<double>();
  TORCH_CHECK(n > 0, fn, ": expected rewards on at least one rank, got none");
  const double mean = s[0].item<double>() / n;
  const double var = std::max(0.0, s[1].item<double>() / n - mean * mean);
  baseline.update(mean, var, n);
  return at::scalar_tensor(baseline.mean(), chosen_rewards.options());
}

namespace functional {

PREFOPT_INLINE at::Tensor kto_kl(const at::Tensor& policy_KL_logps,
                                 const at::Tensor& reference_KL_logps, c10d::ProcessGroup* group,
                                 bool by_example) {
  constexpr const char* fn = "prefopt::functional::kto_kl";
  // [Σ, weight, by_example]: the rank's mean with weight 1 (TRL), or its sum with its count,
  // and how many ranks weight by example (ranks that disagree would mix the two forms). A rank
  // with bad arguments joins the collective too (then every rank throws).
  at::Tensor stats;
  std::exception_ptr error;
  try {
    TORCH_CHECK(policy_KL_logps.defined() && reference_KL_logps.defined() &&
                    policy_KL_logps.dim() == 1 &&
                    policy_KL_logps.sizes() == reference_KL_logps.sizes(),
                fn, ": expected two 1-D log-prob tensors of equal size, got ",
                policy_KL_logps.defined() ? policy_KL_logps.sizes() : at::IntArrayRef{}, " and ",
                reference_KL_logps.defined() ? reference_KL_logps.sizes() : at::IntArrayRef{});
    // As the one-rank kto_kl: integer or complex log-probs are not cast silently, and log-probs
    // on two devices are named (not ATen's "Expected all tensors to be on the same device").
    detail::check_floating_logps(fn, "policy_KL_logps", policy_KL_logps);
    detail::check_floating_logps(fn, "reference_KL_logps", reference_KL_logps);
    TORCH_CHECK(policy_KL_logps.device() == reference_KL_logps.device(), fn,
                ": expected policy_KL_logps and reference_KL_logps on one device, got ",
                policy_KL_logps.device(), " and ", reference_KL_logps.device());
    const auto d =
        policy_KL_logps.detach().to(at::kDouble) - reference_KL_logps.detach().to(at::kDouble);
    const double n = static_cast<double>(d.numel());
    stats = at::zeros({3}, d.options());
    if (n > 0)
      stats.narrow(0, 0, 2).copy_(at::stack(
          {by_example ? d.sum() : d.mean(), at::full({}, by_example ? n : 1.0, d.options())}));
    stats[2] = by_example ? 1.0 : 0.0;
  } catch (...) {
    error = std::current_exception();
  }
  const auto device = stats.defined()             ? stats.device()
                      : policy_KL_logps.defined() ? policy_KL_logps.device()
                                                  : at::Device(at::kCPU);
  const auto summed = detail::sum_checked(fn, group, stats, 3, error, device).to(device);
  // Every rank sees the same count, so every rank throws alike.
  const int world = group == nullptr ? 1 : group->getSize();
  const auto by_example_ranks = static_cast<int>(summed[2].item<double>());
  TORCH_CHECK(by_example_ranks == 0 || by_example_ranks == world, fn,
              ": expected the same by_example on every rank, got true on ", by_example_ranks,
              " of ", world, " ranks");
  const auto dt = policy_KL_logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w = summed[1];
  return at::where(w > 0, summed[0] / w.clamp_min(1e-300), at::zeros_like(w)).clamp_min(0).to(dt);
}

}  // namespace functional

PREFOPT_END_NAMESPACE
