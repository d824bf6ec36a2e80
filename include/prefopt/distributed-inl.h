// SPDX-License-Identifier: Apache-2.0
// Process groups from torchrun's environment (Gloo, NCCL), all-reduces, and the cross-rank
// pieces of the losses (bco_pair's baseline, KTO's KL).
#pragma once

#include <prefopt/distributed.h>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef PREFOPT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <sstream>

#include <cerrno>
#include <csignal>
#include <cstdlib>
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

PREFOPT_INLINE void all_reduce(at::Tensor& tensor, c10d::ProcessGroup* group, c10d::ReduceOp op,
                               const char* what) {
  if (group == nullptr || group->getSize() == 1) return;
  std::vector<at::Tensor> buffers{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = op;
  try {
    group->allreduce(buffers, opts)->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, what, ": all-reduce over ", group->getSize(), " ranks failed on rank ",
                group->getRank(),
                " (a peer died, or did not reach the collective in time): ", dist::first_line(e));
  }
  if (!buffers[0].is_same(tensor)) tensor.copy_(buffers[0]);
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
  TORCH_CHECK(o.timeout().count() > 0, detail::dist::kInit, ": expected a positive timeout, got ",
              o.timeout().count(), " ms");

  DistBackend backend = o.backend();
  if (backend == DistBackend::kAuto)
    backend = has_nccl() && detail::cuda_available() ? DistBackend::kNCCL : DistBackend::kGloo;
  TORCH_CHECK(backend != DistBackend::kNCCL || has_nccl(), detail::dist::kInit,
              ": NCCL asked for, but this build of prefopt has no NCCL (it needs a CUDA libtorch "
              "built with NCCL); use DistBackend::kGloo");
  ctx.backend = backend;

  // How long a failed step took, as the error states it: a failure that came before the
  // timeout says after how long, not that the timeout passed.
  const auto elapsed = [&o](std::chrono::steady_clock::time_point t0) {
    const auto took = std::chrono::steady_clock::now() - t0;
    const double s = std::chrono::duration<double>(took).count();
    const double limit = std::chrono::duration<double>(o.timeout()).count();
    std::ostringstream os;
    os.precision(3);
    if (took >= o.timeout()) {
      os << "within the " << limit << " s timeout";
    } else {
      os << "after " << s << " s, before the " << limit << " s timeout";
    }
    return os.str();
  };
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = ctx.rank == 0;
  so.numWorkers = ctx.world_size;
  so.waitWorkers = false;
  so.timeout = o.timeout();
  auto t0 = std::chrono::steady_clock::now();
  try {
    ctx.store = c10::make_intrusive<c10d::TCPStore>(addr, so);
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false, detail::dist::kInit, ": rank ", ctx.rank, " of ", ctx.world_size,
        ctx.rank == 0 ? " could not host the TCPStore at " : " could not reach the master at ",
        addr, ":", port, " ", elapsed(t0), ": ", detail::dist::first_line(e));
  }
  t0 = std::chrono::steady_clock::now();
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
  TORCH_CHECK(chosen_rewards.defined() && rejected_rewards.defined(), fn,
              ": expected defined chosen and rejected rewards");
  const auto all = at::cat({chosen_rewards.detach().flatten(), rejected_rewards.detach().flatten()})
                       .to(at::kDouble);
  // [m, m², 1] per rank with rewards: the gathered per-rank means' moments, in one collective.
  at::Tensor stats = at::zeros({3}, all.options());
  if (all.numel() > 0) {
    const auto m = all.mean();
    stats = at::stack({m, m * m, at::ones({}, all.options())});
  }
  all_reduce_sum(stats, group, fn);
  const auto s = stats.cpu();
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
  TORCH_CHECK(policy_KL_logps.defined() && reference_KL_logps.defined() &&
                  policy_KL_logps.dim() == 1 &&
                  policy_KL_logps.sizes() == reference_KL_logps.sizes(),
              fn, ": expected two 1-D log-prob tensors of equal size, got ",
              policy_KL_logps.defined() ? policy_KL_logps.sizes() : at::IntArrayRef{}, " and ",
              reference_KL_logps.defined() ? reference_KL_logps.sizes() : at::IntArrayRef{});
  const auto dt = policy_KL_logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto d =
      (policy_KL_logps.detach().to(at::kDouble) - reference_KL_logps.detach().to(at::kDouble));
  const double n = static_cast<double>(d.numel());
  // [Σ, weight]: the rank's mean with weight 1 (TRL), or its sum with its count.
  at::Tensor stats = at::zeros({2}, d.options());
  if (n > 0)
    stats = at::stack(
        {by_example ? d.sum() : d.mean(), at::full({}, by_example ? n : 1.0, d.options())});
  all_reduce_sum(stats, group, fn);
  const auto w = stats[1];
  return at::where(w > 0, stats[0] / w.clamp_min(1e-300), at::zeros_like(w)).clamp_min(0).to(dt);
}

}  // namespace functional

PREFOPT_END_NAMESPACE
