// Decode attention read in place from the paged KV pool, for AVX2 CPUs (paged_kv.py, built with dot8.cpp).
//
// Each query token attends over the first `length` tokens of its block table. One task is one query's
// group of heads that share a key/value head (grouped-query attention: the keys and values are read once
// for the whole group) over one slice of the context; slices are merged by their softmax maxima and sums,
// so a single long row still uses every thread. Scores, softmax and the weighted sum are in float32 with
// the keys and values widened from the pool's dtype as they are read (a float32 model's pool is float16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxGroup = 8;  // query heads held in registers at once; larger groups take several passes

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8(const at::Half* p) {  // F16C, which every AVX2 CPU has
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Asks for a block's lines before they are read: a sequence's blocks lie anywhere in the pool, so the hardware's
// prefetcher cannot guess the next one. Without it the kernel waited on memory most of the time (8 rows of 2k
// tokens, every layer's blocks cold: 1.7 ms a layer).
inline void prefetch(const void* data, int64_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
}

// Lane i of the result is the sum of a[i]'s eight lanes.
inline __m256 sum_each(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// e^x for x <= 0 (scores less their maximum), Cephes' expf: 2^n times a polynomial of the remainder.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}

struct Problem {
  int64_t heads, kv_heads, group, dim, block_size, num_blocks;
  int64_t q_token_stride, q_head_stride, table_stride, splits, blocks_per_split;
  float scale;
  const int32_t* tokens;   // [queries] the query's index in q and out
  const int32_t* tables;   // [queries, table_stride] block ids
  const int32_t* lengths;  // [queries] context tokens, its own included
};

// Scores of heads [g0, g0 + G) of the group against the slice's keys, whole blocks at a time (a last block's
// unused slots hold whatever was there: their scores are never read). Each key is widened once for all G heads,
// and 8 tokens' dot products are summed across lanes together.
template <typename T, int G>
void scores_pass(const Problem& p, const T* keys, const int32_t* table, int64_t first, int64_t blocks,
                 const float* query, int64_t g0, float* scores, int64_t padded) {
  const int64_t bs = p.block_size, dim = p.dim;
  const int64_t block_bytes = bs * dim * static_cast<int64_t>(sizeof(T));
  prefetch(keys + static_cast<int64_t>(table[first]) * bs * dim, block_bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    const T* block = keys + static_cast<int64_t>(table[first + b]) * bs * dim;
    if (b + 1 < blocks) prefetch(keys + static_cast<int64_t>(table[first + b + 1]) * bs * dim, block_bytes);
    for (int64_t t0 = 0; t0 < bs; t0 += 8) {
      __m256 partial[G][8];
      for (int t = 0; t < 8; ++t) {
        const T* key = block + (t0 + t) * dim;
        __m256 a[G];
        for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; d += 8) {
          const __m256 k8 = load8(key + d);
          for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(query + (g0 + g) * dim + d), k8, a[g]);
        }
        for (int g = 0; g < G; ++g) partial[g][t] = a[g];
      }
      const int64_t at = b * bs + t0;
      if (at < padded) {
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(scores + (g0 + g) * padded + at, sum_each(partial[g]));
      }
    }
  }
}

