// SPDX-License-Identifier: Apache-2.0
#include <prefopt/distributed.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef PREFOPT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <signal.h>

#include <algorithm>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <string>
#include "rows.h"

PREFOPT_BEGIN_NAMESPACE

namespace {

constexpr const char* kInit = "prefopt::init_process_group";

// The first line of a c10::Error: the message without libtorch's C++ backtrace.
std::string first_line(const std::exception& e) {
  std::string msg = e.what();
  if (const auto* err = dynamic_cast<const c10::Error*>(&e)) msg = err->what_without_backtrace();
  const auto nl = msg.find('\n');
  return nl == std::string::npos ? msg : msg.substr(0, nl);
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// An integer from the environment, or `fallback` when the option already gave one.
int env_int(const char* name, int fallback, int lo, int hi) {
  if (fallback >= 0) return fallback;
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

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int world, const std::string& master,
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
c10::intrusive_ptr<c10d::ProcessGroup> make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int world,
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

void run_allreduce(at::Tensor& tensor, c10d::ProcessGroup* group, c10d::ReduceOp op,
                   const char* what) {
  std::vector<at::Tensor> buffers{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = op;
  try {
    group->allreduce(buffers, opts)->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, what, ": all-reduce over ", group->getSize(), " ranks failed on rank ",
                group->getRank(),
                " (a peer died, or did not reach the collective in time): ", first_line(e));
  }
  if (!buffers[0].is_same(tensor)) tensor.copy_(buffers[0]);
}

}  // namespace

bool has_nccl() {
#ifdef PREFOPT_WITH_NCCL
  return true;
#else
  return false;
#endif
}

DistributedContext init_process_group(const ProcessGroupOptions& o) {
  // A peer that dies closes its sockets, and the next write to one raises SIGPIPE, whose
  // default action kills this process before the failure can surface as an error. Python, the
  // usual host of c10d, ignores SIGPIPE; do the same where the host left the default in place.
  struct sigaction pipe_action {};
  if (::sigaction(SIGPIPE, nullptr, &pipe_action) == 0 && pipe_action.sa_handler == SIG_DFL) {
    ::signal(SIGPIPE, SIG_IGN);
  }
  DistributedContext ctx;
  ctx.world_size = env_int("WORLD_SIZE", o.world_size(), 1, 1 << 20);
  ctx.rank = env_int("RANK", o.rank(), 0, 1 << 20);
  TORCH_CHECK(ctx.rank < ctx.world_size, kInit,
              ": expected RANK in [0, WORLD_SIZE = ", ctx.world_size, "), got ", ctx.rank);
  const std::string local = env_or_empty("LOCAL_RANK");
  ctx.local_rank = local.empty() ? ctx.rank : env_int("LOCAL_RANK", -1, 0, 1 << 20);
  const std::string addr = o.master_addr().empty() ? env_or_empty("MASTER_ADDR") : o.master_addr();
  TORCH_CHECK(!addr.empty(), kInit,
              ": environment variable MASTER_ADDR is not set; expected rank 0's host name or "
              "address, or pass ProcessGroupOptions::master_addr");
  const int port = env_int("MASTER_PORT", o.master_port(), 1, 65535);
  TORCH_CHECK(o.timeout().count() > 0, kInit, ": expected a positive timeout, got ",
              o.timeout().count(), " ms");

  DistBackend backend = o.backend();
  if (backend == DistBackend::kAuto)
    backend = has_nccl() && detail::cuda_available() ? DistBackend::kNCCL : DistBackend::kGloo;
  TORCH_CHECK(backend != DistBackend::kNCCL || has_nccl(), kInit,
              ": NCCL asked for, but this build of prefopt has no NCCL (it needs a CUDA libtorch "
              "built with NCCL); use DistBackend::kGloo");
  ctx.backend = backend;

  const double seconds = static_cast<double>(o.timeout().count()) / 1000.0;
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = ctx.rank == 0;
  so.numWorkers = ctx.world_size;
  so.waitWorkers = false;
  so.timeout = o.timeout();
  try {
    ctx.store = c10::make_intrusive<c10d::TCPStore>(addr, so);
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false, kInit, ": rank ", ctx.rank, " of ", ctx.world_size,
        ctx.rank == 0 ? " could not host the TCPStore at " : " could not reach the master at ",
        addr, ":", port, " within ", seconds, " s: ", first_line(e));
  }
  try {
#ifdef PREFOPT_WITH_NCCL
    if (backend == DistBackend::kNCCL) {
      ctx.group = make_nccl(ctx.store, ctx.rank, ctx.world_size, o.timeout());
      return ctx;
    }
#endif
    ctx.group = make_gloo(ctx.store, ctx.rank, ctx.world_size, addr, o.timeout());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, kInit, ": rank ", ctx.rank, " of ", ctx.world_size,
                " could not form the group through ", addr, ":", port, " within ", seconds,
                " s (did every rank start, with the same WORLD_SIZE?): ", first_line(e));
  }
  return ctx;
}

