// Decode-step matmuls over 4-, 5-, 6- and 8-bit weights as integer dot products, for AVX2 CPUs (dot8.py).
//
// Each input row is rounded per group of 32 to 8-bit levels of its own scale, and what they leave to 8-bit
// levels of a 254th of it; both meet the weight as one 16-bit value (254 * level + remainder). The weight's levels
// are one signed byte each (dot8.py unpacks the 4- and 5-bit ones at load), widened to 16 bits once for every
// block of input rows, so a group's dot product is two vpmaddwd, exact in integers, then times the two scales.
// That is much less work than widening every weight to float, as torch's int4 kernel does. Multiplying packed
// 4- and 5-bit levels as bytes (vpmaddubsw against the levels, then the remainders) took 1.3x (Q4_K) to 1.8x
// (Q5_0) as long at 1 to 16 rows on a 2-core AVX2 host: unpacking them for every block of rows cost more than
// their fewer bytes saved.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <optional>

namespace {

constexpr int64_t kGroup = 32;

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows of x as 16-bit values per group: levels of a scale that puts the group's largest magnitude at 127, then
// the remainders' levels at a 254th of that scale, kept as one value 254 * level + remainder, so x = scale / 254 *
// value to about 16 bits, finer than bfloat16's 8. With each group's scale / 254 and exact sum (offsets multiply it).
struct Levels {
  at::Tensor values, scales, sums;
};

constexpr float kFine = 254.0f;

// 16 int32 values in int16's range stored as int16 in order: the pack interleaves 128-bit lanes, the permute puts
// them back.
inline void store_in_order(int16_t* out, __m256i low, __m256i high) {
  const __m256i packed = _mm256_packs_epi32(low, high);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

Levels to_levels(const at::Tensor& x) {
  const int64_t count = x.numel() / kGroup;
  Levels out{at::empty({x.numel()}, at::kShort), at::empty({count}, at::kFloat), at::empty({count}, at::kFloat)};
  int16_t* values = out.values.data_ptr<int16_t>();
  const float* in = x.data_ptr<float>();
  float* scales = out.scales.data_ptr<float>();
  float* sums = out.sums.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i steps = _mm256_set1_epi32(static_cast<int>(kFine));
  for (int64_t g = 0; g < count; ++g) {
    const float* v = in + g * kGroup;
    __m256 part[4];
    __m256 largest = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      part[i] = _mm256_loadu_ps(v + 8 * i);
      largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, part[i]));
      total = _mm256_add_ps(total, part[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float scale = _mm_cvtss_f32(m) / 127.0f;
    const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    const __m256 fine_inverse = _mm256_set1_ps(scale > 0.0f ? kFine / scale : 0.0f);
    __m256i value[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));  // nearest, ties to even
      const __m256 rest = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(scale), part[i]);
      // At most 127.5 in magnitude, -128 only by a rounding error: kept to the levels' -127..127.
      const __m256i r = _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(rest, fine_inverse)), _mm256_set1_epi32(-127));
      value[i] = _mm256_add_epi32(_mm256_mullo_epi32(q, steps), r);
    }
    store_in_order(values + g * kGroup, value[0], value[1]);
    store_in_order(values + g * kGroup + 16, value[2], value[3]);
    scales[g] = scale / kFine;  // what the sums of 254 * levels + remainders are multiplied by
    sums[g] = sum_lanes(total);
  }
  return out;
}

// A weight's scales: one per group of 32 (Q8_0, and the unpacked 4- and 5-bit types), or one per 16 (Q6_K).
enum Kind { kPer32, kPer16 };

// Weight rows [begin, end) times `R` input rows from `first`: each weight group is widened once for them.
struct Operands {
  const int8_t* weights;  // [out, width]
  const float* weight_scales;
  const float* weight_offsets;  // [out, groups], or null
  int64_t width, groups, out;
  const int16_t* values;
  const float* scales;
  const float* sums;
  float* result;
};

// A weight group's 32 levels, widened to 16 bits (elements 0..15, then 16..31), times an input group's 32 values,
// as two sets of 8 int32 sums: lane i of the first sums elements 2i and 2i + 1, of the second 16 + 2i and 17 + 2i.
// Exact: a level is at most 128 and a value 127 * 254 + 127 = 32385 in magnitude, so even both sets' lanes added
// stay below 2^24, exact again as float.
inline void wide_dot(const __m256i weights[2], const int16_t* values, __m256i sums[2]) {
  sums[0] = _mm256_madd_epi16(weights[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values)));
  sums[1] = _mm256_madd_epi16(weights[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16)));
}

