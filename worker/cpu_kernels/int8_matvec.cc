// The CPU's decode-sized product of x (float32, a few rows) with a matrix in the CPU layout (quant.Int8Blocks:
// int8 codes, or two 4-bit codes a byte, a float32 scale and optional offset per block), called from JAX through
// XLA's FFI (worker/cpu_kernels).
// Why by hand: XLA's CPU backend neither fuses the codes' widening into its dot nor has an integer or mixed
// matrix-vector product (docs/PERFORMANCE.md, "CPU"): its tile walk (ops.int8_matmul) widens each tile into a
// float32 buffer and reads it again. Here each code is widened in a register next to its multiply-add: half of
// Gemma 3's head (131,072 x 640 Q8_0) against one row of x on one core of a Xeon, best of 8, 6.0 ms against the tile
// walk's 10.4 (a plain read of its bytes: 3.4 ms).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// GCC/Clang vector extensions: one code path over the target's widest float registers (AVX-512, AVX2, NEON/SSE).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int8_t Codes __attribute__((vector_size(kLanes)));

// kLanes int8 codes as floats. GCC 12 scalarizes __builtin_convertvector from int8 (measured: 5x slower than XLA's
// tile walk), so x86 and ARM name the sign-extend and convert instructions.
static inline Floats Widen(const int8_t* c) {
#if defined(__AVX512F__)
  return (Floats)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
#elif defined(__AVX2__)
  return (Floats)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
#elif defined(__ARM_NEON)
  int32_t four;  // kLanes (4) codes: int8 -> int16 -> int32 -> float
  std::memcpy(&four, c, sizeof four);
  const int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return (Floats)vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
#else
  Codes v;
  std::memcpy(&v, c, sizeof v);
  return __builtin_convertvector(v, Floats);
#endif
}

// How a row's codes are stored (quant.Int8Blocks.nibbles): one int8 a value, or two a byte, 0..15 ("u4") or -8..7
// ("s4"); byte 16g + i of a row holds value 32g + i in its low nibble and 32g + 16 + i in its high one, so kLanes
// consecutive values (kLanes <= 16, from a multiple of kLanes) are one nibble of kLanes consecutive bytes.
enum CodeKind { kInt8 = 0, kU4 = 1, kS4 = 2 };
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));

// The bytes `values` codes of a row take (`values` a multiple of 32 for nibbles).
template <int kKind>
static constexpr int64_t CodeBytes(int64_t values) {
  return kKind == kInt8 ? values : values / 2;
}
typedef uint32_t Uints __attribute__((vector_size(4 * kLanes)));

// kLanes bytes, zero-extended into int32 lanes.
static inline Uints Bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  return (Uints)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (Uints)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#elif defined(__ARM_NEON)
  uint32_t four;
  std::memcpy(&four, p, sizeof four);
  return (Uints)vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(four)))));
#else
  Uints v;
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
  return v;
#endif
}

// kLanes nibbles (the low or high ones of kLanes bytes) as floats: each shifted to the top of its lane and back,
// arithmetically for "s4" (its sign), logically for "u4".
template <int kKind, bool kHigh>
static inline Floats Nibbles(const uint8_t* p) {
  const Uints top = Bytes(p) << (kHigh ? 24 : 28);
  if constexpr (kKind == kS4) return __builtin_convertvector((Ints)top >> 28, Floats);
  return __builtin_convertvector((Ints)(top >> 28), Floats);
}

// The codes of values v0 .. v0 + kBlock of a row (v0 a multiple of kBlock) as floats, kLanes a vector in the
// values' order: c[kBlock / kLanes]. A block of nibbles is the low and then the high nibbles of a group's 16 bytes
// (32 values), or one of the two (16). An array the caller indexes with constants, not a callback: a lambda that
// captured the accumulators kept them in memory (a store and a load each block: 2.5x slower).
constexpr int kGroupBytes = 16;