void all_reduce_sum(at::Tensor& tensor, c10d::ProcessGroup* group, const char* what) {
  if (group == nullptr || group->getSize() == 1) return;
  run_allreduce(tensor, group, c10d::ReduceOp::SUM, what);
}

at::Tensor update_bco_baseline(BCOBaseline& baseline, const at::Tensor& chosen_rewards,
                               const at::Tensor& rejected_rewards, c10d::ProcessGroup* group) {
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

at::Tensor kto_kl(const at::Tensor& policy_KL_logps, const at::Tensor& reference_KL_logps,
                  c10d::ProcessGroup* group, bool by_example) {
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

// ------------------------------------------------------------------ vocabulary-parallel gather

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Scored positions of a [B, T] label tensor, with the causal shift applied.
struct Positions {
  at::Tensor b, t;                // [N] int64 batch row and logits position of each scored token
  at::Tensor label;               // [N] int64 global label
  int64_t batch = 0, length = 0;  // B and the number of scored positions per row (T or T − 1)
};

Positions scored_positions(const char* fn, const at::Tensor& labels,
                           const VocabParallelOptions& o) {
  TORCH_CHECK(labels.defined() && labels.dim() == 2 &&
                  (labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt),
              fn, ": expected labels [B, T] of int64 or int32, got ",
              labels.defined() ? labels.sizes() : at::IntArrayRef{});
  Positions p;
  p.batch = labels.size(0);
  at::Tensor y = labels.to(at::kLong);
  if (o.shift()) y = y.size(1) > 0 ? y.narrow(1, 1, y.size(1) - 1) : y;
  p.length = y.size(1);
  const auto flat = y.reshape({-1});
  const auto idx = flat.ne(o.ignore_index()).nonzero().reshape({-1});
  p.label = flat.index_select(0, idx);
  TORCH_CHECK(p.label.numel() == 0 || p.label.min().item<int64_t>() >= 0, fn,
              ": expected labels >= 0 or ignore_index (", o.ignore_index(), "), got ",
              p.label.min().item<int64_t>());
  p.b = idx.div(std::max<int64_t>(p.length, 1), "floor");
  p.t = idx.remainder(std::max<int64_t>(p.length, 1));
  return p;
}

int64_t chunk_rows(int64_t cols, int64_t bytes) {
  return std::max<int64_t>(1, bytes / (4 * std::max<int64_t>(cols, 1)));
}

// Every scored label must be owned by exactly one rank.
void check_owners(const char* fn, const at::Tensor& owners) {
  const auto bad = owners.ne(1);
  if (!bad.any().item<bool>()) return;
  const auto first = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(false, fn, ": expected every label to fall in exactly one rank's vocabulary slice; ",
              bad.sum().item<int64_t>(), " scored tokens do not (the first is owned by ",
              owners[first].item<double>(),
              " ranks): labels >= V, or vocab_start values that overlap or leave gaps");
}

struct Reduced {
  at::Tensor logp, lse;  // [N]: global log-probs and logsumexps
};

// Both forms: each rank's per-token logsumexp over its columns (lse_r) and log-prob of the
// labels it owns (logp_r) become global ones. lse_r plays the role of a max:
// M = max_r lse_r, LSE = M + log Σ_r exp(lse_r − M), log p(y) = (z_y − M) − log Σ_r exp(lse_r − M),
// z_y − M = logp_r + lse_r − M on the owning rank. One MAX and one packed SUM all-reduce.
Reduced reduce_over_ranks(const char* fn, const at::Tensor& lse_local, const at::Tensor& logp_local,
                          const at::Tensor& owned, c10d::ProcessGroup* group) {
  if (lse_local.numel() == 0) return {logp_local, lse_local};  // labels agree: none anywhere
  at::Tensor global_max = lse_local.clone();
  if (group != nullptr && group->getSize() > 1)
    run_allreduce(global_max, group, c10d::ReduceOp::MAX, fn);
  const auto own = owned.to(lse_local.scalar_type());
  at::Tensor packed = at::stack(
      {(lse_local - global_max).exp(), (logp_local + (lse_local - global_max)) * own, own});
  all_reduce_sum(packed, group, fn);
  check_owners(fn, packed[2]);
  const auto log_sum = packed[0].log();
  return {packed[1] - log_sum, global_max + log_sum};
}

// The hidden-state form's forward: `logits_chunk(i, c)` gives rows [i, i + c) of this rank's
// logits in the compute dtype.
template <typename LogitsChunk>
Reduced shard_logprobs(const char* fn, const at::Tensor& local, int64_t rows,
                       const at::TensorOptions& opts, c10d::ProcessGroup* group,
                       const LogitsChunk& logits_chunk) {
  const int64_t n = local.numel();
  at::Tensor lse = at::empty({n}, opts), logp = at::empty({n}, opts);
  at::Tensor owned = at::empty({n}, opts.dtype(at::kBool));
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t c = std::min(rows, n - i);
    const auto z = logits_chunk(i, c);
    const int64_t v = z.size(1);
    const auto li = local.narrow(0, i, c);
    const auto l = z.logsumexp(1);
    lse.narrow(0, i, c).copy_(l);
    logp.narrow(0, i, c).copy_(
        z.gather(1, li.clamp(0, std::max<int64_t>(v - 1, 0)).unsqueeze(1)).squeeze(1) - l);
    owned.narrow(0, i, c).copy_(li.ge(0).logical_and(li.lt(v)));
  }
  return reduce_over_ranks(fn, lse, logp, owned, group);
}

// d log p(y) / d z_v = 1[v = y] − softmax_v over this rank's columns, softmax from the global
// logsumexp, times the upstream gradient: z [c, V_local], lse, g, local [c].
at::Tensor logit_grad(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& g,
                      const at::Tensor& local) {
  auto gz = (z - lse.unsqueeze(1)).exp_().mul_(g.unsqueeze(1)).neg_();
  const auto owned = local.ge(0).logical_and(local.lt(z.size(1))).nonzero().reshape({-1});
  gz.index_put_({owned, local.index_select(0, owned)}, g.index_select(0, owned),
                /*accumulate=*/true);
  return gz;
}

// The logits form runs on the gathering op's row kernels (src/rows.h) for lse_r and logp_r.
struct VocabParallelLogitsFunction : public torch::autograd::Function<VocabParallelLogitsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& b,
                               const at::Tensor& t, const at::Tensor& local, int64_t chunk_bytes,
                               c10d::ProcessGroup* group) {
    constexpr const char* fn = "prefopt::functional::vocab_parallel_gather_logprobs";
    const int64_t v = logits.size(2);
    const auto owned = local.ge(0).logical_and(local.lt(v));
    const auto r = detail::rows_forward(
        logits, detail::Rows{b, t, local.clamp(0, std::max<int64_t>(v - 1, 0)), {}}, 0,
        GatherBackend::kAuto, chunk_bytes);
    const auto red = reduce_over_ranks(fn, r.lse, r.logp, owned, group);
    // Non-owned rows get no one-hot term in backward.
    ctx->save_for_backward(
        {logits, b, t, at::where(owned, local, at::full_like(local, -1)), red.lse});
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    return {red.logp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto g = grads[0].to(saved[4].scalar_type()).contiguous();
    at::Tensor grad =
        at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
    detail::advise_huge_pages(grad);
    detail::rows_backward(logits, detail::Rows{saved[1], saved[2], saved[3], {}}, saved[4], g,
                          GatherBackend::kAuto, ctx->saved_data["chunk_bytes"].toInt(), grad);
    return {grad, {}, {}, {}, {}, {}};
  }
};

