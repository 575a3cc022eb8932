// The CPU kernel's products checked without JAX, for machines the suite cannot run JAX on: ARM's NEON form is built
// with a cross compiler and run under qemu-user (tests/test_cpu_kernels.py; the host's own form runs there too).
// Every block size, offset or none, int8 codes and nibbles (either sign), a matrix in one chunk of rows and in two,
// both forms (matvec, tiles), and 1-5 rows of x against a sum in double precision; each x row's values alone
// against the same row in a group (batch invariance). Prints the kernel's form (Int8MatvecFast) and exits 1 on any
// miss.
#include <cmath>
#include <cstdio>
#include <random>

#include "../worker/cpu_kernels/int8_matvec.cc"

// Value j's code of a row of `kKind` codes (CodeKind): an int8, or a nibble of byte 16(j / 32) + j % 16.
template <int kKind>
static int CodeOf(const uint8_t* row, int64_t j) {
  if (kKind == kInt8) return static_cast<int8_t>(row[j]);
  const int v = (row[(j / 32) * 16 + j % 16] >> (j % 32 < 16 ? 0 : 4)) & 15;
  return kKind == kS4 && v >= 8 ? v - 16 : v;
}

template <int kBlock, bool kOffset, int kKind = kInt8>
static int Check(int64_t m, int64_t n, int64_t k, std::mt19937& rng, bool tiles = false) {
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  const int64_t blocks = k / kBlock, row_bytes = kKind == kInt8 ? k : k / 2;
  std::vector<float> x(m * k), scale(n * blocks), offset(kOffset ? n * blocks : 0), y(m * n), alone(n);
  std::vector<uint8_t> codes(n * row_bytes);
  for (auto& v : x) v = value(rng);
  for (auto& v : scale) v = value(rng) * 0.01f;
  for (auto& v : offset) v = value(rng) * 0.1f;
  for (auto& c : codes) c = static_cast<uint8_t>(byte(rng));
  const float* o = kOffset ? offset.data() : nullptr;
  Product<kKind, kBlock, kOffset>(x.data(), codes.data(), scale.data(), o, y.data(), m, n, k, nullptr, 0, tiles);
  int misses = 0;
  for (int64_t i = 0; i < m; ++i) {
    Product<kKind, kBlock, kOffset>(x.data() + i * k, codes.data(), scale.data(), o, alone.data(), 1, n, k, nullptr,
                                    0, tiles);
    for (int64_t r = 0; r < n; ++r) {
      double want = 0, size = 0;
      for (int64_t j = 0; j < k; ++j) {
        const double w = double(scale[r * blocks + j / kBlock]) * CodeOf<kKind>(codes.data() + r * row_bytes, j) +
                         (kOffset ? double(offset[r * blocks + j / kBlock]) : 0.0);
        want += w * x[i * k + j];
        size += std::fabs(w * x[i * k + j]);
      }
      const float got = y[i * n + r];
      if (std::fabs(got - want) > 1e-5 * size + 1e-30) {
        std::printf("codes %d block %d offset %d rows %lld: y[%lld, %lld] = %.9g, want %.9g\n", kKind, kBlock,
                    kOffset, static_cast<long long>(m), static_cast<long long>(i), static_cast<long long>(r), got, want);
        ++misses;
      }
      if (std::memcmp(&got, &alone[r], sizeof got) != 0) {
        std::printf("codes %d block %d offset %d rows %lld: row %lld alone gives other bits at %lld\n", kKind, kBlock,
                    kOffset, static_cast<long long>(m), static_cast<long long>(i), static_cast<long long>(r));
        ++misses;
      }
    }
  }
  return misses;
}

int main() {
  std::mt19937 rng(7);
  int misses = 0;
  for (int64_t m = 1; m <= 5; ++m) {
    misses += Check<32, false>(m, 37, 640, rng);
    misses += Check<32, true>(m, 37, 640, rng);
    misses += Check<16, false>(m, 19, 2880, rng);
    misses += Check<16, true>(m, 19, 2880, rng);
    misses += Check<32, true>(m, 1031, 640, rng);  // 660 KB of codes: two chunks of rows (OverThreads), 516 + 515
    misses += Check<32, true>(m, 37, 640, rng, true);  // the tiles' form: 9 tiles of 4 w rows and one of 1
    misses += Check<16, false>(m, 19, 2880, rng, true);
    misses += Check<32, true, kU4>(m, 37, 640, rng);  // nibbles: Q4_K's and Q4_1's codes
    misses += Check<16, true, kU4>(m, 19, 2880, rng, true);  // Q2_K's
    misses += Check<32, false, kS4>(m, 37, 640, rng, true);  // Q4_0's
    misses += Check<16, false, kS4>(m, 19, 2880, rng);  // Q3_K's
  }
  std::printf("form %d, misses %d\n", Int8MatvecFast(), misses);
  return misses == 0 ? 0 : 1;
}