template <int kKind, int kBlock>
static inline void CodesOf(const uint8_t* row, int64_t v0, Floats* c) {
  constexpr int kVectors = kBlock / kLanes, kHalf = kGroupBytes / kLanes;
  if constexpr (kKind == kInt8) {
    for (int t = 0; t < kVectors; ++t) c[t] = Widen(reinterpret_cast<const int8_t*>(row) + v0 + t * kLanes);
  } else {
    const uint8_t* group = row + (v0 / 32) * kGroupBytes;
    if constexpr (kBlock == 32) {
      for (int t = 0; t < kHalf; ++t) c[t] = Nibbles<kKind, false>(group + t * kLanes);
      for (int t = 0; t < kHalf; ++t) c[kHalf + t] = Nibbles<kKind, true>(group + t * kLanes);
    } else if (v0 % 32 == 0) {
      for (int t = 0; t < kHalf; ++t) c[t] = Nibbles<kKind, false>(group + t * kLanes);
    } else {
      for (int t = 0; t < kHalf; ++t) c[t] = Nibbles<kKind, true>(group + t * kLanes);
    }
  }
}

// 1 where Widen names its instructions and the kernel was timed faster than XLA's tile walk (AVX-512, AVX2); 2 for
// ARM's NEON form, checked for its values (under qemu: tests/test_cpu_kernels.py) but not yet timed on an ARM
// machine; 0 for the plain form, 2.5x slower than the walk here (GCC 12, -mno-avx: 40.8 against 16.4 ms a half
// head). The worker takes 1, and 2 only when asked (WORKER_CPU_KERNEL=1).
extern "C" int Int8MatvecFast() {
#if defined(__AVX512F__) || defined(__AVX2__)
  return 1;
#elif defined(__ARM_NEON)
  return 2;
#else
  return 0;
#endif
}

// The lanes' sum in a fixed tree order: halves added as vectors until four lanes are left.
typedef float Four __attribute__((vector_size(16)));
template <int kWidth>
static inline Four Halve(const float* v) {
  if constexpr (kWidth == 4) {
    Four f;
    std::memcpy(&f, v, sizeof f);
    return f;
  } else {
    typedef float Half __attribute__((vector_size(2 * kWidth)));
    Half lo, hi;
    std::memcpy(&lo, v, sizeof lo);
    std::memcpy(&hi, v + kWidth / 2, sizeof hi);
    const Half sum = lo + hi;
    return Halve<kWidth / 2>(reinterpret_cast<const float*>(&sum));
  }
}

static inline float Sum(Floats v) {
  const Four f = Halve<kLanes>(reinterpret_cast<const float*>(&v));
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// Every row of w (`rows` of them) against kM rows of x (kM compile-time: the accumulators stay in registers); y's
// rows are `ldy` apart. With w = scale * code (+ offset), a block's share of a product is scale * sum(code * x)
// (+ offset * sum(x)): the codes' products are summed over the block first and scaled once a block, fewer operations
// than scaling every value. One row of w at a time reads the codes in one sequential stream (four rows side by side
// were slower: the head's two halves on the two cores at once 14.1 against 11.1 ms). Each y value is one fixed
// sequence of float operations whatever the other rows: batch invariance.
constexpr int64_t kPrefetchBytes = 4096;

template <int kKind, int kM, int kBlock, bool kOffset>
static void Rows(const float* x, const float* xsum, const uint8_t* codes, const float* scale, const float* offset,
                 float* y, int64_t rows, int64_t ldy, int64_t k) {
  const int64_t blocks = k / kBlock, row_bytes = CodeBytes<kKind>(k);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * row_bytes;
    Floats acc[kM] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      Floats part[kM] = {};
      // Ask for the codes 4 KiB ahead: the hardware's prefetcher alone left the loop waiting on memory (the head's
      // half on one core, best of six: 6.0 -> 4.7 ms 2 KiB ahead, 8.8 -> 8.0 ms from 2 to 4 KiB on a busier host).
      __builtin_prefetch(row + CodeBytes<kKind>(b * kBlock) + kPrefetchBytes);
      Floats c[kBlock / kLanes];
      CodesOf<kKind, kBlock>(row, b * kBlock, c);
      for (int t = 0; t < kBlock / kLanes; ++t)
        for (int i = 0; i < kM; ++i) {
          Floats xi;
          std::memcpy(&xi, x + i * k + b * kBlock + t * kLanes, sizeof xi);
          part[i] += c[t] * xi;
        }
      const float s = scale[r * blocks + b];
      for (int i = 0; i < kM; ++i) acc[i] += part[i] * s;
      if (kOffset) {
        const float o = offset[r * blocks + b];
        for (int i = 0; i < kM; ++i) {
          Floats xs;
          std::memcpy(&xs, xsum + (i * blocks + b) * kLanes, sizeof xs);
          acc[i] += xs * o;
        }
      }
    }
    for (int i = 0; i < kM; ++i) y[i * ldy + r] = Sum(acc[i]);
  }
}