struct VocabParallelHeadFunction : public torch::autograd::Function<VocabParallelHeadFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden,
                               const at::Tensor& weight, const at::Tensor& b, const at::Tensor& t,
                               const at::Tensor& local, int64_t rows, c10d::ProcessGroup* group) {
    constexpr const char* fn = "prefopt::functional::vocab_parallel_fused_logprobs";
    const auto dt = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto r = shard_logprobs(fn, local, rows, hidden.options().dtype(dt), group,
                            [&](int64_t i, int64_t c) {
                              const auto h = hidden.index({b.narrow(0, i, c), t.narrow(0, i, c)});
                              return at::matmul(h, weight.t()).to(dt);
                            });
    ctx->save_for_backward({hidden, weight, b, t, local, r.lse});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    return {r.logp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* fn = "prefopt::functional::vocab_parallel_fused_logprobs (backward)";
    const auto saved = ctx->get_saved_variables();
    const auto &hidden = saved[0], &weight = saved[1], &b = saved[2], &t = saved[3],
               &local = saved[4], &lse = saved[5];
    const int64_t rows = ctx->saved_data["rows"].toInt();
    auto* group = reinterpret_cast<c10d::ProcessGroup*>(ctx->saved_data["group"].toInt());
    const auto dt = lse.scalar_type();
    const auto g = grads[0].to(dt);
    const int64_t n = b.numel();
    at::Tensor dw = at::zeros(weight.sizes(), weight.options().dtype(dt));
    at::Tensor dh_rows = at::empty({n, hidden.size(2)}, hidden.options().dtype(dt));
    for (int64_t i = 0; i < n; i += rows) {
      const int64_t c = std::min(rows, n - i);
      const auto h = hidden.index({b.narrow(0, i, c), t.narrow(0, i, c)});
      const auto gz = logit_grad(at::matmul(h, weight.t()).to(dt), lse.narrow(0, i, c),
                                 g.narrow(0, i, c), local.narrow(0, i, c));
      dw.addmm_(gz.t(), h.to(dt));
      dh_rows.narrow(0, i, c).copy_(at::matmul(gz.to(weight.scalar_type()), weight).to(dt));
    }
    // Each rank's dh covers its vocabulary slice only; the full gradient is their sum.
    all_reduce_sum(dh_rows, group, fn);
    at::Tensor dh = at::zeros(hidden.sizes(), hidden.options());
    dh.index_put_({b, t}, dh_rows.to(hidden.scalar_type()));
    return {dh, dw.to(weight.scalar_type()), {}, {}, {}, {}, {}};
  }
};

