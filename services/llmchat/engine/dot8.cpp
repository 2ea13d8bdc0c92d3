// Matmuls over 4-, 5-, 6- and 8-bit weights as integer dot products, for AVX2 CPUs (dot8.py).
//
// A weight's levels are one byte each (int4.py unpacks the 4- and 5-bit ones at load), in tiles of 8 outputs so that
// one instruction multiplies a few inputs into 8 outputs at once: a group's sums need no summing across lanes, and
// its scales are applied to 8 outputs in one multiply. Against levels laid out by output (two vpmaddwd per output
// and group, summed across lanes at the end, a scale broadcast per output), tiles took 0.5x (Q6_K) to 0.75x (Q5_0,
// Q8_0) the time at 8 to 512 rows (2-core AVX2 host). Two ways to round the inputs, per group of 32:
//
// - Tiles: to 8-bit levels of their own scale, and what they leave to 8-bit levels of a 254th of it; both meet the
//   weight as one 16-bit value (254 * level + remainder) by vpmaddwd, a pair of inputs at a time. About 16 bits of
//   each input survive. Any signed levels (Q8_0's).
// - Quads: to 8-bit levels alone, as llama.cpp does, meeting levels shifted to unsigned bytes by vpmaddubsw, 4
//   inputs at a time: half the instructions per product. Levels in -32..31 only (every type but Q8_0), so that
//   two quads' sums fit 16 bits. 0.65 to 0.75x the time of Tiles at 4 to 512 rows (Q4_K, Q5_0; Q6_K's scales per
//   16: 0.8x). Whether a model's outputs allow the coarser inputs is decided at load (input_rounding.py).
//
// Both beat oneDNN's float32 matmul at every row count timed. Multiplying packed 4- and 5-bit levels as bytes
// (vpmaddubsw against the levels, then the remainders) took 1.3x (Q4_K) to 1.8x (Q5_0) as long as Tiles: unpacking
// them for every block of rows cost more than their fewer bytes saved. A single row, whose matmul waits on memory
// rather than on instructions, reads a copy of 4- and 5-bit levels packed in 5 bits instead (five_row).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
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

// A group of 32 inputs, the scale that puts its largest magnitude at level 127, and its exact sum.
struct Group {
  __m256 part[4];
  float scale, sum;
};

inline Group load_group(const float* v) {
  Group group;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 largest = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    group.part[i] = _mm256_loadu_ps(v + 8 * i);
    largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, group.part[i]));
    total = _mm256_add_ps(total, group.part[i]);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  group.scale = _mm_cvtss_f32(m) / 127.0f;
  group.sum = sum_lanes(total);
  return group;
}

Levels to_levels(const at::Tensor& x) {
  const int64_t count = x.numel() / kGroup;
  Levels out{at::empty({x.numel()}, at::kShort), at::empty({count}, at::kFloat), at::empty({count}, at::kFloat)};
  int16_t* values = out.values.data_ptr<int16_t>();
  const float* in = x.data_ptr<float>();
  float* scales = out.scales.data_ptr<float>();
  float* sums = out.sums.data_ptr<float>();
  const __m256i steps = _mm256_set1_epi32(static_cast<int>(kFine));
  for (int64_t g = 0; g < count; ++g) {
    const Group group = load_group(in + g * kGroup);
    const __m256* part = group.part;
    const float scale = group.scale;
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
    sums[g] = group.sum;
  }
  return out;
}

// Rows of x as one signed byte per value: levels of a scale per group of 32 that puts the group's largest magnitude
// at 127 (as llama.cpp rounds its inputs). With each group's scale, 32 times the sum of the levels of each half of
// 16 (what the weights' shift of 32 adds to the sums, see Quads), and the group's exact sum (offsets multiply it).
constexpr int32_t kShift = 32;  // added to a weight's levels to make them unsigned (Quads)

struct Bytes {
  at::Tensor values, scales, shifts, sums;
};