// The weighted sum of values for heads [g0, g0 + G): 8 dims of the G heads at a time over each block's tokens,
// accumulated in `slot` rows of `row` floats.
template <typename T, int G>
void values_pass(const Problem& p, const T* values, const int32_t* table, int64_t first, int64_t span,
                 const float* scores, int64_t padded, int64_t g0, float* slot, int64_t row) {
  const int64_t bs = p.block_size, dim = p.dim;
  for (int g = 0; g < G; ++g) std::fill(slot + (g0 + g) * row, slot + (g0 + g) * row + dim, 0.0f);
  const int64_t block_bytes = bs * dim * static_cast<int64_t>(sizeof(T));
  prefetch(values + static_cast<int64_t>(table[first]) * bs * dim, block_bytes);
  for (int64_t b = 0; b * bs < span; ++b) {
    const T* block = values + static_cast<int64_t>(table[first + b]) * bs * dim;
    if ((b + 1) * bs < span) prefetch(values + static_cast<int64_t>(table[first + b + 1]) * bs * dim, block_bytes);
    const int64_t n = std::min(bs, span - b * bs);
    const float* weights = scores + b * bs;
    for (int64_t d = 0; d < dim; d += 8) {
      __m256 a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm256_loadu_ps(slot + (g0 + g) * row + d);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 v8 = load8(block + t * dim + d);
        for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + (g0 + g) * padded + t), v8, a[g]);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(slot + (g0 + g) * row + d, a[g]);
    }
  }
}

// Each pass instantiated for 1 to 8 heads, so that its accumulators stay in registers.
#define LLMCHAT_PASS(name)                                                                          \
  template <typename T, int G>                                                                      \
  struct name##_of {                                                                                \
    template <typename... Args>                                                                     \
    static void call(Args&&... args) { name<T, G>(std::forward<Args>(args)...); }                   \
  };
LLMCHAT_PASS(scores_pass)
LLMCHAT_PASS(values_pass)
#undef LLMCHAT_PASS

template <template <typename, int> class Pass, typename T, typename... Args>
void dispatch(int64_t count, Args&&... args) {
  switch (count) {
    case 1: Pass<T, 1>::call(std::forward<Args>(args)...); break;
    case 2: Pass<T, 2>::call(std::forward<Args>(args)...); break;
    case 3: Pass<T, 3>::call(std::forward<Args>(args)...); break;
    case 4: Pass<T, 4>::call(std::forward<Args>(args)...); break;
    case 5: Pass<T, 5>::call(std::forward<Args>(args)...); break;
    case 6: Pass<T, 6>::call(std::forward<Args>(args)...); break;
    case 7: Pass<T, 7>::call(std::forward<Args>(args)...); break;
    default: Pass<T, 8>::call(std::forward<Args>(args)...); break;
  }
}

// One task: query `i`, key/value head `kv`, blocks [first, last) of its table. Leaves in `slot`, per head of the
// group, a row of dim + 2: the unnormalized weighted sum of values, the scores' maximum and the sum of their
// exponentials (a maximum of -inf: an empty slice).
template <typename Q, typename T>
void attend_slice(const Problem& p, const Q* q, const T* keys, const T* values, int64_t i, int64_t kv, int64_t first,
                  int64_t last, float* slot, std::vector<float>& scores, std::vector<float>& query) {
  const int64_t bs = p.block_size, dim = p.dim, row = dim + 2;
  const int64_t begin = first * bs, end = std::min(last * bs, static_cast<int64_t>(p.lengths[i]));
  const int64_t span = end > begin ? end - begin : 0;  // tokens of this slice
  const int64_t blocks = (span + bs - 1) / bs, padded = blocks * bs;
  const int32_t* table = p.tables + i * p.table_stride;
  if (span == 0) {
    for (int64_t g = 0; g < p.group; ++g) {
      slot[g * row + dim] = -std::numeric_limits<float>::infinity();
      slot[g * row + dim + 1] = 0.0f;
    }
    return;
  }
  scores.resize(p.group * padded);
  query.resize(p.group * dim);
  const Q* q_row = q + p.tokens[i] * p.q_token_stride;
  for (int64_t g = 0; g < p.group; ++g) {
    for (int64_t d = 0; d < dim; ++d) {
      query[g * dim + d] = static_cast<float>(q_row[(kv * p.group + g) * p.q_head_stride + d]) * p.scale;
    }
  }
  const int64_t pool_head = kv * p.num_blocks * bs * dim;
  for (int64_t g0 = 0; g0 < p.group; g0 += kMaxGroup) {
    dispatch<scores_pass_of, T>(std::min<int64_t>(kMaxGroup, p.group - g0), p, keys + pool_head, table, first, blocks,
                                query.data(), g0, scores.data(), padded);
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < p.group; ++g) {
    float* s = &scores[g * padded];
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < span; ++t) top = std::max(top, s[t]);
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < span; t += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top)));
      if (t + 8 > span) {  // lanes past the slice's last token count for nothing
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(span - t), lane)));
      }
      _mm256_storeu_ps(s + t, e);
      total = _mm256_add_ps(total, e);
    }
    const __m256 folded[8] = {total, total, total, total, total, total, total, total};
    slot[g * row + dim] = top;
    slot[g * row + dim + 1] = _mm256_cvtss_f32(sum_each(folded));
  }
  for (int64_t g0 = 0; g0 < p.group; g0 += kMaxGroup) {
    dispatch<values_pass_of, T>(std::min<int64_t>(kMaxGroup, p.group - g0), p, values + pool_head, table, first, span,
                                scores.data(), padded, g0, slot, row);
  }
}

