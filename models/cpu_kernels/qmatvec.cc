// A few rows of activations times a block-quantized weight matrix, for decoding on CPU
// (one token per call, or the few tokens of a verify call): y[r, o] = sum_i x[r, i] w[o, i]
// with w[o, i] = q[o, i] * scale[o, g] (+ min[o, g]), g = i / 32 (GGUF's Q8_0 / Q4_0 /
// Q4_1 blocks and the int4 groups of models/quant.py), r < kMaxRows. Each group of the
// weight is read and converted to floats once and multiplied with every row.
//
// Why it exists (README "Quantized weights"): XLA:CPU does not fuse the dequantization
// into its dot; it writes each dequantized float tile and then reads it, so a 4-bit
// weight costs about what a float one does. Here the quantized bytes are read once and
// the dequantization happens in registers, as llama.cpp's kernels do (but with float
// activations: no second rounding of x).
//
// Weight values come as int8 bytes (one value per byte, -128 .. 127) or as packed nibbles
// (two 4-bit values per byte, q in 0 .. 15 standing for q - 8; in each group of 32 the
// low nibble of byte j is value j and the high nibble value j + 16, GGUF's order).
// The outputs are split over XLA's intra-op thread pool.
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroup = 32;

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
constexpr bool kVectorized = true;

inline float Sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
// 8 int8 / uint8 values (the low 8 bytes of b) as floats.
inline __m256 Signed8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
inline __m256 Unsigned8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

// A group's 32 values as four vectors of 8 floats (packed: the nibbles q, 0 .. 15).
template <bool kPacked>
inline void Convert(const uint8_t* q, __m256* w) {
  if constexpr (kPacked) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    w[0] = Unsigned8(lo); w[1] = Unsigned8(_mm_srli_si128(lo, 8));
    w[2] = Unsigned8(hi); w[3] = Unsigned8(_mm_srli_si128(hi, 8));
  } else {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    w[0] = Signed8(lo); w[1] = Signed8(_mm_srli_si128(lo, 8));
    w[2] = Signed8(hi); w[3] = Signed8(_mm_srli_si128(hi, 8));
  }
}
#else
constexpr bool kVectorized = false;
#endif

// Value j of a group (packed: q - 8 is the weight's value; see the header).
template <bool kPacked>
inline float Value(const uint8_t* q, int64_t j) {
  if constexpr (kPacked) {
    const uint8_t b = q[j % (kGroup / 2)];
    return static_cast<float>(j < kGroup / 2 ? (b & 15) : (b >> 4));
  } else {
    return static_cast<float>(reinterpret_cast<const int8_t*>(q)[j]);
  }
}

constexpr int64_t kMaxRows = 16;

// Outputs [begin, end) of y [R, out] for R rows (a compile-time count, so the R
// accumulators stay in registers). x: [R, in]; xsum: [R, in / 32] (each group's sum of
// x), read when kMin (packed values are q, not q - 8: their offset is folded into min
// by the caller).
template <bool kPacked, bool kMin, int R>
void Outputs(const float* x, const float* xsum, const uint8_t* q, const float* scale,
             const float* min, float* y, int64_t in, int64_t out, int64_t begin,
             int64_t end) {
  const int64_t groups = in / kGroup;
  const int64_t group_bytes = kPacked ? kGroup / 2 : kGroup;
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* qrow = q + o * groups * group_bytes;
    const float* srow = scale + o * groups;
    float offset[R] = {0.f};
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 w[4];
      Convert<kPacked>(qrow + g * group_bytes, w);
      const __m256 s = _mm256_set1_ps(srow[g]);
      for (int r = 0; r < R; ++r) {
        const float* xg = x + r * in + g * kGroup;
        __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xg));
        t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xg + 8), t);
        t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xg + 16), t);
        t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xg + 24), t);
        acc[r] = _mm256_fmadd_ps(t, s, acc[r]);
        if constexpr (kMin) offset[r] += min[o * groups + g] * xsum[r * groups + g];
      }
    }
    for (int r = 0; r < R; ++r) y[r * out + o] = Sum(acc[r]) + offset[r];