// Many rows of x (a prefill): w's rows kTile at a time widened into float32 values (scale * code (+ offset)) in a
// buffer that stays in the core's cache, then each (x row, w row) pair's dot over K in register lanes, kTile x rows
// by kTile w rows a step (16 accumulators: the FMA unit's latency covered, each widened value used by 4 x rows and
// each x value by 4 w rows). The matvec form (`Rows`) widens each code again for every group of x rows and waits on
// its per-block chains: 268 against XLA's tile walk's 420 prefill tok/s (Gemma 3 270M, one device). A y value here
// is still one fixed sequence of operations whatever the other rows (a pair's lanes over K, then one tree), but
// another sequence than `Rows`' (a block's values scaled before their sum): a call takes one form for all its rows.
constexpr int kTile = 4;

// Floats read from any float's address (loads, not copies through memory: with memcpy into an array GCC 12 kept
// the accumulators on the stack, 20 against 4x GMAC/s on one core).
typedef float Unaligned __attribute__((vector_size(4 * kLanes), aligned(4)));

template <int kTm, int kTr>
static inline void Pairs(const float* x, const float* w, float* y, int64_t ldy, int64_t k) {
  Floats acc[kTm][kTr] = {};
  for (int64_t j = 0; j < k; j += kLanes) {
    Floats wv[kTr];
    for (int r = 0; r < kTr; ++r) wv[r] = *reinterpret_cast<const Unaligned*>(w + r * k + j);
    for (int i = 0; i < kTm; ++i) {
      const Floats xv = *reinterpret_cast<const Unaligned*>(x + i * k + j);
      for (int r = 0; r < kTr; ++r) acc[i][r] += xv * wv[r];
    }
  }
  for (int i = 0; i < kTm; ++i)
    for (int r = 0; r < kTr; ++r) y[i * ldy + r] = Sum(acc[i][r]);
}

template <int kTr>
static inline void PairsOf(int64_t tm, const float* x, const float* w, float* y, int64_t ldy, int64_t k) {
  if (tm == 4) Pairs<4, kTr>(x, w, y, ldy, k);
  if (tm == 3) Pairs<3, kTr>(x, w, y, ldy, k);
  if (tm == 2) Pairs<2, kTr>(x, w, y, ldy, k);
  if (tm == 1) Pairs<1, kTr>(x, w, y, ldy, k);
}

template <int kKind, int kBlock, bool kOffset>
static void Tiles(const float* x, int64_t m, const uint8_t* codes, const float* scale, const float* offset, float* y,
                  int64_t rows, int64_t ldy, int64_t k) {
  const int64_t blocks = k / kBlock, row_bytes = CodeBytes<kKind>(k);
  std::vector<float> wide(kTile * k);
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t tr = std::min<int64_t>(kTile, rows - r0);
    for (int64_t r = 0; r < tr; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = (r0 + r) * blocks + b;
        const Floats s = Floats{} + scale[at], o = Floats{} + (kOffset ? offset[at] : 0.0f);
        Floats c[kBlock / kLanes];
        CodesOf<kKind, kBlock>(codes + (r0 + r) * row_bytes, b * kBlock, c);
        for (int t = 0; t < kBlock / kLanes; ++t) {
          const Floats v = kOffset ? c[t] * s + o : c[t] * s;
          std::memcpy(&wide[r * k + b * kBlock + t * kLanes], &v, sizeof v);
        }
      }
    for (int64_t i = 0; i < m; i += kTile) {
      const int64_t tm = std::min<int64_t>(kTile, m - i);
      float* yi = y + i * ldy + r0;
      if (tr == 4) PairsOf<4>(tm, x + i * k, wide.data(), yi, ldy, k);
      if (tr == 3) PairsOf<3>(tm, x + i * k, wide.data(), yi, ldy, k);
      if (tr == 2) PairsOf<2>(tm, x + i * k, wide.data(), yi, ldy, k);
      if (tr == 1) PairsOf<1>(tm, x + i * k, wide.data(), yi, ldy, k);
    }
  }
}

