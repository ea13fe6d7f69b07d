// accept_greedy / accept_sampling (chains and trees) on CPU: at::parallel_for over batch rows; a row walks
// its N nodes once in index order (reference.py gives the walk), so greedy acceptance is O(N) per row.
// Sampling reads p and q only at the drafted tokens until a rejection; each rejection is one pass over the
// vocabulary (residual r <- max(0, r - Z q) in a per-row fp64 buffer, then its sums in 256-entry blocks,
// whose total is Z), and the final draw walks the block sums and rescans one block (p's block sums are
// computed first when no rejection happened). Memory bound on those passes.
#include "ops.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// r - Z * q must round like the reference's separate multiply and subtract: no FMA contraction (GCC
// contracts by default wherever the target has FMA, e.g. aarch64 or -march=native).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastvlm {
namespace {

struct Tree {
  const int64_t* tokens;   // [B, cols]: node c's token at c - node_offset (cols = N - 1 for a chain)
  const int64_t* parents;  // [B, N] or nullptr (a chain: parent(c) = c - 1)
  int64_t num_nodes, cols, node_offset;

  int64_t token(int64_t row, int64_t node) const { return tokens[row * cols + node - node_offset]; }
  int64_t parent(int64_t row, int64_t node) const {
    return parents != nullptr ? parents[row * num_nodes + node] : node - 1;
  }
};

Tree make_tree(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents, int64_t num_nodes) {
  const int64_t cols = draft_tokens.size(1);
  return Tree{draft_tokens.data_ptr<int64_t>(), parents.has_value() ? parents->data_ptr<int64_t>() : nullptr, num_nodes,
              cols, num_nodes - cols};
}

void check_common(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents, int64_t num_nodes,
                  const at::Tensor& accept_len, const std::optional<at::Tensor>& path, const at::Tensor& emitted,
                  const char* op) {
  const int64_t batch = draft_tokens.size(0);
  TORCH_CHECK(draft_tokens.dim() == 2 && draft_tokens.scalar_type() == at::kLong && draft_tokens.is_contiguous(), op,
              ": draft_tokens must be [B, cols] int64 contiguous");
  TORCH_CHECK(num_nodes >= 1 && (draft_tokens.size(1) == num_nodes || draft_tokens.size(1) == num_nodes - 1), op,
              ": draft_tokens must have N (tree) or N - 1 (chain) columns");
  TORCH_CHECK(parents.has_value() == (draft_tokens.size(1) == num_nodes), op,
              ": a tree (draft_tokens with N columns) needs parents, a chain (N - 1 columns) none");
  if (parents.has_value()) {
    TORCH_CHECK(
        parents->scalar_type() == at::kLong && parents->is_contiguous() && parents->numel() == batch * num_nodes, op,
        ": parents must be [B, N] int64 contiguous");
  }
  TORCH_CHECK(accept_len.scalar_type() == at::kInt && accept_len.is_contiguous() && accept_len.numel() == batch, op,
              ": accept_len must be [B] int32 contiguous");
  TORCH_CHECK(emitted.scalar_type() == at::kLong && emitted.is_contiguous() && emitted.numel() == batch * num_nodes, op,
              ": emitted must be [B, N] int64 contiguous");
  if (path.has_value()) {
    TORCH_CHECK(path->scalar_type() == at::kLong && path->is_contiguous() && path->numel() == batch * num_nodes, op,
                ": path must be [B, N] int64 contiguous");
  }
}

// Writes -1 past the valid entries of one row's outputs.
void finish_row(int64_t accepted, int64_t num_nodes, int32_t* accept_len, int64_t* path, int64_t* emitted) {
  *accept_len = static_cast<int32_t>(accepted);
  std::fill(emitted + accepted + 1, emitted + num_nodes, int64_t{-1});
  if (path != nullptr) std::fill(path + accepted + 1, path + num_nodes, int64_t{-1});
}

template <typename T>
double value(const T* row, int64_t index) {
  return static_cast<double>(static_cast<float>(row[index]));
}

constexpr int64_t kBlock = 256;  // the vocabulary is summed in blocks; a draw rescans one block

// Sum of weight(j) over one block, four independent accumulators (no serial add chain).
template <typename Weight>
double block_sum(Weight weight, int64_t begin, int64_t end) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    for (int lane = 0; lane < 4; ++lane) acc[lane] += weight(j + lane);
  }
  for (; j < end; ++j) acc[0] += weight(j);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Inverse-CDF draw from unnormalised weights given their block sums: the first j whose running sum