// An offset per weight group (Q4_1, Q4_K, Q5_1, Q5_K, whose levels are 0..15 or 0..31) adds the group's offset times
// the input group's exact sum: 8 groups at a time, once a weight row's products are summed.
inline float offsets_times_sums(const float* offsets, const float* sums, int64_t groups) {
  __m256 part = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) part = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + g), _mm256_loadu_ps(sums + g), part);
  float rest = sum_lanes(part);
  for (; g < groups; ++g) rest += offsets[g] * sums[g];
  return rest;
}

template <Kind kind, int R>
void rows_times(const Operands& op, int64_t first, int64_t begin, int64_t end) {
  constexpr int64_t scales_per_group = kind == kPer16 ? 2 : 1;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* weights = op.weights + n * op.width;
    const float* weight_scales = op.weight_scales + n * op.groups * scales_per_group;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < op.groups; ++g) {
      const __m256i wide[2] = {
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + g * kGroup))),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + g * kGroup + 16))),
      };
      for (int r = 0; r < R; ++r) {
        const int64_t at = (first + r) * op.groups + g;
        __m256i sums[2];
        wide_dot(wide, op.values + at * kGroup, sums);
        if (kind == kPer16) {  // the first set holds the group's first 16 elements, the second the next 16
          const float* s = weight_scales + 2 * g;
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[0]), _mm256_set1_ps(s[0] * op.scales[at]), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[1]), _mm256_set1_ps(s[1] * op.scales[at]), acc[r]);
        } else {
          const __m256 products = _mm256_cvtepi32_ps(_mm256_add_epi32(sums[0], sums[1]));
          acc[r] = _mm256_fmadd_ps(products, _mm256_set1_ps(weight_scales[g] * op.scales[at]), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float total = sum_lanes(acc[r]);
      if (op.weight_offsets) {
        total += offsets_times_sums(op.weight_offsets + n * op.groups, op.sums + (first + r) * op.groups, op.groups);
      }
      op.result[(first + r) * op.out + n] = total;
    }
  }
}

template <Kind kind>
void all_rows(const Operands& op, int64_t rows) {
  at::parallel_for(0, op.out, 16, [&](int64_t begin, int64_t end) {
    int64_t first = 0;
    for (; first + 4 <= rows; first += 4) rows_times<kind, 4>(op, first, begin, end);
    switch (rows - first) {
      case 3: rows_times<kind, 3>(op, first, begin, end); break;
      case 2: rows_times<kind, 2>(op, first, begin, end); break;
      case 1: rows_times<kind, 1>(op, first, begin, end); break;
      default: break;
    }
  });
}

// x [rows, in] times the weight [out, in] of int8 levels with scales per 32 or 16 (and offsets per 32), in x's dtype.
at::Tensor levels_mm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % kGroup == 0, "dot8: input must be [rows, a multiple of 32]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), width = x.size(1), out = weight.size(0), groups = width / kGroup;
  const bool per_16 = scales.dim() == 2 && scales.size(1) == 2 * groups;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == width && scales.dim() == 2 && scales.size(0) == out &&
                  (per_16 || scales.size(1) == groups) &&
                  (!offsets || (!per_16 && offsets->sizes() == scales.sizes())),
              "dot8: shapes do not match");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat &&
                  (!offsets || offsets->scalar_type() == at::kFloat),
              "dot8: levels must be int8, scales and offsets float32");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && (!offsets || offsets->is_contiguous()),
              "dot8: the weight's tensors must be contiguous");
  const Levels in = to_levels(x);
  at::Tensor y = at::empty({rows, out}, at::kFloat);
  const Operands op{
      weight.data_ptr<int8_t>(),
      scales.data_ptr<float>(),
      offsets ? offsets->data_ptr<float>() : nullptr,
      width,
      groups,
      out,
      in.values.data_ptr<int16_t>(),
      in.scales.data_ptr<float>(),
      in.sums.data_ptr<float>(),
      y.data_ptr<float>(),
  };
  if (per_16) {
    all_rows<kPer16>(op, rows);
  } else {
    all_rows<kPer32>(op, rows);
  }
  return y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(llmchat_dot8, m) { m.def("levels_mm(Tensor x, Tensor levels, Tensor scales, Tensor? offsets) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmchat_dot8, CPU, m) { m.impl("levels_mm", &levels_mm); }