// A product's rows of w in chunks over XLA's intra-op threads: the calling thread and up to `tasks` of `pool`'s
// threads each take the next chunk until none is left, and the call returns when every chunk is done. The caller
// never waits for a task that has not started (XLA may run a task on the calling thread, or later on a pool of one
// thread): a task that starts after the last chunk was taken finds none, and touches only the shared counters it
// holds.
struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
};

// The pool's threads a call takes beside its own: at most `tasks`, at most the pool's.
static int64_t Helpers(ffi::ThreadPool* pool, int64_t tasks) {
  return pool != nullptr ? std::max<int64_t>(0, std::min<int64_t>(tasks, pool->num_threads())) : 0;
}

template <typename Work>
static void OverThreads(int64_t chunks, ffi::ThreadPool* pool, int64_t tasks, const Work& work) {
  const int64_t threads = Helpers(pool, tasks);
  if (chunks <= 1 || threads < 1) {
    for (int64_t c = 0; c < chunks; ++c) work(c);
    return;
  }
  auto state = std::make_shared<Chunks>();
  // Taken while this call waits: `work` (the caller's frame) outlives every chunk a task claims.
  auto take = [state, chunks, &work] {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      work(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < std::min(threads, chunks - 1); ++t) pool->Schedule([take] { take(); });
  take();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Codes a chunk at least (256 KiB: a task's scheduling is ~microseconds, a chunk's reading ~20 us on one core), and
// chunks a thread (4: a slower core's share is taken up by the others).
constexpr int64_t kChunkBytes = 1 << 18;
constexpr int64_t kChunksPerThread = 4;

// Every x row against every row of w, w's rows in chunks over XLA's threads; in a chunk, `Tiles`, or x rows in groups
// of 4, 2, 1 (`Rows`). For an offset, `Rows` takes each x row's lane-wise sums over each block (the offset's share of
// a block is offset * sum(x)).
template <int kKind, int kBlock, bool kOffset>
static void Product(const float* x, const uint8_t* codes, const float* scale, const float* offset, float* y,
                    int64_t m, int64_t n, int64_t k, ffi::ThreadPool* pool, int64_t tasks, bool tiles = false) {
  const int64_t blocks = k / kBlock, row_bytes = CodeBytes<kKind>(k);
  std::vector<float> xsum(kOffset && !tiles ? m * blocks * kLanes : 0);
  for (int64_t i = 0; kOffset && !tiles && i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      Floats xs = {};
      for (int64_t j = b * kBlock; j < (b + 1) * kBlock; j += kLanes) {
        Floats v;
        std::memcpy(&v, x + i * k + j, sizeof v);
        xs += v;
      }
      std::memcpy(&xsum[(i * blocks + b) * kLanes], &xs, sizeof xs);
    }
  const int64_t threads = 1 + Helpers(pool, tasks);
  const int64_t chunks = std::max<int64_t>(1, std::min(threads * kChunksPerThread, n * row_bytes / kChunkBytes));
  const int64_t per = (n + chunks - 1) / chunks;
  auto chunk = [&](int64_t c) {
    const int64_t r0 = c * per, r1 = std::min(n, r0 + per);
    const uint8_t* wc = codes + r0 * row_bytes;
    const float *ws = scale + r0 * blocks, *wo = kOffset ? offset + r0 * blocks : nullptr;
    if (tiles) return Tiles<kKind, kBlock, kOffset>(x, m, wc, ws, wo, y + r0, r1 - r0, n, k);
    for (int64_t i = 0; i < m;) {
      const float *xi = x + i * k, *si = xsum.data() + i * blocks * kLanes;
      float* yi = y + i * n + r0;
      const int64_t group = m - i >= 4 ? 4 : m - i >= 2 ? 2 : 1;
      if (group == 4) Rows<kKind, 4, kBlock, kOffset>(xi, si, wc, ws, wo, yi, r1 - r0, n, k);
      if (group == 2) Rows<kKind, 2, kBlock, kOffset>(xi, si, wc, ws, wo, yi, r1 - r0, n, k);
      if (group == 1) Rows<kKind, 1, kBlock, kOffset>(xi, si, wc, ws, wo, yi, r1 - r0, n, k);
      i += group;
    }
  };
  OverThreads((n + per - 1) / per, pool, tasks, chunk);
}

// The Product for a block of 16 or 32 values, with or without an offset.
template <int kKind, typename... Args>
static void ProductOf(int64_t block, bool offset, Args... args) {
  if (block == 16)
    (offset ? Product<kKind, 16, true> : Product<kKind, 16, false>)(args...);
  else
    (offset ? Product<kKind, 32, true> : Product<kKind, 32, false>)(args...);
}

// Shapes: x [M, K], codes [N, K] (int8) or [N, K / 2] (nibbles), scale (and offset) [N, K / block], y [M, N]; a block
// of 16 or 32 values (the CPU layout's: quant.cpu_block).
static ffi::Error Call(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S8>& codes,
                       const ffi::Buffer<ffi::F32>& scale, const ffi::Buffer<ffi::F32>* offset,
                       ffi::Result<ffi::Buffer<ffi::F32>>& y, ffi::ThreadPool* pool, int64_t tasks, bool tiles,
                       int32_t kind) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("int8_matvec: x, codes, scale and y must be matrices");
  if (kind != kInt8 && kind != kU4 && kind != kS4)
    return ffi::Error::InvalidArgument("int8_matvec: nibbles must be 0 (int8 codes), 1 (u4) or 2 (s4)");
  const int64_t m = xd[0], k = xd[1], n = cd[0], blocks = sd[1];
  const int64_t block = blocks > 0 && k % blocks == 0 ? k / blocks : 0;
  const int64_t row_bytes = kind == kInt8 ? k : (k % 32 == 0 ? k / 2 : -1);
  if (cd[1] != row_bytes || sd[0] != n || (block != 16 && block != 32) || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument(
        "int8_matvec: shapes do not fit x [M, K], codes [N, K] (or [N, K / 2] for nibbles, K a multiple of 32), "
        "scale [N, K / block], y [M, N] with a block of 16 or 32");
  if (offset != nullptr) {
    auto od = offset->dimensions();
    if (od.size() != 2 || od[0] != n || od[1] != blocks)
      return ffi::Error::InvalidArgument("int8_matvec: offset must have scale's shape");
  }
  const float* o = offset != nullptr ? offset->typed_data() : nullptr;
  const auto* c = reinterpret_cast<const uint8_t*>(codes.typed_data());
  const auto args =
      std::make_tuple(block, offset != nullptr, x.typed_data(), c, scale.typed_data(), o, y->typed_data(), m, n, k,
                      pool, tasks, tiles);
  if (kind == kU4)
    std::apply(ProductOf<kU4, const float*, const uint8_t*, const float*, const float*, float*, int64_t, int64_t,
                         int64_t, ffi::ThreadPool*, int64_t, bool>, args);
  else if (kind == kS4)
    std::apply(ProductOf<kS4, const float*, const uint8_t*, const float*, const float*, float*, int64_t, int64_t,
                         int64_t, ffi::ThreadPool*, int64_t, bool>, args);
  else
    std::apply(ProductOf<kInt8, const float*, const uint8_t*, const float*, const float*, float*, int64_t, int64_t,
                         int64_t, ffi::ThreadPool*, int64_t, bool>, args);
  return ffi::Error::Success();
}

// `threads`: how many of XLA's intra-op threads a call may take beside the calling thread (0: that thread alone; a
// device of several takes its share of the pool its neighbours share, worker/cpu_kernels.kernel_tasks). `tiles` 1:
// the many-rows form (`Tiles`), else the matvec form (`Rows`). `nibbles`: the codes' CodeKind (their bytes come as
// int8 either way).
static ffi::Error Plain(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                        ffi::Buffer<ffi::F32> scale, ffi::Result<ffi::Buffer<ffi::F32>> y, int32_t threads,
                        int32_t tiles, int32_t nibbles) {
  return Call(x, codes, scale, nullptr, y, &pool, threads, tiles != 0, nibbles);
}

static ffi::Error WithOffset(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                             ffi::Result<ffi::Buffer<ffi::F32>> y, int32_t threads, int32_t tiles, int32_t nibbles) {
  return Call(x, codes, scale, &offset, y, &pool, threads, tiles != 0, nibbles);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matvec, Plain,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("tiles")
                                  .Attr<int32_t>("nibbles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8MatvecOffset, WithOffset,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("tiles")
                                  .Attr<int32_t>("nibbles"));
