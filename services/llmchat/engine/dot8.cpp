// Decode-step matmuls over 4-, 5-, 6- and 8-bit weights as integer dot products, for AVX2 CPUs (dot8.py).
//
// Each input row is rounded per group of 32 to 8-bit levels of its own scale, and what they leave to 8-bit
// levels of a 254th of it, so a group's dot product with a weight group is two sums of byte products
// (vpmaddubsw, vpmaddwd), combined exactly in integers and then times the two scales. That is much less
// work than widening every weight to float, as torch's int4 kernel does. Signed 8-bit weights, which
// vpmaddubsw cannot take as they are, are widened to 16 bits instead, once for every input row, and meet the
// two levels as one 16-bit value (254 * level + remainder) in two vpmaddwd.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstring>

namespace {

constexpr int64_t kGroup = 32;

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows of x to int8 levels per group: levels of a scale that puts the group's largest magnitude at 127,
// then the remainders' levels at a 254th of that scale, so x = scale * (levels + remainders / 254) to
// about 16 bits, finer than bfloat16's 8. With each group's scale / 254 and exact sum (Q4_1's offsets
// multiply it). For signed weights both levels are kept as one 16-bit value instead, 254 * levels + remainders.
struct Levels {
  at::Tensor levels, remainders, values, scales, sums;
};

constexpr float kFine = 254.0f;

// 32 int32 values in -127..127 stored as bytes in order: the packs interleave 128-bit lanes, the
// permute puts them back.
inline void store_in_order(int8_t* out, const __m256i q[4]) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, order));
}

// 16 int32 values in int16's range stored as int16 in order, as above.
inline void store_in_order(int16_t* out, __m256i low, __m256i high) {
  const __m256i packed = _mm256_packs_epi32(low, high);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

Levels to_levels(const at::Tensor& x, bool as_values) {
  const int64_t count = x.numel() / kGroup;
  const int64_t bytes = as_values ? 0 : x.numel();
  Levels out{
      at::empty({bytes}, at::kChar),
      at::empty({bytes}, at::kChar),
      at::empty({x.numel() - bytes}, at::kShort),
      at::empty({count}, at::kFloat),
      at::empty({count}, at::kFloat),
  };
  int16_t* values = out.values.data_ptr<int16_t>();
  const float* in = x.data_ptr<float>();
  int8_t* levels = out.levels.data_ptr<int8_t>();
  int8_t* remainders = out.remainders.data_ptr<int8_t>();
  float* scales = out.scales.data_ptr<float>();
  float* sums = out.sums.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.0f);
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
    __m256i q[4], r[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));  // nearest, ties to even
      const __m256 rest = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q[i]), _mm256_set1_ps(scale), part[i]);
      // At most 127.5 in magnitude, -128 only by a rounding error: kept to the levels' -127..127.
      r[i] = _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(rest, fine_inverse)), _mm256_set1_epi32(-127));
    }
    if (as_values) {
      __m256i value[4];
      const __m256i steps = _mm256_set1_epi32(static_cast<int>(kFine));
      for (int i = 0; i < 4; ++i) value[i] = _mm256_add_epi32(_mm256_mullo_epi32(q[i], steps), r[i]);
      store_in_order(values + g * kGroup, value[0], value[1]);
      store_in_order(values + g * kGroup + 16, value[2], value[3]);
    } else {
      store_in_order(levels + g * kGroup, q);
      store_in_order(remainders + g * kGroup, r);
    }
    scales[g] = scale / kFine;  // what the sums of 254 * levels + remainders are multiplied by
    sums[g] = sum_lanes(total);
  }
  return out;
}

// How a weight stores its levels: unsigned 0..15 two a byte, with a scale and an offset per group of 32 (Q4_1, and
// Q4_0 and Q4_K as such); unsigned 0..31, the low four bits so and the fifth in a 32-bit word per group (Q5_0, Q5_1,
// Q5_K); signed bytes with a scale per group of 32 (Q8_0) or per 16 (Q6_K).
enum Kind { kQ4, kQ5, kQ8, kQ8Halves };

