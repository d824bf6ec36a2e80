// SPDX-License-Identifier: Apache-2.0
// Internal: what the gathering op and the fused LM-head op share. Selection of the scored rows
// (labels or completion mask, shift, packed boundaries, input checks), per-row log-probs and
// statistics over rows of logits (CPU row kernels or chunked ATen), their gradient, and the
// reduction of row results to per-sequence ones.
#pragma once

#include <ATen/core/ivalue.h>
#include <prefopt/fused_logprobs.h>
#include <prefopt/logprobs.h>

#include <cstdint>
#include <vector>

PREFOPT_BEGIN_NAMESPACE
namespace detail {

/// Scored rows: every token that gets a log-prob, flattened.
struct Rows {
  at::Tensor b, t;    ///< [n] int64: the logits row is logits[b, t]
  at::Tensor target;  ///< [n] int64: the label it scores
  at::Tensor seq;     ///< [n] int64: the sequence it belongs to
};

/// Per-row results, [n] each; statistics are empty tensors unless their flag was set.
struct RowResults {
  at::Tensor logp, lse, logit_mean, correct, entropy, log_sum_p2;
};

/// Which scored rows a batch has, and how they map to sequences.
struct Selection {
  Rows rows;
  int64_t S = 0;       ///< number of sequences
  at::Tensor scored;   ///< bool, [B, T'] (padded) or [N] (packed): the scored positions
  at::Tensor seq_of;   ///< packed only: [N] sequence of each position
  at::Tensor lengths;  ///< packed only: [S] sequence lengths
};

/// The accumulation dtype: fp64 for fp64 inputs, fp32 otherwise.
inline at::ScalarType acc_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

/// RowFlags (src/row_common.h) for the statistics asked for.
unsigned stat_flags(bool logits_mean, bool accuracy, bool entropy, bool wpo);

/// `fn: expected <what> ...` checks shared by the public functions. `ref_name`/`ref` name the
/// tensor whose shape and device the labels must follow (the logits, or the hidden states).
void check_floating(const char* fn, const char* what, const at::Tensor& x);
at::Tensor check_labels(const char* fn, const at::Tensor& labels, const char* what,
                        at::IntArrayRef expected, const char* ref_name, const at::Tensor& ref);
at::Tensor check_mask(const char* fn, const at::Tensor& mask, at::IntArrayRef expected,
                      const char* ref_name, const at::Tensor& ref);

/// A `V` for select_padded that leaves the range of the labels to the caller: the
/// vocabulary-parallel ops learn V from the ranks, after the selection.
constexpr int64_t kVocabularyUnknown = -1;

/// Padded batch [B, T]: `labels_in` (and the completion mask, if given) select the rows; scored
/// labels must lie in [0, V) (unchecked for kVocabularyUnknown).
Selection select_padded(const char* fn, const at::Tensor& ref, const char* ref_name, int64_t B,
                        int64_t T, int64_t V, const at::Tensor& labels_in,
                        const at::Tensor* mask_in, bool shift, int64_t ignore_index);

/// Packed batch of N positions with boundaries `cu_seqlens`; the shift stays inside sequences.
Selection select_packed(const char* fn, const at::Tensor& ref, const char* ref_name, int64_t N,
                        int64_t V, const at::Tensor& labels_in, const at::Tensor* mask_in,
                        const at::Tensor& cu_seqlens, bool shift, int64_t ignore_index);

/// Uninitialised results for n rows (statistics only where `flags` asks), in options `f`.
RowResults alloc_row_results(int64_t n, unsigned flags, const at::TensorOptions& f);

/// Views of rows [s, e) of `r`.
RowResults slice_rows(const RowResults& r, int64_t s, int64_t e);

/// Log-probs and statistics of `rows` of `logits` [B, T, V] (any strides), written into `out`
/// (contiguous [n] tensors, e.g. slices of alloc_row_results).
void rows_forward_into(const at::Tensor& logits, const Rows& rows, unsigned flags,
                       GatherBackend backend, int64_t chunk_bytes, RowResults& out);

/// rows_forward_into() into freshly allocated results.
RowResults rows_forward(const at::Tensor& logits, const Rows& rows, unsigned flags,
                        GatherBackend backend, int64_t chunk_bytes);

/// Writes every element of `grad` (same shape as `logits`, contiguous, uninitialised):
/// `g_i · (onehot(target_i) − softmax(row_i))` on the scored rows, zeros elsewhere. A target
/// of −1 has no one-hot term (the fused op's vocabulary blocks that do not hold it). With
/// `g_ent` defined (the upstream gradient of each row's entropy, `ent`), also the entropy's
/// `−g_ent_i · p_v · (log p_v + ent_i)`. `grad` may be `logits` itself (in place) when both
/// are contiguous.
void rows_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse,
                   const at::Tensor& g, const at::Tensor& g_ent, const at::Tensor& ent,
                   GatherBackend backend, int64_t chunk_bytes, at::Tensor& grad);