Bytes to_bytes(const at::Tensor& x) {
  const int64_t count = x.numel() / kGroup;
  Bytes out{at::empty({x.numel()}, at::kChar), at::empty({count}, at::kFloat), at::empty({count, 2}, at::kInt),
            at::empty({count}, at::kFloat)};
  int8_t* values = out.values.data_ptr<int8_t>();
  const float* in = x.data_ptr<float>();
  float* scales = out.scales.data_ptr<float>();
  int32_t* shifts = out.shifts.data_ptr<int32_t>();
  float* sums = out.sums.data_ptr<float>();
  for (int64_t g = 0; g < count; ++g) {
    const Group group = load_group(in + g * kGroup);
    const __m256* part = group.part;
    const float scale = group.scale;
    const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));  // nearest, ties to even
    // int32 to int8 in order: each pack interleaves 128-bit lanes, the permute puts the four 32-bit runs back.
    const __m256i words = _mm256_packs_epi32(q[0], q[1]), words_high = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words_high),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + g * kGroup), bytes);
    const __m256i low = _mm256_add_epi32(q[0], q[1]), high = _mm256_add_epi32(q[2], q[3]);
    shifts[2 * g] = kShift * static_cast<int32_t>(sum_lanes(_mm256_cvtepi32_ps(low)));  // exact: |sum| < 2^24
    shifts[2 * g + 1] = kShift * static_cast<int32_t>(sum_lanes(_mm256_cvtepi32_ps(high)));
    scales[g] = scale;
    sums[g] = group.sum;
  }
  return out;
}

// A weight in tiles of 8 outputs (dot8.py's `tiled`): for each 8 outputs and each group of 32 inputs, 256 levels as
// 16 pairs of inputs, each pair's 8 outputs side by side (int8 [out / 8, groups, 16, 8, 2]); the scales of those 8
// outputs for the group side by side ([out / 8, groups, 8], or Q6_K's per 16: [out / 8, groups, 2, 8]), and their
// offsets likewise ([out / 8, groups, 8], or none). With the input rows' values, scales, sums (and Quads' shifts).
template <typename Level, typename Value>
struct Weight {
  const Level* levels;
  const float* scales;
  const float* offsets;  // or null
  int64_t groups, out;
  const Value* values;
  const float* value_scales;
  const int32_t* shifts;  // Quads' only
  const float* sums;
  float* result;
};
using Tiles = Weight<int8_t, int16_t>;  // inputs from to_levels

constexpr int64_t kTile = 8;                  // outputs a tile holds
constexpr int64_t kTileBytes = kTile * kGroup;  // levels of one tile and group
constexpr int kRows = 4;                      // input rows a tile's levels are widened once for
constexpr int64_t kTilesPerPass = 16;         // tiles (14 KiB of levels at 896 inputs) that stay in cache across rows

