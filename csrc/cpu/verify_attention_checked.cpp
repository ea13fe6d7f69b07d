// verify_attention_checked: the public call of verify_attention on CPU tensors, in one C++ call.
// The Python wrapper's checks cost ~30-50 us a call right after a kernel has streamed a cache through the
// CPU's caches (every attribute read and allocation from Python misses), more than the kernel takes at a
// few thousand positions on two cores. This entry checks what fastvlm_kernels/ops/verify_attention checks
// (shapes, dtypes, devices, layouts, and with `validate` the values of prefix_lens and tree_mask), allocates
// the output and runs the kernel. It refuses (NotImplementedError, before the output is allocated) whatever
// it does not take, and the Python wrapper then runs its own checks, which name the bad argument.
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "ops.h"

namespace fastvlm {
namespace {

[[noreturn]] void refuse(const char* why) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "verify_attention_checked: ", why, " (the Python checks take over)");
}

bool supported_head_dim(int64_t head_dim) {  // fastvlm_kernels/ops/verify_attention/spec.py HEAD_DIMS
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

constexpr int64_t kMaxTreeTokens = 64;  // spec.py MAX_TREE_TOKENS: one int64 bitmask per query

}  // namespace

at::Tensor verify_attention_checked_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask,
                                        std::optional<double> sm_scale, bool validate) {
  const auto dtype = q.scalar_type();
  if (q.dim() != 4 || k_cache.dim() != 4 || v_cache.dim() != 4) refuse("rank");
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) refuse("dtype");
  if (k_cache.scalar_type() != dtype || v_cache.scalar_type() != dtype) refuse("cache dtype");
  if (!q.is_cpu() || !k_cache.is_cpu() || !v_cache.is_cpu() || !prefix_lens.is_cpu()) refuse("device");
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k_cache.size(1), cache_len = k_cache.size(2);
  if (k_cache.sizes() != v_cache.sizes() || k_cache.size(0) != batch || k_cache.size(3) != head_dim) refuse("shape");
  if (!supported_head_dim(head_dim) || num_kv_heads == 0 || num_q_heads % num_kv_heads != 0) refuse("heads");
  if (num_new == 0 || num_new > cache_len || batch == 0) refuse("length");
  if (q.stride(3) != 1 || k_cache.stride(3) != 1 || v_cache.stride(3) != 1) refuse("layout");
  const auto length_dtype = prefix_lens.scalar_type();
  if ((length_dtype != at::kInt && length_dtype != at::kLong) || prefix_lens.dim() != 1 || prefix_lens.size(0) != batch)
    refuse("prefix_lens");
  at::Tensor mask;
  if (tree_mask.has_value()) {
    mask = tree_mask->contiguous();
    if (mask.scalar_type() != at::kLong || mask.dim() != 2 || mask.size(0) != batch || mask.size(1) != num_new ||
        !mask.is_cpu() || num_new > kMaxTreeTokens)
      refuse("tree_mask");
  }
  if (validate) {  // on the values as given: int64 lengths are narrowed to int32 below
    const at::Tensor given = prefix_lens.contiguous();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t value =
          length_dtype == at::kLong ? given.const_data_ptr<int64_t>()[b] : given.const_data_ptr<int32_t>()[b];
      if (value < 0 || value > cache_len - num_new) refuse("prefix_lens value");
    }
    if (mask.defined()) {
      const int64_t* rows = mask.const_data_ptr<int64_t>();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t j = 0; j < num_new; ++j) {
          const uint64_t bits = static_cast<uint64_t>(rows[b * num_new + j]);
          const uint64_t later = j == 63 ? 0 : ~uint64_t{0} << (j + 1);
          if (!((bits >> j) & 1) || (bits & later)) refuse("tree_mask value");
        }
    }
  }
  const at::Tensor lengths = prefix_lens.to(at::kInt).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const std::optional<at::Tensor> no_lse;
  verify_attention_cpu(q, k_cache, v_cache, lengths,
                       mask.defined() ? std::optional<at::Tensor>(mask) : std::optional<at::Tensor>(),
                       sm_scale.has_value() ? *sm_scale : 1.0 / std::sqrt(static_cast<double>(head_dim)), out, no_lse);
  return out;
}

}  // namespace fastvlm
