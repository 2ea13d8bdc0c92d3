// Decode-step matmuls over 4-, 5-, 6- and 8-bit weights as integer dot products, for AVX2 CPUs (dot8.py).
//
// Each input row is rounded per group of 32 to 8-bit levels of its own scale, and what they leave to 8-bit
// levels of a 254th of it, so a group's dot product with a weight group is two sums of byte products
// (vpmaddubsw, vpmaddwd), combined exactly in integers and then times the two scales. That is much less
// work than widening every weight to float, as torch's int4 kernel does.

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
// multiply it).
struct Levels {
  at::Tensor levels, remainders, scales, sums;
};

constexpr float kFine = 254.0f;

// 32 int32 values in -127..127 stored as bytes in order: the packs interleave 128-bit lanes, the
// permute puts them back.
inline void store_in_order(int8_t* out, const __m256i q[4]) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, order));
}

Levels to_levels(const at::Tensor& x) {
  const int64_t count = x.numel() / kGroup;
  Levels out{
      at::empty({x.numel()}, at::kChar),
      at::empty({x.numel()}, at::kChar),
      at::empty({count}, at::kFloat),
      at::empty({count}, at::kFloat),
  };
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
      // At most 127.5 in magnitude, -128 only by a rounding error: the sign trick cannot negate -128.
      r[i] = _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(rest, fine_inverse)), _mm256_set1_epi32(-127));
    }
    store_in_order(levels + g * kGroup, q);
    store_in_order(remainders + g * kGroup, r);
    scales[g] = scale / kFine;  // what the sums of 254 * levels + remainders are multiplied by
    sums[g] = sum_lanes(total);
  }
  return out;
}

// How a weight stores its levels: unsigned 0..15 two a byte, with a scale and an offset per group of 32 (Q4_1, and
// Q4_0 and Q4_K as such); unsigned 0..31, the low four bits so and the fifth in a 32-bit word per group (Q5_0, Q5_1,
// Q5_K); signed bytes with a scale per group of 32 (Q8_0) or per 16 (Q6_K).
enum Kind { kQ4, kQ5, kQ8, kQ8Halves };

// One weight group's 32 levels times one input group's, as 16 int16 pair sums (at most 2 * 127 * 127, no
// saturation). `weights` are unsigned (0..31) or, with `is_signed`, signed bytes.
template <bool is_signed>
inline __m256i pair_sums(__m256i weights, __m256i inputs) {
  if (is_signed) {  // vpmaddubsw multiplies unsigned by signed: move each weight's sign onto its input
    return _mm256_maddubs_epi16(_mm256_sign_epi8(weights, weights), _mm256_sign_epi8(inputs, weights));
  }
  return _mm256_maddubs_epi16(weights, inputs);
}

// The weight group times the input group's levels and remainders, as 8 int32 partial sums of 254 * levels
// + remainders (lane i sums elements 4i..4i+3): exact, and below 2^24, so exact again as float.
template <bool is_signed>
inline __m256 group_dot(__m256i weights, __m256i levels, __m256i remainders) {
  const __m256i coarse = _mm256_madd_epi16(pair_sums<is_signed>(weights, levels), _mm256_set1_epi16(static_cast<int16_t>(kFine)));
  const __m256i fine = _mm256_madd_epi16(pair_sums<is_signed>(weights, remainders), _mm256_set1_epi16(1));
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
  const int8_t* levels;
  const int8_t* remainders;
  const float* scales;
  const float* sums;
  float* result;
};

template <Kind kind, int R>
void rows_times_weights(const Operands& op, int64_t first, int64_t begin, int64_t end) {
  constexpr bool is_signed = kind == kQ8 || kind == kQ8Halves;
  constexpr int64_t scales_per_group = kind == kQ8Halves ? 2 : 1;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* weights = op.weights + n * op.row_bytes;
    const float* weight_scales = op.weight_scales + n * op.groups * scales_per_group;
    __m256 acc[R];
    float offset_sum[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      offset_sum[r] = 0.0f;
    }
    for (int64_t g = 0; g < op.groups; ++g) {
      __m256i wq;
      if (is_signed) {
        wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + g * kGroup));
      } else {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + g * kGroup / 2));
        wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), nibble);
        if (kind == kQ5) wq = _mm256_or_si256(wq, fifth_bits(op.fifth + (n * op.groups + g) * 4));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t at = (first + r) * op.groups + g;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(op.levels + at * kGroup));
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(op.remainders + at * kGroup));
        const __m256 products = group_dot<is_signed>(wq, xq, xr);
        __m256 scale;
        if (kind == kQ8Halves) {  // lanes 0..3 hold the group's first 16 elements, 4..7 the next 16
          const float* s = weight_scales + 2 * g;
          scale = _mm256_set_m128(_mm_set1_ps(s[1] * op.scales[at]), _mm_set1_ps(s[0] * op.scales[at]));
        } else {
          scale = _mm256_set1_ps(weight_scales[g] * op.scales[at]);
        }
        acc[r] = _mm256_fmadd_ps(products, scale, acc[r]);
        if (!is_signed) offset_sum[r] += op.weight_offsets[n * op.groups + g] * op.sums[at];
      }
    }
    for (int r = 0; r < R; ++r) op.result[(first + r) * op.out + n] = sum_lanes(acc[r]) + offset_sum[r];
  }
}

template <Kind kind>
void all_rows(const Operands& op, int64_t rows) {
  at::parallel_for(0, op.out, 16, [&](int64_t begin, int64_t end) {
    int64_t first = 0;
    for (; first + 4 <= rows; first += 4) rows_times_weights<kind, 4>(op, first, begin, end);
    switch (rows - first) {
      case 3: rows_times_weights<kind, 3>(op, first, begin, end); break;
      case 2: rows_times_weights<kind, 2>(op, first, begin, end); break;
      case 1: rows_times_weights<kind, 1>(op, first, begin, end); break;
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
  const Levels in = to_levels(x);
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