// One tile's 8 outputs for input rows first..first + R - 1, written to the result. A pair of a group's levels,
// widened to 16 bits, meets each row's two values broadcast to every output (vpmaddwd), so each lane holds one
// output's sum and no lanes are summed across. A lane's 32 products stay below 2^28: a level is at most 128 and a
// value 127 * 254 + 127 = 32385 in magnitude; as float they round past 2^24, as a float sum would. (Written out
// rather than through a helper taking arrays of rows: that measured 1.3x slower.)
template <bool per_16, int R>
void tile_rows(const Tiles& t, int64_t tile, int64_t first) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int16_t* values = t.values + first * t.groups * kGroup;
  for (int64_t g = 0; g < t.groups; ++g) {
    const int8_t* levels = t.levels + (tile * t.groups + g) * kTileBytes;
    __m256i low[R], high[R];
    for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_si256();
    for (int p = 0; p < 16; ++p) {
      const __m256i pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(levels + p * 16)));
      for (int r = 0; r < R; ++r) {
        const int32_t both = *reinterpret_cast<const int32_t*>(values + (r * t.groups + g) * kGroup + 2 * p);
        const __m256i products = _mm256_madd_epi16(pair, _mm256_set1_epi32(both));
        if (per_16 && p >= 8) {  // Q6_K: the group's second 16 inputs have a scale of their own
          high[r] = _mm256_add_epi32(high[r], products);
        } else {
          low[r] = _mm256_add_epi32(low[r], products);
        }
      }
    }
    const int64_t at = tile * t.groups + g;
    const __m256 scale = _mm256_loadu_ps(t.scales + at * kTile * (per_16 ? 2 : 1));
    for (int r = 0; r < R; ++r) {
      const __m256 value_scale = _mm256_set1_ps(t.value_scales[(first + r) * t.groups + g]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low[r]), _mm256_mul_ps(scale, value_scale), acc[r]);
    }
    if (per_16) {
      const __m256 scale_high = _mm256_loadu_ps(t.scales + (2 * at + 1) * kTile);
      for (int r = 0; r < R; ++r) {
        const __m256 value_scale = _mm256_set1_ps(t.value_scales[(first + r) * t.groups + g]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high[r]), _mm256_mul_ps(scale_high, value_scale), acc[r]);
      }
    }
    if (t.offsets) {  // Q4_1, Q4_K, Q5_1, Q5_K: each group's offset times the input group's exact sum
      const __m256 offset = _mm256_loadu_ps(t.offsets + at * kTile);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(t.sums[(first + r) * t.groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(t.result + (first + r) * t.out + tile * kTile, acc[r]);
}

template <bool per_16, int R>
struct TileRows {
  static void run(const Tiles& t, int64_t tile, int64_t first) { tile_rows<per_16, R>(t, tile, first); }
};

// A weight whose levels lie in -32..31 (every type but Q8_0), in tiles of 8 outputs as Tiles but 4 inputs to a lane:
// for each 8 outputs and group of 32 inputs, 8 quads of inputs, each quad's 8 outputs side by side, one unsigned
// byte a level shifted by kShift (uint8 [out / 8, groups, 8, 8, 4]). Inputs rounded to one byte (to_bytes).
using Quads = Weight<uint8_t, int8_t>;

// tile_rows for Quads. A quad of levels meets each row's 4 inputs broadcast to every output (vpmaddubsw: unsigned
// levels times signed inputs, summed in pairs to 16 bits), two quads are added in 16 bits and then widened in pairs
// to 32 (vpmaddwd by ones): each lane again holds one output's sum. 16 bits hold it: a level is at most 63 and an
// input 127 in magnitude, so two quads' pair sums stay within 4 * 63 * 127 = 32004. Half the instructions of
// Tiles' 16-bit inputs per product, and half the bytes of inputs.
template <bool per_16, int R>
void quad_rows(const Quads& t, int64_t tile, int64_t first) {
  constexpr int kQuads = per_16 ? 4 : 8;  // quads that share a scale
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* values = t.values + first * t.groups * kGroup;
  for (int64_t g = 0; g < t.groups; ++g) {
    const uint8_t* levels = t.levels + (tile * t.groups + g) * kTileBytes;
    const int64_t at = tile * t.groups + g;
    for (int h = 0; h < (per_16 ? 2 : 1); ++h) {
      __m256i total[R];
      for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_si256();
      for (int q = h * kQuads; q < (h + 1) * kQuads; q += 2) {
        const __m256i first_quad = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(levels + q * 32));
        const __m256i second_quad = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(levels + q * 32 + 32));
        for (int r = 0; r < R; ++r) {
          const int8_t* in = values + (r * t.groups + g) * kGroup + 4 * q;
          const __m256i pairs =
              _mm256_add_epi16(_mm256_maddubs_epi16(first_quad, _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(in))),
                               _mm256_maddubs_epi16(second_quad, _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(in + 4))));
          total[r] = _mm256_add_epi32(total[r], _mm256_madd_epi16(pairs, ones));
        }
      }
      const __m256 scale = _mm256_loadu_ps(t.scales + (per_16 ? 2 * at + h : at) * kTile);
      for (int r = 0; r < R; ++r) {
        const int64_t row_group = (first + r) * t.groups + g;
        const int32_t shift = per_16 ? t.shifts[2 * row_group + h] : t.shifts[2 * row_group] + t.shifts[2 * row_group + 1];
        const __m256i exact = _mm256_sub_epi32(total[r], _mm256_set1_epi32(shift));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(scale, _mm256_set1_ps(t.value_scales[row_group])),
                                 acc[r]);
      }
    }
    if (t.offsets) {
      const __m256 offset = _mm256_loadu_ps(t.offsets + at * kTile);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(t.sums[(first + r) * t.groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(t.result + (first + r) * t.out + tile * kTile, acc[r]);
}

template <bool per_16, int R>
struct QuadRows {
  static void run(const Quads& t, int64_t tile, int64_t first) { quad_rows<per_16, R>(t, tile, first); }
};

// Every row through a weight's tiles (Tiles or Quads), split among threads by tiles. A pass over a few tiles takes
// every row in turn, so their levels are read from memory once however many rows there are. A row's result does not
// depend on the rows beside it: each row's sums run in the same order, in blocks of kRows, a last block of 3 or 2, or
// alone. (The last 2 or 3 rows as one block rather than one at a time took 0.7-0.8x the time, Q5_0 and Q8_0 shapes,
// 2-core AVX2 host.)
template <typename Weight, template <bool, int> class Rows, bool per_16>
void all_rows(const Weight& t, int64_t rows) {
  at::parallel_for(0, t.out / kTile, 2, [&](int64_t begin, int64_t end) {
    for (int64_t pass = begin; pass < end; pass += kTilesPerPass) {
      const int64_t stop = std::min(end, pass + kTilesPerPass);
      int64_t first = 0;
      for (; first + kRows <= rows; first += kRows)
        for (int64_t tile = pass; tile < stop; ++tile) Rows<per_16, kRows>::run(t, tile, first);
      const int64_t rest = rows - first;
      for (int64_t tile = pass; tile < stop; ++tile) {
        if (rest == 3) Rows<per_16, 3>::run(t, tile, first);
        if (rest == 2) Rows<per_16, 2>::run(t, tile, first);
        if (rest == 1) Rows<per_16, 1>::run(t, tile, first);
      }
    }
  });
}

void pairs_mm(const at::Tensor& x, const at::Tensor& levels, const float* scales, const float* offsets, bool per_16,
              at::Tensor& y) {
  const Levels in = to_levels(x);
  const Tiles t{levels.data_ptr<int8_t>(), scales,    offsets, levels.size(1), y.size(1), in.values.data_ptr<int16_t>(),
                in.scales.data_ptr<float>(), nullptr, in.sums.data_ptr<float>(), y.data_ptr<float>()};
  if (per_16) {
    all_rows<Tiles, TileRows, true>(t, x.size(0));
  } else {
    all_rows<Tiles, TileRows, false>(t, x.size(0));
  }
}

void quads_mm(const at::Tensor& x, const at::Tensor& levels, const float* scales, const float* offsets, bool per_16,
              at::Tensor& y) {
  const Bytes in = to_bytes(x);
  const Quads t{levels.data_ptr<uint8_t>(),  scales, offsets, levels.size(1), y.size(1), in.values.data_ptr<int8_t>(),
                in.scales.data_ptr<float>(), in.shifts.data_ptr<int32_t>(), in.sums.data_ptr<float>(), y.data_ptr<float>()};
  if (per_16) {
    all_rows<Quads, QuadRows, true>(t, x.size(0));
  } else {
    all_rows<Quads, QuadRows, false>(t, x.size(0));
  }
}

// One row through a weight of 4- or 5-bit levels (Quads whose bytes lie in base..base + 31, scales per 32) packed in 5
// bits (dot8.py's `fives`): per tile and group, the four pairs of quads as nibbles (the first quad of a pair low, uint8
// [out / 8, groups, 4, 32]) and their fifth bits (bit k of byte i: quad k's byte i, uint8 [out / 8, groups, 32]), each
// a byte less `base` (16 for signed levels in -16..15, 32 for unsigned ones in 0..31). One row's matmul reads every
// level once and does little with it, so it waits on memory: 0.6 byte a level instead of 1 took 0.59x (q/k/v), 0.65x
// (gate/up) and 0.75x (o) the time of quad_rows at one row for Qwen2.5-0.5B's Q5_0 shapes, every layer's levels cold
// (2-core AVX2 host). Blocks of rows keep quad_rows: there the unpacking would be done for every block, by a kernel
// that is bound by the instructions it issues. The sums are quad_rows' to the bit: the same integers (less the shift
// that `base` already took), scaled in the same order.
void five_row(const Quads& t, const uint8_t* nibbles, const uint8_t* fifths, int64_t base, int64_t tile) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
  for (int64_t g = 0; g < t.groups; ++g) {
    const int64_t at = tile * t.groups + g;
    const uint8_t* pairs = nibbles + at * 4 * 32;
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(fifths + at * 32));
    // Quad k's fifth bits moved to bit 4 of each byte; 16-bit shifts leak bits across bytes only outside bit 4.
    auto fifth_of = [&](int k) {
      return _mm256_and_si256(k <= 4 ? _mm256_slli_epi16(bits, 4 - k) : _mm256_srli_epi16(bits, k - 4), fifth);
    };
    const int8_t* in = t.values + g * kGroup;
    __m256i total = _mm256_setzero_si256();
    for (int q = 0; q < 8; q += 2) {
      const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + q * 16));
      const __m256i first_quad = _mm256_or_si256(_mm256_and_si256(both, low), fifth_of(q));
      const __m256i second_quad = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(both, 4), low), fifth_of(q + 1));
      const __m256i in_first = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(in + 4 * q));
      const __m256i in_second = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(in + 4 * q + 4));
      const __m256i sums =
          _mm256_add_epi16(_mm256_maddubs_epi16(first_quad, in_first), _mm256_maddubs_epi16(second_quad, in_second));
      total = _mm256_add_epi32(total, _mm256_madd_epi16(sums, ones));
    }
    const int32_t shift = (t.shifts[2 * g] + t.shifts[2 * g + 1]) / kShift * static_cast<int32_t>(kShift - base);
    const __m256i exact = _mm256_sub_epi32(total, _mm256_set1_epi32(shift));
    const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(t.scales + at * kTile), _mm256_set1_ps(t.value_scales[g]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, acc);
    if (t.offsets) acc = _mm256_fmadd_ps(_mm256_loadu_ps(t.offsets + at * kTile), _mm256_set1_ps(t.sums[g]), acc);
  }
  _mm256_storeu_ps(t.result + tile * kTile, acc);
}

