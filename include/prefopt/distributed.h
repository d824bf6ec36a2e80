// SPDX-License-Identifier: Apache-2.0
// Distributed training on c10d: a process group from torchrun's environment, all-reduces, KTO's
// KL and bco_pair's baseline across ranks. The vocabulary-parallel ops are in vocab_parallel.h.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_DISTRIBUTED
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/dpo.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

PREFOPT_BEGIN_NAMESPACE

/// The c10d backend of a process group.
enum class DistBackend {
  kAuto,  ///< NCCL when CUDA is available and this build has NCCL, Gloo otherwise
  kGloo,  ///< Gloo: CPU tensors (and CUDA tensors, staged through the host)
  kNCCL,  ///< NCCL: CUDA tensors; needs a CUDA libtorch with NCCL
};

/// Options of `init_process_group`. Unset fields come from torchrun's environment variables.
///
/// Example:
/// ```
/// auto opts = prefopt::ProcessGroupOptions().timeout(std::chrono::seconds(60));
/// ```
struct ProcessGroupOptions {
  /// Backend. Default: kGloo (the CPU backend; ask for kNCCL or kAuto on GPUs).
  TORCH_ARG(DistBackend, backend) = DistBackend::kGloo;
  /// How long to wait for the master's store, for every rank to join, and for any collective
  /// of the group, in [1 ms, 2³¹ − 1 ms] (about 24.8 days). Default: 300 s.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(300);
  /// This process's rank, in [0, world_size); -1: `RANK`.
  TORCH_ARG(int, rank) = -1;
  /// Number of processes, >= 1; -1: `WORLD_SIZE`.
  TORCH_ARG(int, world_size) = -1;
  /// Address of rank 0's TCPStore; empty: `MASTER_ADDR`.
  TORCH_ARG(std::string, master_addr) = "";
  /// Port of rank 0's TCPStore, in [1, 65535]; -1: `MASTER_PORT`.
  TORCH_ARG(int, master_port) = -1;
};

/// A process group and what it was made of.
struct DistributedContext {
  c10::intrusive_ptr<c10d::ProcessGroup> group;  ///< pass `group.get()` to prefopt's functions
  c10::intrusive_ptr<c10d::Store> store;         ///< the TCPStore the ranks met at
  int rank = 0;                                  ///< this process's rank
  int world_size = 1;                            ///< the number of ranks
  /// `LOCAL_RANK` (the GPU index under torchrun), or `rank` when unset. With NCCL, make
  /// `cuda:local_rank` the current device before the first collective.
  int local_rank = 0;
  DistBackend backend = DistBackend::kGloo;  ///< the backend the group uses
};

/// Creates a process group the way torchrun's workers do: rank 0 hosts a TCPStore at
/// `MASTER_ADDR:MASTER_PORT`, every rank connects and the backend forms its mesh through it.
///
/// A process that keeps the default SIGPIPE action gets it ignored (as Python does), so that a
/// peer that dies mid-collective gives an error on this rank instead of killing it.
///
/// Before the backend's rendezvous, the ranks meet at the store: each publishes the
/// `WORLD_SIZE` it was told, rank 0 checks them all and publishes its verdict.
///
/// Errors (TORCH_CHECKs naming this function): a missing or malformed `RANK`, `WORLD_SIZE`,
/// `MASTER_ADDR` or `MASTER_PORT`, or an option outside its variable's range (a port in
/// [1, 65535], a timeout in [1, 2³¹ − 1] ms); a rank outside [0, WORLD_SIZE); an unreachable
/// master, a rank that never joins (named), or a listener on the master port that is not a c10d
/// store (or is frozen), within `timeout` (and half a second); ranks told different `WORLD_SIZE`s,
/// on every rank that joined, at once; a failure that comes before the timeout says after how long,
/// and its cause; NCCL asked for in a build without it.
///
/// Example (two CPU processes on one machine):
/// ```
/// // RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 ./train &
/// // RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 ./train
/// auto dist = prefopt::init_process_group();
/// auto m = metrics.compute(dist.group.get());
/// ```
PREFOPT_API DistributedContext init_process_group(const ProcessGroupOptions& options = {});

/// Whether this build can create NCCL process groups.
PREFOPT_API bool has_nccl();

