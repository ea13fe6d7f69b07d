// Acceptance kernels (accept_greedy / accept_sampling, chains and trees); the walk is reference.py's.
// Greedy: grid cdiv(B, 128) x 128 threads, one thread walks one row's N nodes (O(N), integer only).
// Sampling: grid B, one CTA of kThreads per row. Every thread follows the walk in lockstep (the decisions
// read the same scalars, so control flow stays uniform); a rejection is one coalesced pass over V
// (residual r <- max(0, r - Z q) into an fp64 workspace row, block-reduced sum Z), and the final draw
// splits V into one contiguous segment per thread: segment sums, a block scan, then the one thread whose
// segment holds u * Z scans it. Memory bound on those passes; a row that accepts everything reads p once.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace fastvlm::acceptance {

struct TreeParams {
  const int64_t* draft_tokens;  // [B, cols]: node c's token at column c - node_offset
  const int64_t* parents;       // [B, N] or nullptr (a chain: parent(c) = c - 1)
  int32_t* accept_len;          // [B]
  int64_t* path;                // [B, N] or nullptr
  int64_t* emitted;             // [B, N]
  int64_t batch, num_nodes, cols, node_offset;
};

struct SamplingParams {
  const void* draft_probs;   // [B, N - 1, V]
  const void* target_probs;  // [B, N, V]
  const float* uniforms;     // [B, N]
  double* residual;          // [B, V] workspace
  int64_t vocab;
};

constexpr int kGreedyThreads = 128;
constexpr int kSamplingThreads = 512;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ int64_t node_token(const TreeParams& tree, int64_t row, int64_t node) {
  return tree.draft_tokens[row * tree.cols + node - tree.node_offset];
}
__device__ __forceinline__ int64_t node_parent(const TreeParams& tree, int64_t row, int64_t node) {
  return tree.parents != nullptr ? tree.parents[row * tree.num_nodes + node] : node - 1;
}

// -1 past the valid entries, the length, and the root in path.
__device__ __forceinline__ void finish_row(const TreeParams& tree, int64_t row, int64_t accepted, int first,
                                           int stride) {
  int64_t* emitted = tree.emitted + row * tree.num_nodes;
  int64_t* path = tree.path != nullptr ? tree.path + row * tree.num_nodes : nullptr;
  for (int64_t j = accepted + 1 + first; j < tree.num_nodes; j += stride) {
    emitted[j] = -1;
    if (path != nullptr) path[j] = -1;
  }
  if (first == 0) {
    tree.accept_len[row] = static_cast<int32_t>(accepted);
    if (path != nullptr) path[0] = 0;
  }
}

__global__ void accept_greedy_kernel(TreeParams tree, const int64_t* target_tokens) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= tree.batch) return;
  const int64_t* targets = target_tokens + row * tree.num_nodes;
  int64_t* emitted = tree.emitted + row * tree.num_nodes;
  int64_t* path = tree.path != nullptr ? tree.path + row * tree.num_nodes : nullptr;
  int64_t cur = 0, accepted = 0;
  for (int64_t child = 1; child < tree.num_nodes; ++child) {
    if (node_parent(tree, row, child) != cur) continue;
    const int64_t token = node_token(tree, row, child);
    if (token == targets[cur]) {
      ++accepted;
      if (path != nullptr) path[accepted] = child;
      emitted[accepted - 1] = token;
      cur = child;
    }
  }
  emitted[accepted] = targets[cur];
  finish_row(tree, row, accepted, 0, 1);
}

template <typename T>
__device__ __forceinline__ double load(const T* row, int64_t index) {
  return static_cast<double>(to_float(row[index]));
}