// An unsigned weight group's 32 levels (0..31) times an input group's levels and remainders, as 8 int32 partial
// sums of 254 * levels + remainders (lane i sums elements 4i..4i+3), from byte products (vpmaddubsw, 16 int16
// pair sums of at most 2 * 31 * 127, no saturation): exact, and below 2^24, so exact again as float.
inline __m256 group_dot(__m256i weights, __m256i levels, __m256i remainders) {
  const __m256i steps = _mm256_set1_epi16(static_cast<int16_t>(kFine));
  const __m256i coarse = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, levels), steps);
  const __m256i fine = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, remainders), _mm256_set1_epi16(1));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(coarse, fine));
}

// A group's 32 fifth bits (bit i of the little-endian word is element i's) as bytes of 16 or 0, in order:
// each byte picks its source byte of the word, then tests its own bit.
inline __m256i fifth_bits(const uint8_t* word) {
  int32_t bits;
  std::memcpy(&bits, word, sizeof bits);
  const __m256i source = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), source);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

// Weight rows [begin, end) times `R` input rows from `first`: each weight group is unpacked once for them.
struct Operands {
  const uint8_t* weights;
  const uint8_t* fifth;  // kQ5's fifth bits, 4 bytes a group
  const float* weight_scales;
  const float* weight_offsets;
  int64_t row_bytes, groups, out;
  const int8_t* levels;  // for unsigned weights
  const int8_t* remainders;
  const int16_t* values;  // for signed weights
  const float* scales;
  const float* sums;
  float* result;
};

// A signed weight group's 32 levels, widened to 16 bits (elements 0..15, then 16..31), times an input group's 32
// values, as two sets of 8 int32 sums: lane i of the first sums elements 2i and 2i + 1, of the second 16 + 2i and
// 17 + 2i. Exact: a level is at most 128 and a value 127 * 254 + 127 = 32385 in magnitude, so even both sets'
// lanes added stay below 2^24, exact again as float.
inline void wide_dot(const __m256i weights[2], const int16_t* values, __m256i sums[2]) {
  sums[0] = _mm256_madd_epi16(weights[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values)));
  sums[1] = _mm256_madd_epi16(weights[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16)));
}

// Signed weights (kQ8, kQ8Halves), with a scale per group or per half group. vpmaddubsw takes only unsigned
// weights: moving each weight's sign onto the inputs first (vpsignb) made these 1.8x slower at 8 rows.
template <Kind kind, int R>
void rows_times_signed_weights(const Operands& op, int64_t first, int64_t begin, int64_t end) {
  constexpr int64_t scales_per_group = kind == kQ8Halves ? 2 : 1;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* weights = reinterpret_cast<const int8_t*>(op.weights + n * op.row_bytes);
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
        if (kind == kQ8Halves) {  // the first set holds the group's first 16 elements, the second the next 16
          const float* s = weight_scales + 2 * g;
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[0]), _mm256_set1_ps(s[0] * op.scales[at]), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[1]), _mm256_set1_ps(s[1] * op.scales[at]), acc[r]);
        } else {
          const __m256 products = _mm256_cvtepi32_ps(_mm256_add_epi32(sums[0], sums[1]));
          acc[r] = _mm256_fmadd_ps(products, _mm256_set1_ps(weight_scales[g] * op.scales[at]), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) op.result[(first + r) * op.out + n] = sum_lanes(acc[r]);
  }
}

// Unsigned weights (kQ4, kQ5), with a scale and an offset per group.
template <Kind kind, int R>
void rows_times_weights(const Operands& op, int64_t first, int64_t begin, int64_t end) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* weights = op.weights + n * op.row_bytes;
    const float* weight_scales = op.weight_scales + n * op.groups;
    __m256 acc[R];
    float offset_sum[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      offset_sum[r] = 0.0f;
    }
    for (int64_t g = 0; g < op.groups; ++g) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + g * kGroup / 2));
      __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), nibble);
      if (kind == kQ5) wq = _mm256_or_si256(wq, fifth_bits(op.fifth + (n * op.groups + g) * 4));
      for (int r = 0; r < R; ++r) {
        const int64_t at = (first + r) * op.groups + g;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(op.levels + at * kGroup));
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(op.remainders + at * kGroup));
        const __m256 products = group_dot(wq, xq, xr);
        acc[r] = _mm256_fmadd_ps(products, _mm256_set1_ps(weight_scales[g] * op.scales[at]), acc[r]);
        offset_sum[r] += op.weight_offsets[n * op.groups + g] * op.sums[at];
      }
    }
    for (int r = 0; r < R; ++r) op.result[(first + r) * op.out + n] = sum_lanes(acc[r]) + offset_sum[r];
  }
}