namespace detail {
/// `tensor` reduced with `op` over the ranks of `group`, in place (nothing to reduce for one
/// rank or no group, the argument checks still made), with the checks and staging of
/// `all_reduce_sum`; a failure is a c10::Error naming `what`.
void all_reduce(at::Tensor& tensor, c10d::ProcessGroup* group, c10d::ReduceOp op, const char* what);
/// Whether `group`'s collectives take CUDA tensors only (NCCL, more than one rank).
bool cuda_only(c10d::ProcessGroup* group);
/// `t`, moved to the current CUDA device where `group` takes CUDA tensors only (the host sets
/// each rank's current device to its own GPU, as torch's NCCL convention asks).
at::Tensor on_group_device(const at::Tensor& t, c10d::ProcessGroup* group);
/// Throws "`fn`: rank(s) … rejected its arguments" where `failed` (the ranks whose own checks
/// failed, as every rank learnt from a collective) is not empty.
void check_no_rank_failed(const char* fn, const std::vector<int>& failed);
/// Sums the `n` doubles of `stats` over `group` beside one failure flag per rank, so a rank
/// whose own checks failed (`error`; `stats` then unused) still joins the collective: it
/// rethrows its error and the others name it, where they would otherwise wait for it until
/// the timeout. `device`: the inputs' device, where an NCCL group meets. Returns the sums.
at::Tensor sum_checked(const char* fn, c10d::ProcessGroup* group, const at::Tensor& stats,
                       int64_t n, const std::exception_ptr& error, at::Device device);
}  // namespace detail

/// Sums `tensor` over the ranks of `group`, in place (nothing to reduce for one rank or no
/// group; the argument checks below still apply).
/// Any view works: a non-contiguous one is reduced through a contiguous copy and written back
/// (the backends reduce `numel()` elements from `data_ptr()`, which for a strided view would
/// be wrong and would overwrite memory outside it). This rank's argument errors are named
/// before the collective: an undefined tensor, one whose elements share memory (`expand()`),
/// a non-CUDA tensor for an NCCL group.
///
/// Waits for the result. With Gloo, a dead peer, or a frozen one at the group's timeout,
/// surfaces as a c10::Error naming `what` and the cause. With NCCL, `wait()` only orders the
/// current CUDA stream after the collective, and a frozen peer is found by NCCL's watchdog at
/// the timeout: with `TORCH_NCCL_ASYNC_ERROR_HANDLING` (`NCCL_ASYNC_ERROR_HANDLING` in older
/// libtorch; on by default in libtorch 2.x) it ends the process instead of raising, and where
/// that is off, reading the result waits for good. Set `TORCH_NCCL_BLOCKING_WAIT=1`
/// (`NCCL_BLOCKING_WAIT` in libtorch 1.13) for a blocking `wait()` that throws at the timeout:
/// then it surfaces as the c10::Error above.
PREFOPT_API void all_reduce_sum(at::Tensor& tensor, c10d::ProcessGroup* group, const char* what);

/// The bco_pair baseline update of TRL ≤ 0.28 across ranks: every rank's mean of this step's
/// β·ρ_c and β·ρ_r is gathered, and the baseline folds in their mean, (biased) variance and
/// count, as `RunningMoments.update` does after `accelerator.gather`. One collective (for an
/// NCCL group on the rewards' CUDA device, or the current one for CPU rewards). A rank without
/// rewards contributes nothing. A rank whose arguments fail their checks joins the collective
/// and then throws its error; the others throw `rank r rejected its arguments`, and the
/// baseline is left as it was. Returns δ (0-dim, on the rewards' device), the same on every
/// rank.
///
/// Example:
/// ```
/// auto delta = prefopt::update_bco_baseline(baseline, r.chosen_rewards, r.rejected_rewards,
///                                           dist.group.get());
/// ```
PREFOPT_API at::Tensor update_bco_baseline(BCOBaseline& baseline, const at::Tensor& chosen_rewards,
                                           const at::Tensor& rejected_rewards,
                                           c10d::ProcessGroup* group);

namespace functional {

/// KTO's KL estimate over the ranks of `group`, as TRL computes it: each rank's
/// mean(policy_KL − reference_KL), averaged over the ranks, then clamped at 0; detached, the
/// same on every rank. `by_example = true` weights ranks by their number of KL examples
/// instead (the KL of the concatenated batch); it must be the same on every rank (else every
/// rank throws, naming how many ranks passed true). A rank with no KL examples contributes
/// nothing; none anywhere gives 0. One collective (for an NCCL group on the inputs' CUDA
/// device, or the current one for CPU inputs; the result is on the inputs' device), which a
/// rank with bad arguments joins too: it throws its error, the others `rank r rejected its
/// arguments`. Pass the result as `KTOInputs::kl`.
///
/// Example:
/// ```
/// auto kl = F::kto_kl(policy_KL_logps, reference_KL_logps, dist.group.get());
/// auto r = F::kto_loss(inputs.kl(kl), opts);
/// ```
PREFOPT_API at::Tensor kto_kl(const at::Tensor& policy_KL_logps,
                              const at::Tensor& reference_KL_logps, c10d::ProcessGroup* group,
                              bool by_example = false);

}  // namespace functional

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_DISTRIBUTED
#undef PREFOPT_OUTERMOST_DISTRIBUTED
#include <prefopt/detail/header_only.h>
#endif