/// The per-row upstream gradients of a row op's log-probs and entropies, in the dtype of
/// `lse`: `g` is defined when either is (zeros for undefined log-prob gradients), `g_ent`
/// only when the entropies' is. Neither: nothing flows back.
struct RowUpstream {
  at::Tensor g, g_ent;
};
RowUpstream row_upstream(const at::Tensor& g_logp, const at::Tensor& g_ent, const at::Tensor& lse);

/// The statistics of `r` that carry no gradient: all but the entropies, when `flags` asked for
/// them (their gradient is rows_backward's entropy term).
std::vector<at::Tensor> detached_statistics(const RowResults& r, unsigned flags);

/// `x.slice(0, s, e)`, or `x` when undefined.
at::Tensor slice_or_undefined(const at::Tensor& x, int64_t s, int64_t e);

/// Vocabulary mean of every row of `logits` [B, T, V] → [B, T], in the accumulation dtype.
at::Tensor all_row_means(const at::Tensor& logits, GatherBackend backend, int64_t chunk_bytes);

/// Per-sequence results from per-row ones: `logp` (differentiable), and the statistics of
/// `stats` as the flags say. `acc` is the result dtype.
SequenceLogprobs assemble(const Selection& sel, const at::Tensor& logp, const RowResults& stats,
                          unsigned flags, bool with_token_logps, at::ScalarType acc);

/// Asks for huge pages on a large new CPU buffer (see cpu::advise_huge_pages).
void advise_huge_pages(const at::Tensor& fresh);

/// What the vocabulary-parallel ops (vocab_parallel.h) add to the single-device ones: the
/// reduction of this rank's per-row results over the ranks that hold the other vocabulary
/// slices. The autograd graph holds it, and with it the process group, for as long as backward
/// needs it.
struct CrossRank : torch::CustomClassHolder {
  /// `lse` and `logp` [n] over this rank's slice (`logp` valid where `owned`: the label lies in
  /// the slice) become the global ones, in place; every label must have exactly one owner.
  virtual void reduce_rows(at::Tensor& lse, at::Tensor& logp, const at::Tensor& owned) = 0;
  /// Sums `t` over the ranks, in place.
  virtual void sum(at::Tensor& t) = 0;
};
using CrossRankPtr = c10::intrusive_ptr<CrossRank>;

/// The hook as an IValue for an autograd context's saved_data (a capsule), and back.
inline c10::IValue cross_rank_ivalue(const CrossRankPtr& cross) {
  return cross ? c10::IValue::make_capsule(cross) : c10::IValue();
}
inline CrossRankPtr cross_rank_of(const c10::IValue& v) {
  return v.isCapsule() ? c10::static_intrusive_pointer_cast<CrossRank>(v.toCapsule())
                       : CrossRankPtr();
}

/// Targets of a vocabulary slice of `V` columns: valid indices for the forward pass (labels
/// outside the slice point at column 0, their log-prob unused), the rows that own their label,
/// and the backward targets (−1, no one-hot term, where the label is outside).
struct SliceTargets {
  at::Tensor forward, owned, backward;
};
inline SliceTargets slice_targets(const at::Tensor& target, int64_t V) {
  SliceTargets s;
  s.owned = target.ge(0).logical_and(target.lt(V));
  s.forward = at::where(s.owned, target, at::zeros_like(target));
  s.backward = at::where(s.owned, target, at::full_like(target, -1));
  return s;
}