template <typename Q, typename T>
void run(const Problem& p, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::Tensor& out,
         int64_t queries) {
  const int64_t tasks = queries * p.kv_heads * p.splits;
  at::Tensor work = at::empty({tasks, p.group, p.dim + 2}, at::kFloat);  // per head: weighted sum, maximum, sum
  const Q* q_data = q.data_ptr<Q>();
  const T* k_data = keys.data_ptr<T>();
  const T* v_data = values.data_ptr<T>();
  float* w = work.data_ptr<float>();
  const int64_t stride = p.group * (p.dim + 2);
  at::parallel_for(0, tasks, 1, [&](int64_t from, int64_t to) {
    std::vector<float> scores, query;
    for (int64_t task = from; task < to; ++task) {
      const int64_t i = task / (p.kv_heads * p.splits), kv = task / p.splits % p.kv_heads, split = task % p.splits;
      const int64_t first = split * p.blocks_per_split, last = first + p.blocks_per_split;
      attend_slice<Q, T>(p, q_data, k_data, v_data, i, kv, first, last, w + task * stride, scores, query);
    }
  });
  Q* o = out.data_ptr<Q>();
  const int64_t o_token = out.stride(0), o_head = out.stride(1);
  at::parallel_for(0, queries * p.kv_heads, 1, [&](int64_t from, int64_t to) {
    std::vector<float> total(p.dim);
    for (int64_t pair = from; pair < to; ++pair) {
      const int64_t i = pair / p.kv_heads, kv = pair % p.kv_heads;
      for (int64_t g = 0; g < p.group; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < p.splits; ++s) top = std::max(top, w[(pair * p.splits + s) * stride + g * (p.dim + 2) + p.dim]);
        std::fill(total.begin(), total.end(), 0.0f);
        float denominator = 0.0f;
        for (int64_t s = 0; s < p.splits; ++s) {
          const float* row = w + (pair * p.splits + s) * stride + g * (p.dim + 2);
          if (row[p.dim] == -std::numeric_limits<float>::infinity()) continue;  // an empty slice
          const float weight = std::exp(row[p.dim] - top);
          denominator += weight * row[p.dim + 1];
          for (int64_t d = 0; d < p.dim; ++d) total[d] += weight * row[d];
        }
        Q* target = o + p.tokens[i] * o_token + (kv * p.group + g) * o_head;
        for (int64_t d = 0; d < p.dim; ++d) target[d] = static_cast<Q>(total[d] / denominator);
      }
    }
  });
}