// exceeds u * total. Past the end (rounding), the last index with positive weight; 0 when none.
template <typename Weight>
int64_t sample_index(Weight weight, const double* sums, int64_t vocab, double uniform) {
  const int64_t num_blocks = (vocab + kBlock - 1) / kBlock;
  double total = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) total += sums[b];
  const double threshold = uniform * total;
  double running = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (running + sums[b] > threshold) {
      const int64_t end = std::min((b + 1) * kBlock, vocab);
      double cumulative = running;
      int64_t last_positive = -1;
      for (int64_t j = b * kBlock; j < end; ++j) {
        const double w = weight(j);
        cumulative += w;
        if (cumulative > threshold) return j;
        if (w > 0.0) last_positive = j;
      }
      if (last_positive >= 0) return last_positive;  // the block's sum rounded above its running sum
    }
    running += sums[b];
  }
  for (int64_t b = num_blocks - 1; b >= 0; --b) {
    if (sums[b] > 0.0) {
      for (int64_t j = std::min((b + 1) * kBlock, vocab) - 1; j >= b * kBlock; --j) {
        if (weight(j) > 0.0) return j;
      }
    }
  }
  return 0;
}

template <typename T>
void sampling_rows(const Tree& tree, const T* draft_probs, const T* target_probs, const float* uniforms, int64_t vocab,
                   int32_t* accept_len, int64_t* path, int64_t* emitted, int64_t begin, int64_t end) {
  const int64_t num_nodes = tree.num_nodes;
  const int64_t num_blocks = (vocab + kBlock - 1) / kBlock;
  std::vector<double> residual(vocab), sums(num_blocks);
  for (int64_t row = begin; row < end; ++row) {
    const float* u = uniforms + row * num_nodes;
    int64_t* row_emitted = emitted + row * num_nodes;
    int64_t* row_path = path != nullptr ? path + row * num_nodes : nullptr;
    if (row_path != nullptr) row_path[0] = 0;
    int64_t cur = 0, accepted = 0;
    bool has_residual = false;  // false: the residual is p_cur itself, with Z = 1
    double z = 1.0;
    for (int64_t child = 1; child < num_nodes; ++child) {
      if (tree.parent(row, child) != cur) continue;
      const int64_t token = tree.token(row, child);
      const int64_t index = std::min(std::max(token, int64_t{0}), vocab - 1);  // valid tokens are unchanged
      const T* p = target_probs + (row * num_nodes + cur) * vocab;
      const T* q = draft_probs + (row * (num_nodes - 1) + cur) * vocab;
      const double r_token = has_residual ? residual[index] : value(p, index);
      if (static_cast<double>(u[child - 1]) * value(q, index) * z < r_token) {
        ++accepted;
        if (row_path != nullptr) row_path[accepted] = child;
        row_emitted[accepted - 1] = token;
        cur = child;
        has_residual = false;
        z = 1.0;
      } else {
        // r <- max(0, r - Z q) in place, and the block sums of the new r (what the draw needs).
        double* r = residual.data();
        for (int64_t j = 0; j < vocab; ++j) {
          const double base = has_residual ? r[j] : value(p, j);
          r[j] = std::max(base - z * value(q, j), 0.0);
        }
        double total = 0.0;
        for (int64_t b = 0; b < num_blocks; ++b) {
          sums[b] = block_sum([r](int64_t j) { return r[j]; }, b * kBlock, std::min((b + 1) * kBlock, vocab));
          total += sums[b];
        }
        has_residual = total > 0.0;
        z = has_residual ? total : 1.0;
      }
    }
    const double uniform = static_cast<double>(u[num_nodes - 1]);
    if (has_residual) {
      const double* r = residual.data();
      row_emitted[accepted] = sample_index([r](int64_t j) { return r[j]; }, sums.data(), vocab, uniform);
    } else {
      const T* p = target_probs + (row * num_nodes + cur) * vocab;
      const auto weight = [p](int64_t j) { return value(p, j); };
      for (int64_t b = 0; b < num_blocks; ++b) {
        sums[b] = block_sum(weight, b * kBlock, std::min((b + 1) * kBlock, vocab));
      }
      row_emitted[accepted] = sample_index(weight, sums.data(), vocab, uniform);
    }
    finish_row(accepted, num_nodes, accept_len + row, row_path, row_emitted);
  }
}

}  // namespace