template <Kind kind, int R>
void rows_times(const Operands& op, int64_t first, int64_t begin, int64_t end) {
  if constexpr (kind == kQ8 || kind == kQ8Halves) {
    rows_times_signed_weights<kind, R>(op, first, begin, end);
  } else {
    rows_times_weights<kind, R>(op, first, begin, end);
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

// x [rows, in] times the weight [out, ...], in x's dtype.
at::Tensor grouped_mm(Kind kind, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales,
                      const at::Tensor* offsets, const at::Tensor* fifth) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % kGroup == 0, "dot8: input must be [rows, a multiple of 32]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), width = x.size(1), out = weight.size(0), groups = width / kGroup;
  const bool is_signed = kind == kQ8 || kind == kQ8Halves;
  const int64_t scales_per_group = kind == kQ8Halves ? 2 : 1;
  TORCH_CHECK(weight.size(1) * (is_signed ? 1 : 2) == width && scales.size(0) == out &&
                  scales.size(1) == groups * scales_per_group && (!fifth || fifth->size(1) == groups * 4),
              "dot8: shapes do not match");
  TORCH_CHECK(weight.scalar_type() == (is_signed ? at::kChar : at::kByte) && scales.scalar_type() == at::kFloat &&
                  (!offsets || offsets->scalar_type() == at::kFloat) && (!fifth || fifth->scalar_type() == at::kByte),
              "dot8: levels must be ", is_signed ? "int8" : "uint8", ", scales and offsets float32");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && (!offsets || offsets->is_contiguous()) &&
                  (!fifth || fifth->is_contiguous()),
              "dot8: the weight's tensors must be contiguous");
  const Levels in = to_levels(x, is_signed);
  at::Tensor y = at::empty({rows, out}, at::kFloat);
  const Operands op{
      reinterpret_cast<const uint8_t*>(weight.data_ptr()),
      fifth ? fifth->data_ptr<uint8_t>() : nullptr,
      scales.data_ptr<float>(),
      offsets ? offsets->data_ptr<float>() : nullptr,
      weight.size(1),
      groups,
      out,
      in.levels.data_ptr<int8_t>(),
      in.remainders.data_ptr<int8_t>(),
      in.values.data_ptr<int16_t>(),
      in.scales.data_ptr<float>(),
      in.sums.data_ptr<float>(),
      y.data_ptr<float>(),
  };
  switch (kind) {
    case kQ4: all_rows<kQ4>(op, rows); break;
    case kQ5: all_rows<kQ5>(op, rows); break;
    case kQ8: all_rows<kQ8>(op, rows); break;
    case kQ8Halves: all_rows<kQ8Halves>(op, rows); break;
  }
  return y.to(x_in.scalar_type());
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales, const at::Tensor& offsets) {
  return grouped_mm(kQ4, x, levels, scales, &offsets, nullptr);
}

at::Tensor q5_mm(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& fifth, const at::Tensor& scales,
                 const at::Tensor& offsets) {
  return grouped_mm(kQ5, x, levels, scales, &offsets, &fifth);
}

// Scales per group of 32 or, twice as many, per 16.
at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales) {
  return grouped_mm(scales.size(1) * kGroup == levels.size(1) ? kQ8 : kQ8Halves, x, levels, scales, nullptr, nullptr);
}

}  // namespace

TORCH_LIBRARY(llmchat_dot8, m) {
  m.def("q4_mm(Tensor x, Tensor levels, Tensor scales, Tensor offsets) -> Tensor");
  m.def("q5_mm(Tensor x, Tensor levels, Tensor fifth, Tensor scales, Tensor offsets) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor levels, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmchat_dot8, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q5_mm", &q5_mm);
  m.impl("q8_mm", &q8_mm);
}