#else
    for (int r = 0; r < R; ++r) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.f;
        for (int64_t j = 0; j < kGroup; ++j)
          t += Value<kPacked>(qrow + g * group_bytes, j) * x[r * in + g * kGroup + j];
        total += t * srow[g];
        if constexpr (kMin) offset[r] += min[o * groups + g] * xsum[r * groups + g];
      }
      y[r * out + o] = total + offset[r];
    }
#endif
  }
}

using OutputsFn = void (*)(const float*, const float*, const uint8_t*, const float*,
                           const float*, float*, int64_t, int64_t, int64_t, int64_t);

// Outputs<.., R> for R = 1 .. kMaxRows, indexed by R - 1.
template <bool kPacked, bool kMin, size_t... I>
constexpr std::array<OutputsFn, sizeof...(I)> OutputsTable(std::index_sequence<I...>) {
  return {&Outputs<kPacked, kMin, static_cast<int>(I) + 1>...};
}

template <bool kPacked, bool kMin>
ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                  ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> min,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = scale.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("scale must be [out, in / 32]");
  const int64_t out = dims[0], in = dims[1] * kGroup, groups = dims[1];
  const int64_t rows = in > 0 ? static_cast<int64_t>(x.element_count()) / in : 0;
  if (rows < 1 || rows > kMaxRows || x.element_count() != static_cast<size_t>(rows * in) ||
      y->element_count() != static_cast<size_t>(rows * out) ||
      q.size_bytes() != static_cast<size_t>(out * (kPacked ? in / 2 : in)))
    return ffi::Error::InvalidArgument("qmatvec: operand sizes disagree");
  const float* xp = x.typed_data();
  std::vector<float> xsum(kMin ? rows * groups : 0);
  for (int64_t k = 0; k < static_cast<int64_t>(xsum.size()); ++k) {
    float total = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) total += xp[k * kGroup + j];
    xsum[k] = total;
  }
  const auto* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scale.typed_data();
  const float* mp = kMin ? min.typed_data() : nullptr;
  float* yp = y->typed_data();
  const float* xs = xsum.data();
  // Parts of at least 64 outputs, at most one per thread of the pool. The calling thread
  // and the pool's tasks take parts from a shared counter until none is left, so the
  // call finishes even if no pool thread is free (the caller then computes every part);
  // a task that starts after that finds nothing to do. The counters live on the heap,
  // held by every task, since a task may outlive the call.
  int64_t parts = pool.num_threads();
  if (parts > out / 64) parts = out / 64;
  if (parts < 1) parts = 1;
  const int64_t step = (out + parts - 1) / parts;
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  static constexpr auto kTable =
      OutputsTable<kPacked, kMin>(std::make_index_sequence<kMaxRows>());
  const OutputsFn outputs = kTable[rows - 1];
  auto work = [=] {
    for (int64_t p; (p = progress->next.fetch_add(1)) < parts;) {
      const int64_t begin = p * step, end = begin + step < out ? begin + step : out;
      outputs(xp, xs, qp, sp, mp, yp, in, out, begin, end);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  return ffi::Error::Success();
}

#define BIND                                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>() \
      .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()

}  // namespace

// 1 when the rows are computed with AVX2 / FMA vectors (what the trunk uses the kernel for),
// 0 for the portable scalar loop (correct, slower than XLA's own dot).
extern "C" int FastdecodeQMatVecVectorized() { return kVectorized ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastdecodeQMatVecInt8, (MatVec<false, false>), BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastdecodeQMatVecInt8Min, (MatVec<false, true>), BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastdecodeQMatVecNibble, (MatVec<true, false>), BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastdecodeQMatVecNibbleMin, (MatVec<true, true>), BIND);