void accept_greedy_cpu(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                       const at::Tensor& target_tokens, at::Tensor& accept_len, const std::optional<at::Tensor>& path,
                       at::Tensor& emitted) {
  const int64_t batch = draft_tokens.size(0), num_nodes = target_tokens.size(1);
  check_common(draft_tokens, parents, num_nodes, accept_len, path, emitted, "accept_greedy (cpu)");
  TORCH_CHECK(
      target_tokens.scalar_type() == at::kLong && target_tokens.is_contiguous() && target_tokens.size(0) == batch,
      "accept_greedy (cpu): target_tokens must be [B, N] int64 contiguous");
  const Tree tree = make_tree(draft_tokens, parents, num_nodes);
  const int64_t* targets = target_tokens.data_ptr<int64_t>();
  int32_t* lens = accept_len.data_ptr<int32_t>();
  int64_t* paths = path.has_value() ? path->data_ptr<int64_t>() : nullptr;
  int64_t* out = emitted.data_ptr<int64_t>();
  at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t* row_emitted = out + row * num_nodes;
      int64_t* row_path = paths != nullptr ? paths + row * num_nodes : nullptr;
      const int64_t* row_targets = targets + row * num_nodes;
      if (row_path != nullptr) row_path[0] = 0;
      int64_t cur = 0, accepted = 0;
      for (int64_t child = 1; child < num_nodes; ++child) {
        if (tree.parent(row, child) != cur) continue;
        const int64_t token = tree.token(row, child);
        if (token == row_targets[cur]) {
          ++accepted;
          if (row_path != nullptr) row_path[accepted] = child;
          row_emitted[accepted - 1] = token;
          cur = child;
        }
      }
      row_emitted[accepted] = row_targets[cur];
      finish_row(accepted, num_nodes, lens + row, row_path, row_emitted);
    }
  });
}

void accept_sampling_cpu(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                         const at::Tensor& draft_probs, const at::Tensor& target_probs, const at::Tensor& uniforms,
                         at::Tensor& accept_len, const std::optional<at::Tensor>& path, at::Tensor& emitted) {
  const int64_t batch = draft_tokens.size(0), num_nodes = target_probs.size(1), vocab = target_probs.size(2);
  check_common(draft_tokens, parents, num_nodes, accept_len, path, emitted, "accept_sampling (cpu)");
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.is_contiguous() && target_probs.size(0) == batch,
              "accept_sampling (cpu): target_probs must be [B, N, V] contiguous");
  TORCH_CHECK(draft_probs.dim() == 3 && draft_probs.is_contiguous() && draft_probs.size(0) == batch &&
                  draft_probs.size(1) == num_nodes - 1 && draft_probs.size(2) == vocab &&
                  draft_probs.scalar_type() == target_probs.scalar_type(),
              "accept_sampling (cpu): draft_probs must be [B, N - 1, V] contiguous in target_probs' dtype");
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat && uniforms.is_contiguous() && uniforms.numel() == batch * num_nodes,
              "accept_sampling (cpu): uniforms must be [B, N] fp32 contiguous");
  TORCH_CHECK(vocab >= 1, "accept_sampling (cpu): the vocabulary is empty");
  const Tree tree = make_tree(draft_tokens, parents, num_nodes);
  int32_t* lens = accept_len.data_ptr<int32_t>();
  int64_t* paths = path.has_value() ? path->data_ptr<int64_t>() : nullptr;
  int64_t* out = emitted.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_probs.scalar_type(), "accept_sampling_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "accept_sampling (cpu): probabilities must be fp32, fp16 or bf16");
    } else {
      const scalar_t* q = draft_probs.data_ptr<scalar_t>();
      const scalar_t* p = target_probs.data_ptr<scalar_t>();
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        sampling_rows<scalar_t>(tree, q, p, uniforms.data_ptr<float>(), vocab, lens, paths, out, begin, end);
      });
    }
  });
}

}  // namespace fastvlm