// Writes out[tokens[i]] [heads, dim] for each query i: q[tokens[i]] attending over the first lengths[i] tokens of
// blocks tables[i] of one layer's pool, keys and values [kv_heads, blocks, block_size, dim].
void paged_decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& tokens,
                  const at::Tensor& tables, const at::Tensor& lengths, double scale, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && out.dim() == 3 && out.stride(2) == 1 && out.sizes() == q.sizes(),
              "paged_decode: q and out must be [tokens, heads, dim] with contiguous dims");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "paged_decode: the pool must be contiguous [kv_heads, blocks, block_size, dim]");
  TORCH_CHECK(values.scalar_type() == keys.scalar_type() && out.scalar_type() == q.scalar_type(),
              "paged_decode: the pool's keys and values must share one dtype, and q and out one");
  TORCH_CHECK(tokens.scalar_type() == at::kInt && tables.scalar_type() == at::kInt && lengths.scalar_type() == at::kInt &&
                  tokens.is_contiguous() && tables.is_contiguous() && lengths.is_contiguous() && tables.dim() == 2,
              "paged_decode: tokens, tables and lengths must be contiguous int32");
  const int64_t queries = tokens.size(0);
  Problem p{};
  p.heads = q.size(1);
  p.kv_heads = keys.size(0);
  p.dim = keys.size(3);
  TORCH_CHECK(p.heads % p.kv_heads == 0 && p.dim % 8 == 0 && keys.size(2) % 8 == 0 && q.size(2) == p.dim,
              "paged_decode: heads must be a multiple of kv_heads, and dim and block_size of 8");
  p.group = p.heads / p.kv_heads;
  p.block_size = keys.size(2);
  p.num_blocks = keys.size(1);
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.table_stride = tables.size(1);
  p.scale = static_cast<float>(scale);
  p.tokens = tokens.data_ptr<int32_t>();
  p.tables = tables.data_ptr<int32_t>();
  p.lengths = lengths.data_ptr<int32_t>();
  if (queries == 0) return;
  for (int64_t i = 0; i < queries; ++i) {  // a bookkeeping fault must be an error, not a read past the pool
    const int64_t used = (p.lengths[i] + p.block_size - 1) / p.block_size;
    TORCH_CHECK(p.lengths[i] > 0 && used <= p.table_stride && p.tokens[i] >= 0 && p.tokens[i] < q.size(0),
                "paged_decode: query ", i, " has no context, a short table or no place in q");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t block = p.tables[i * p.table_stride + b];
      TORCH_CHECK(block >= 0 && block < p.num_blocks, "paged_decode: block ", block, " is not in the pool");
    }
  }
  // Enough tasks for every thread twice over, but no slice shorter than 8 blocks.
  const int64_t longest = *std::max_element(p.lengths, p.lengths + queries);
  const int64_t blocks = (longest + p.block_size - 1) / p.block_size;
  const int64_t wanted = (2 * at::get_num_threads() + queries * p.kv_heads - 1) / (queries * p.kv_heads);
  p.splits = std::max<int64_t>(1, std::min<int64_t>(wanted, blocks / 8));
  p.blocks_per_split = (blocks + p.splits - 1) / p.splits;
  const auto q_type = q.scalar_type(), pool_type = keys.scalar_type();
  if (q_type == at::kBFloat16 && pool_type == at::kBFloat16) {
    run<at::BFloat16, at::BFloat16>(p, q, keys, values, out, queries);
  } else if (q_type == at::kFloat && pool_type == at::kHalf) {  // half the bytes read, widened as they are
    run<float, at::Half>(p, q, keys, values, out, queries);
  } else {
    TORCH_CHECK(q_type == at::kFloat && pool_type == at::kFloat,
                "paged_decode: q and the pool in float32, bfloat16, or float32 over a float16 pool");
    run<float, float>(p, q, keys, values, out, queries);
  }
}

}  // namespace

TORCH_LIBRARY(llmchat_attention, m) {
  m.def("paged_decode(Tensor q, Tensor keys, Tensor values, Tensor tokens, Tensor tables, Tensor lengths, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(llmchat_attention, CPU, m) { m.impl("paged_decode", &paged_decode); }