// x [1, in] times a weight in 5-bit quads (see five_row), in x's dtype.
at::Tensor fives_mv(const at::Tensor& x_in, const at::Tensor& nibbles, const at::Tensor& fifths, int64_t base,
                    const at::Tensor& scales, const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1 && x_in.size(1) % kGroup == 0,
              "dot8: fives_mv takes one row of a multiple of 32");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t groups = x.size(1) / kGroup, tiles = nibbles.size(0);
  TORCH_CHECK(nibbles.dim() == 4 && nibbles.size(1) == groups && nibbles.size(2) == 4 && nibbles.size(3) == 32 &&
                  fifths.dim() == 3 && fifths.size(0) == tiles && fifths.size(1) == groups && fifths.size(2) == 32 &&
                  nibbles.scalar_type() == at::kByte && fifths.scalar_type() == at::kByte,
              "dot8: fives must be nibbles [out / 8, in / 32, 4, 32] and fifth bits [out / 8, in / 32, 32] (uint8)");
  TORCH_CHECK(base == 16 || base == 32, "dot8: fives' base must be 16 or 32");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == tiles && scales.size(1) == groups && scales.size(2) == kTile &&
                  scales.scalar_type() == at::kFloat && (!offsets || offsets->sizes() == scales.sizes()),
              "dot8: fives' scales and offsets must be [out / 8, in / 32, 8] (float32)");
  TORCH_CHECK(nibbles.is_contiguous() && fifths.is_contiguous() && scales.is_contiguous() &&
                  (!offsets || offsets->is_contiguous()),
              "dot8: the weight's tensors must be contiguous");
  const Bytes in = to_bytes(x);
  at::Tensor y = at::empty({1, tiles * kTile}, at::kFloat);
  const Quads t{nullptr, scales.data_ptr<float>(), offsets ? offsets->data_ptr<float>() : nullptr, groups, y.size(1),
                in.values.data_ptr<int8_t>(), in.scales.data_ptr<float>(), in.shifts.data_ptr<int32_t>(),
                in.sums.data_ptr<float>(), y.data_ptr<float>()};
  const uint8_t* nibble_data = nibbles.data_ptr<uint8_t>();
  const uint8_t* fifth_data = fifths.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 2, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) five_row(t, nibble_data, fifth_data, base, tile);
  });
  return y.to(x_in.scalar_type());
}

