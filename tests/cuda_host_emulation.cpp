// Host emulation of csrc/cuda/ridge_solve.cu: one thread per block, blocks run in turn.
// Reads raw float64 inputs written by tests/test_cuda_compile.py and writes the kernels' outputs.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define DDFAST_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
struct Dim3 { unsigned x; };
static Dim3 threadIdx{0}, blockDim{1}, blockIdx{0};
inline void __syncthreads() {}
alignas(16) static unsigned char g_shared[1 << 22];
#define DDFAST_DYNAMIC_SHARED(name) unsigned char* name = g_shared
using std::sqrt;

#include RIDGE_SOLVE_CU

template <typename T>
std::vector<T> load(const char* dir, const char* name, size_t n) {
  std::vector<T> v(n);
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) std::exit(2);
  std::fclose(f);
  return v;
}

template <typename T>
void save(const char* dir, const char* name, const std::vector<T>& v) {
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "wb");
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}

int main(int argc, char** argv) {
  const char* dir = argv[1];
  const int B = std::atoi(argv[2]), N = std::atoi(argv[3]), d = std::atoi(argv[4]), C = std::atoi(argv[5]);
  const bool primal = std::atoi(argv[6]) != 0;
  const int n = primal ? d : N;
  auto Z = load<double>(dir, "Z", size_t(B) * N * d);
  auto Y = load<double>(dir, "Y", size_t(B) * N * C);
  auto mu = load<double>(dir, "mu", B);
  auto G = load<double>(dir, "G", size_t(B) * d * C);
  std::vector<double> W(size_t(B) * d * C), L(size_t(B) * n * n), aux(size_t(B) * n * C);
  std::vector<double> dZ(size_t(B) * N * d), dY(size_t(B) * N * C), dmu(B);
  std::vector<double> scratch(size_t(B) * 2 * (d > N ? d : N) * C);
  std::vector<int> info(B);
  for (int b = 0; b < B; ++b) {
    blockIdx.x = b;
    ddfast::cuda::ridge_solve_fwd_kernel<double>(Z.data(), Y.data(), mu.data(), W.data(), L.data(),
                                                 aux.data(), info.data(), N, d, C, primal);
  }
  for (int b = 0; b < B; ++b) {
    if (info[b] != 0) continue;
    blockIdx.x = b;
    ddfast::cuda::ridge_solve_bwd_kernel<double>(G.data(), Z.data(), Y.data(), L.data(), aux.data(),
                                                 dZ.data(), dY.data(), dmu.data(), scratch.data(),
                                                 N, d, C, primal);
  }
  save(dir, "W", W);
  save(dir, "dZ", dZ);
  save(dir, "dY", dY);
  save(dir, "dmu", dmu);
  save(dir, "info", info);
  return 0;
}