// The pieces of the single-device ops that the vocabulary-parallel ones reuse (defined in
// logprobs-inl.h and fused_logprobs-inl.h).
namespace gather {
/// `fn`'s checks of logits of rank `dim` ([B, T, V] or [N, V]) and of the options.
void check_logits(const char* fn, const at::Tensor& logits, int64_t dim,
                  const GatherLogprobsOptions& o);
/// The selected rows' log-probs (and statistics) of `logits`, with autograd; `cross` reduces
/// them over the ranks (vocabulary-parallel), or is null. `fn` names the op in backward's errors.
SequenceLogprobs gather(const char* fn, const at::Tensor& logits, const Selection& sel,
                        const GatherLogprobsOptions& o, const CrossRankPtr& cross);
}  // namespace gather
namespace fused {
/// The fused op's checked inputs.
struct HeadInputs {
  at::Tensor hidden;  ///< [B, T, H] or [1, N, H]
  int64_t V = 0, H = 0;
};
/// What one chunk pass needs besides the tensors: the options that shape the logits and the
/// blocking that the budget allows.
struct HeadSpec {
  double temperature = 1.0;
  double softcap = 0.0;
  double logit_scale = 1.0;
  GatherBackend backend = GatherBackend::kAuto;
  int64_t chunk_rows = 1;   ///< token rows per forward (and kTokenChunks backward) chunk
  int64_t chunk_bytes = 0;  ///< the budget of the forward chunks and kVocabBlocks
  int64_t tile_bytes = 0;   ///< the budget of the kTiles backward
  FusedBackward backward = FusedBackward::kAuto;
};
/// Bytes per scored row of the chunk buffers (the least `chunk_bytes` the fused op takes).
int64_t row_budget(const HeadInputs& in, const FusedLogprobsOptions& o);
/// Entries per row of a reused logits buffer of `cols` columns in dtype `st` on `device`: on
/// CPU, `cols` rounded up to a multiple of 64 bytes, so that every row starts on a cache line;
/// elsewhere `cols`.
int64_t buffer_stride(int64_t cols, at::ScalarType st, const at::Device& device);
/// Columns per vocabulary block of a backward tile, from `cols` wanted out of V: on CPU a block
/// narrower than V is cut to whole 64-byte lines, so its rows start on lines with no padding
/// (kept as is when at most one line: a tiny budget, where padding would multiply the buffer).
int64_t block_columns(int64_t cols, int64_t V, at::ScalarType st, const at::Device& device);
/// Row stride of a tile buffer of blocks of `cols` columns (from block_columns) out of V: dense
/// below V, `buffer_stride(V)` for whole rows.
int64_t block_stride(int64_t cols, int64_t V, at::ScalarType st, const at::Device& device);
/// Rows [r0, r0 + m) of a flat buffer of rows `ld` entries apart, as an [m, cols] view.
at::Tensor buffer_rows(const at::Tensor& buffer, int64_t r0, int64_t m, int64_t cols, int64_t ld);
/// The blocking of `n` scored rows under `o`'s budget; `fn` names the caller in the checks.
HeadSpec head_spec(const char* fn, const HeadInputs& in, int64_t n, const FusedLogprobsOptions& o);
/// z ← f(h_c · Wᵀ + b) into `z` (a reused [c, V] buffer), f(x) = cap · tanh(s · x / cap) / T
/// (s · x / T without a softcap): the logit scale, the softcap, then the temperature. With a
/// softcap and `dydx` defined (a buffer like z), f'(x) goes there, for `logits_grad`.
void chunk_logits(const at::Tensor& h_c, const at::Tensor& weight, const at::Tensor& bias,
                  const HeadSpec& spec, at::Tensor& z, const at::Tensor& dydx = at::Tensor());
/// Rows of a [1, c, V] view of a chunk: row i has target `target_c[i]`.
Rows identity_rows(const at::Tensor& target_c);
/// z ← dL/d(logits before f), in place, for rows with targets
/// `target_b` (−1: the target lies outside this block of columns), logsumexp `lse` and
/// per-row gradients `g` (and `g_ent` of the entropies `ent`, when defined: see
/// rows_backward); with a softcap, `dydx` holds f'(x) from `chunk_logits`.
void logits_grad(at::Tensor& z, const at::Tensor& target_b, const at::Tensor& lse,
                 const at::Tensor& g, const at::Tensor& g_ent, const at::Tensor& ent,
                 const HeadSpec& spec, const at::Tensor& dydx);
/// Whether this libtorch multiplies fp16 matrices on CPU (libtorch < 2.1 does not).
bool cpu_half_matmul();
/// libtorch's CPU `mm` in the 16-bit dtype `st` against its fp32 `mm`, as a speed ratio (fp32
/// time / 16-bit time; 0 where there is none or `cpu::fast16` says the CPU has no 16-bit
/// kernels), timed once per process on a 512 × 1024 × 1024 product, best of 6 each.
double cpu_mm16_speed(at::ScalarType st);
/// Whether 16-bit GEMMs (libtorch's, oneDNN's, MKL's) are used on CPU for the 16-bit dtype
/// `st`: where `cpu_mm16_speed(st)` ≥ 0.8, since the alternative, fp32 GEMMs on fp32 blocks
/// (`mm_fp32_blocks`), costs the fp32 rate plus the copies. bf16 measured at 0.56-0.63 on an
/// Intel Xeon with AVX512-BF16 but no AMX in use, torch 2.14 (one-pass bf16 loss 1.6× faster
/// on fp32 blocks there), 2.3 with Debian's libtorch 1.13 on the same machine, above 1 on AMD
/// Zen 4; without AVX-512 (0.15 by a larger product on an AVX2-only AMD EPYC) CPUID decides
/// and nothing is timed. The ratio of libtorch's `mm` also stands for oneDNN's and MKL's
/// mixed GEMMs (`cpu::mixed_gemm`), which are not timed. It can fall on either side of 0.8 in
/// different processes where it is close to it: `PREFOPT_CPU_GEMM16` fixes the choice.
/// `PREFOPT_CPU_GEMM16`: `off` gives false, `blas` and `rounded` true (no timing).
bool cpu_mm16_fast(at::ScalarType st);
/// Whether libtorch's own CPU `mm` is used for 16-bit operands of dtype `st` with op(a) and b
/// in these layouts (column-major or not, `col_major`): `cpu_mm16_fast(st)`, and it sums in
/// fp32 there: an 8 × 2048 × 8 product per layout against fp64, once per process (Debian's
/// libtorch 1.13 on CPUs without AVX-512 sums in 16 bits in three of the four). Where false,
/// `mm_fp32_blocks` serves.
bool cpu_mm16_usable(at::ScalarType st, bool a_col_major, bool b_col_major);
/// Whether libtorch's own CPU `mm` serves the 16-bit product op(a) [m, k] · b [k, n]:
/// `cpu_mm16_usable` for their layouts, and more than 16³ multiply-adds (smaller ones, which
/// libtorch may sum in 16 bits, go through `mm_fp32_blocks` at no cost).
bool cpu_mm16_serves(at::ScalarType st, const at::Tensor& a, const at::Tensor& b);
/// Whether ATen's CPU GEMM reads the 2-D `x` as column-major storage: unit row stride and a
/// column stride of at least the row count, unless it also passes as row-major (a view that
/// is neither, e.g. overlapping, is multiplied from a row-major copy: false).
bool col_major(const at::Tensor& x);
/// c ← a · b (+ bias, broadcast over c's rows), or c += a · b with `accumulate`, for 16-bit
/// a [m, k] and b [k, n] of any layout, through fp32 GEMMs on fp32 copies of blocks of a and b
/// of at most 16 MiB each. An fp32 `c` accumulates in place; a 16-bit one is summed in fp32
/// over all of k block by block and rounded once. No whole-operand copy.
void mm_fp32_blocks(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                    const at::Tensor& bias = {});
/// c += op(a) · b; 16-bit operands into an fp32 `c` accumulate in fp32 inside the GEMM.
/// `exact`: never through a 16-bit product (Gemm16Path::kRounded), for a result that is
/// summed further before it is rounded.
void add_mm(at::Tensor& c, const at::Tensor& a, bool trans_a, const at::Tensor& b,
            bool exact = false);
/// c ← op(a) · b in c's dtype, a, b and c all of one dtype; in 16 bits, accumulated in fp32 and
/// rounded once (libtorch's GEMM, or `mm_fp32_blocks` where `cpu_mm16_serves` says no).
void set_mm(at::Tensor& c, const at::Tensor& a, bool trans_a, const at::Tensor& b);
/// The fp32 accumulator of a 16-bit [V, H] weight gradient over several GEMMs, as two row
/// halves, so that the cast at the end needs no second [V, H] buffer: the top half's storage
/// (4·v_top·H bytes, v_top = min(V, ⌈V/2⌉ rounded up to 8)) holds the whole 16-bit result,
/// which `finish` writes there, the top half in place, front to back. Peak 4·V·H bytes (plus
/// one block's temporary) where one fp32 buffer and its cast take 6·V·H. On the BLAS and
/// cuBLAS paths each half's GEMM reads its column slice of the logits in place (they take the
/// leading dimension); the CPU fallbacks copy blocks anyway.
class DwAccumulator {
 public:
  DwAccumulator(int64_t V, int64_t H, const at::TensorOptions& fp32);
  /// Rows [v0, v0 + vb) += zᵀ · h for 16-bit z [c, vb] and h [c, H] (through add_mm).
  void add(int64_t v0, const at::Tensor& z, const at::Tensor& h);
  /// The [V, H] gradient in the 16-bit dtype `st`; the accumulator is spent. A view of the top
  /// half's storage (up to 15·H elements longer than the result).
  at::Tensor finish(at::ScalarType st);

 private:
  at::Tensor top_, bottom_;  // fp32 rows [0, v_top) and [v_top, V)
};
/// `fn`'s checks of the hidden states, the head and the options.
HeadInputs check_head(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                      const at::Tensor& bias, bool packed, const FusedLogprobsOptions& o);
/// The selected rows' log-probs through the LM head, chunked, with autograd; `cross` as above.
SequenceLogprobs run_head(const char* fn, const HeadInputs& in, const at::Tensor& weight,
                          const at::Tensor& bias, const Selection& sel,
                          const FusedLogprobsOptions& o, const CrossRankPtr& cross);
}  // namespace fused

}  // namespace detail
PREFOPT_END_NAMESPACE