// Per-sequence results from the per-token log-probs of the scored positions.
SequenceLogprobs assemble(const Positions& p, const at::Tensor& logp,
                          const VocabParallelOptions& o) {
  SequenceLogprobs out;
  const auto opts = logp.options();
  out.sum = at::zeros({p.batch}, opts).index_add(0, p.b, logp);
  out.count = at::bincount(p.b, {}, p.batch).to(at::kLong);
  out.mean = out.sum / out.count.clamp_min(1).to(opts.dtype());
  if (o.with_token_logps()) {
    const auto flat = p.b * p.length + p.t;
    out.token_logps =
        at::zeros({p.batch * p.length}, opts).index_put({flat}, logp).reshape({p.batch, p.length});
    out.token_mask = at::zeros({p.batch * p.length}, opts.dtype(at::kBool))
                         .index_fill_(0, flat, true)
                         .reshape({p.batch, p.length});
  }
  return out;
}

void check_common(const char* fn, const VocabParallelOptions& o) {
  TORCH_CHECK(o.vocab_start() >= 0, fn, ": expected vocab_start >= 0, got ", o.vocab_start());
  TORCH_CHECK(o.chunk_bytes() > 0, fn, ": expected chunk_bytes > 0, got ", o.chunk_bytes());
}

}  // namespace

SequenceLogprobs vocab_parallel_gather_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                                c10d::ProcessGroup* group,
                                                const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_gather_logprobs";
  check_common(fn, o);
  TORCH_CHECK(logits.defined() && logits.dim() == 3 && at::isFloatingType(logits.scalar_type()), fn,
              ": expected floating logits [B, T, V_local], got ",
              logits.defined() ? logits.sizes() : at::IntArrayRef{});
  TORCH_CHECK(labels.defined() && labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1),
              fn, ": expected labels [B, T] = ", logits.sizes().slice(0, 2), ", got ",
              labels.defined() ? labels.sizes() : at::IntArrayRef{});
  const auto p = scored_positions(fn, labels.to(logits.device()), o);
  const auto local = p.label - o.vocab_start();
  const auto logp =
      VocabParallelLogitsFunction::apply(logits, p.b, p.t, local, o.chunk_bytes(), group)[0];
  return assemble(p, logp, o);
}

SequenceLogprobs vocab_parallel_fused_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, c10d::ProcessGroup* group,
                                               const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_fused_logprobs";
  check_common(fn, o);
  TORCH_CHECK(hidden.defined() && hidden.dim() == 3 && at::isFloatingType(hidden.scalar_type()), fn,
              ": expected floating hidden states [B, T, H], got ",
              hidden.defined() ? hidden.sizes() : at::IntArrayRef{});
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(1) == hidden.size(2) &&
                  weight.scalar_type() == hidden.scalar_type(),
              fn, ": expected weight [V_local, H = ", hidden.size(2), "] of dtype ",
              hidden.scalar_type(), ", got ", weight.defined() ? weight.sizes() : at::IntArrayRef{},
              " of ", weight.defined() ? weight.scalar_type() : at::ScalarType::Undefined);
  TORCH_CHECK(labels.defined() && labels.dim() == 2 && labels.size(0) == hidden.size(0) &&
                  labels.size(1) == hidden.size(1),
              fn, ": expected labels [B, T] = ", hidden.sizes().slice(0, 2), ", got ",
              labels.defined() ? labels.sizes() : at::IntArrayRef{});
  const auto p = scored_positions(fn, labels.to(hidden.device()), o);
  const auto local = p.label - o.vocab_start();
  const auto logp = VocabParallelHeadFunction::apply(
      hidden, weight, p.b, p.t, local, chunk_rows(weight.size(0), o.chunk_bytes()), group)[0];
  return assemble(p, logp, o);
}

}  // namespace functional

PREFOPT_END_NAMESPACE