// x [rows, in] times a weight in tiles (see Tiles and Quads), in x's dtype.
at::Tensor levels_mm(const at::Tensor& x_in, const at::Tensor& levels, const at::Tensor& scales,
                     const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % kGroup == 0, "dot8: input must be [rows, a multiple of 32]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), groups = x.size(1) / kGroup, tiles = levels.size(0);
  const bool per_16 = scales.dim() == 4, quads = levels.scalar_type() == at::kByte;
  TORCH_CHECK(levels.dim() == 5 && levels.size(1) == groups && levels.size(3) == kTile &&
                  (quads ? levels.size(2) == 8 && levels.size(4) == 4 : levels.size(2) == 16 && levels.size(4) == 2),
              "dot8: levels must be tiles [out / 8, in / 32, 16, 8, 2] (int8) or [out / 8, in / 32, 8, 8, 4] (uint8)");
  TORCH_CHECK(scales.size(0) == tiles && scales.size(1) == groups && scales.size(-1) == kTile &&
                  (per_16 ? scales.size(2) == 2 : scales.dim() == 3) &&
                  (!offsets || (!per_16 && offsets->sizes() == scales.sizes())),
              "dot8: scales and offsets must be [out / 8, in / 32, 8] (or scales per 16: [out / 8, in / 32, 2, 8])");
  TORCH_CHECK((quads || levels.scalar_type() == at::kChar) && scales.scalar_type() == at::kFloat &&
                  (!offsets || offsets->scalar_type() == at::kFloat),
              "dot8: levels must be int8 or uint8, scales and offsets float32");
  TORCH_CHECK(levels.is_contiguous() && scales.is_contiguous() && (!offsets || offsets->is_contiguous()),
              "dot8: the weight's tensors must be contiguous");
  at::Tensor y = at::empty({rows, tiles * kTile}, at::kFloat);
  const float* offset_data = offsets ? offsets->data_ptr<float>() : nullptr;
  if (quads) {
    quads_mm(x, levels, scales.data_ptr<float>(), offset_data, per_16, y);
  } else {
    pairs_mm(x, levels, scales.data_ptr<float>(), offset_data, per_16, y);
  }
  return y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(llmchat_dot8, m) {
  m.def("levels_mm(Tensor x, Tensor levels, Tensor scales, Tensor? offsets) -> Tensor");
  m.def("fives_mv(Tensor x, Tensor nibbles, Tensor fifths, int base, Tensor scales, Tensor? offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmchat_dot8, CPU, m) {
  m.impl("levels_mm", &levels_mm);
  m.impl("fives_mv", &fives_mv);
}
