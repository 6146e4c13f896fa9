// Host emulation of csrc/cuda/label_metagrad.cu: a warp of one lane, so every thread owns a row;
// the threads of a block and then the blocks run in turn. Reads raw float64 inputs written by
// tests/test_cuda_compile_label_metagrad.py, runs the kernels in float64 or float32, and writes the
// outputs as float64.
//
// usage: emu DIR N d C has_gb has_vb scale f32|f64 threads_per_block
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define DDFAST_HOST_EMULATION 1
#define DDFAST_WARP_SIZE 1
#define DDFAST_SHFL_XOR(v, o) (v)
#define DDFAST_SYNCWARP() ((void)0)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { unsigned x; };
static Dim3 threadIdx{0}, blockDim{1}, blockIdx{0};
using std::exp;
using std::log;

#include LABEL_METAGRAD_CU

static std::vector<double> load(const char* dir, const char* name, size_t n) {
  std::vector<double> v(n);
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(v.data(), sizeof(double), n, f) != n) std::exit(2);
  std::fclose(f);
  return v;
}

template <typename T>
static void save(const char* dir, const char* name, const std::vector<T>& v) {
  std::vector<double> w(v.begin(), v.end());
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "wb");
  std::fwrite(w.data(), sizeof(double), w.size(), f);
  std::fclose(f);
}

// Every (block, thread) of a grid of ceil(N / threads) blocks, as the launchers size it per warp.
template <typename F>
static void run_grid(int64_t N, unsigned threads, F&& body) {
  blockDim.x = threads;
  const int64_t blocks = (N + threads - 1) / threads;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx.x = t;
      body();
    }
  }
}

template <typename T>
static void run(const char* dir, int64_t N, int64_t d, int C, bool has_gb, bool has_vb, double scale,
                unsigned threads) {
  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto Z = cast(load(dir, "Z", size_t(N) * C)), Y = cast(load(dir, "Y", size_t(N) * C));
  const auto H = cast(load(dir, "H", size_t(N) * d)), GW = cast(load(dir, "GW", size_t(C) * d));
  const auto gb = cast(load(dir, "gb", size_t(C))), Vb = cast(load(dir, "Vb", size_t(N) * C));
  std::vector<T> R(size_t(N) * C), loss(N), out(size_t(N) * C, T(12345));
  run_grid(N, threads, [&] {
    ddfast::cuda::label_metagrad_fwd_kernel<T>(Z.data(), Y.data(), R.data(), loss.data(), N, C, T(scale));
  });
  run_grid(N, threads, [&] {
    ddfast::cuda::label_metagrad_bwd_kernel<T>(H.data(), GW.data(), has_gb ? gb.data() : nullptr,
                                               has_vb ? Vb.data() : nullptr, Z.data(), out.data(), N, d, C,
                                               T(scale));
  });
  save(dir, "R", R);
  save(dir, "loss", loss);
  save(dir, "out", out);
}

int main(int argc, char** argv) {
  if (argc != 10) return 1;
  const char* dir = argv[1];
  const int64_t N = std::atoll(argv[2]), d = std::atoll(argv[3]);
  const int C = std::atoi(argv[4]);
  const bool has_gb = std::atoi(argv[5]) != 0, has_vb = std::atoi(argv[6]) != 0;
  const double scale = std::atof(argv[7]);
  const unsigned threads = static_cast<unsigned>(std::atoi(argv[9]));
  if (std::strcmp(argv[8], "f32") == 0)
    run<float>(dir, N, d, C, has_gb, has_vb, scale, threads);
  else
    run<double>(dir, N, d, C, has_gb, has_vb, scale, threads);
  return 0;
}