template <typename T>
__global__ void __launch_bounds__(kSamplingThreads) accept_sampling_kernel(TreeParams tree, SamplingParams params) {
  using Reduce = cub::BlockReduce<double, kSamplingThreads>;
  using Scan = cub::BlockScan<double, kSamplingThreads>;
  using ReduceIndex = cub::BlockReduce<int64_t, kSamplingThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
    typename ReduceIndex::TempStorage reduce_index;
  } temp;
  __shared__ double broadcast;
  __shared__ double segment_end[kSamplingThreads];

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t num_nodes = tree.num_nodes, vocab = params.vocab;
  const T* target_probs = static_cast<const T*>(params.target_probs) + row * num_nodes * vocab;
  const T* draft_probs = static_cast<const T*>(params.draft_probs) + row * (num_nodes - 1) * vocab;
  const float* u = params.uniforms + row * num_nodes;
  double* residual = params.residual + row * vocab;
  int64_t* emitted = tree.emitted + row * num_nodes;
  int64_t* path = tree.path != nullptr ? tree.path + row * num_nodes : nullptr;

  int64_t cur = 0, accepted = 0;
  bool has_residual = false;  // false: the residual is p_cur itself, with Z = 1
  double z = 1.0;
  for (int64_t child = 1; child < num_nodes; ++child) {
    if (node_parent(tree, row, child) != cur) continue;
    const int64_t token = node_token(tree, row, child);
    const int64_t index = min(max(token, int64_t{0}), vocab - 1);  // valid tokens are unchanged
    const T* p = target_probs + cur * vocab;
    const T* q = draft_probs + cur * vocab;
    const double r_token = has_residual ? residual[index] : load(p, index);
    if (static_cast<double>(u[child - 1]) * load(q, index) * z < r_token) {
      ++accepted;
      if (tid == 0) {
        if (path != nullptr) path[accepted] = child;
        emitted[accepted - 1] = token;
      }
      cur = child;
      has_residual = false;
      z = 1.0;
    } else {
      double partial = 0.0;
      for (int64_t j = tid; j < vocab; j += kSamplingThreads) {
        const double base = has_residual ? residual[j] : load(p, j);
        const double r = fmax(base - __dmul_rn(z, load(q, j)), 0.0);  // no FMA: round like the reference
        residual[j] = r;
        partial += r;
      }
      const double total = Reduce(temp.reduce).Sum(partial);
      if (tid == 0) broadcast = total;
      __syncthreads();  // also publishes the residual row to every thread of the block
      has_residual = broadcast > 0.0;
      z = has_residual ? broadcast : 1.0;
      __syncthreads();
    }
  }

  // Inverse-CDF draw: thread tid owns the contiguous segment [begin, end) of the vocabulary.
  const T* p = target_probs + cur * vocab;
  const int64_t segment = (vocab + kSamplingThreads - 1) / kSamplingThreads;
  const int64_t begin = min(static_cast<int64_t>(tid) * segment, vocab), end = min(begin + segment, vocab);
  double segment_sum = 0.0;
  int64_t last_positive = -1;
  for (int64_t j = begin; j < end; ++j) {
    const double w = has_residual ? residual[j] : load(p, j);
    segment_sum += w;
    if (w > 0.0) last_positive = j;
  }
  double inclusive;
  Scan(temp.scan).InclusiveSum(segment_sum, inclusive);
  segment_end[tid] = inclusive;
  __syncthreads();
  const double threshold = static_cast<double>(u[num_nodes - 1]) * segment_end[kSamplingThreads - 1];
  const double segment_start = tid == 0 ? 0.0 : segment_end[tid - 1];
  int64_t found = INT64_MAX;
  if (segment_start <= threshold && inclusive > threshold) {
    double cumulative = 0.0;
    for (int64_t j = begin; j < end; ++j) {
      cumulative += has_residual ? residual[j] : load(p, j);
      if (segment_start + cumulative > threshold) {
        found = j;
        break;
      }
    }
    // The scan's inclusive sum can round above this thread's own running sum: then the draw falls at the
    // segment's last positive weight (the next segment starts above the threshold).
    if (found == INT64_MAX && last_positive >= 0) found = last_positive;
  }
  const auto smaller = [](int64_t a, int64_t b) { return min(a, b); };
  const auto larger = [](int64_t a, int64_t b) { return max(a, b); };
  const int64_t first = ReduceIndex(temp.reduce_index).Reduce(found, smaller);
  __syncthreads();
  const int64_t last = ReduceIndex(temp.reduce_index).Reduce(last_positive, larger);
  if (tid == 0) emitted[accepted] = first != INT64_MAX ? first : (last >= 0 ? last : 0);
  finish_row(tree, row, accepted, tid, kSamplingThreads);
}

}  // namespace fastvlm::acceptance
