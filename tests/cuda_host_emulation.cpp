// Host emulation of csrc/cuda/ridge_solve.cu: 256 cooperative threads per block (see
// tests/cuda_host_emulation_runtime.h), blocks in turn, the dynamic shared memory the launchers declare
// (ridge_solve_smem_bytes). Reads raw float64 inputs written by tests/test_cuda_compile.py, runs the
// kernels in float64 or float32 and writes the outputs as float64.
//
// usage: emu DIR B N d C primal [f64|f32 [compute_w need_dz need_dy need_dmu]]
//   inputs  DIR/{Z [B,N,d], Y [B,N,C], mu [B], G [B,d,C]}
//   outputs DIR/{W [B,d,C] (NaN where not computed), L [B,n,n], aux [B,n,C], dZ, dY, dmu (NaN where not
//           asked), info [B] (int32)}
#include "cuda_host_emulation_runtime.h"

#include RIDGE_SOLVE_CU

#include <limits>

static std::vector<double> load(const char* dir, const char* name, size_t n) {
  std::vector<double> v(n);
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "rb");
  if (!f || (n > 0 && std::fread(v.data(), sizeof(double), n, f) != n)) std::exit(2);
  std::fclose(f);
  return v;
}

template <typename T>
static void save(const char* dir, const char* name, const std::vector<T>& v) {
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "wb");
  if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}

template <typename T>
static std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T>
static void run(const char* dir, int B, int N, int d, int C, bool primal, bool compute_w, bool need_dz,
                bool need_dy, bool need_dmu) {
  using ddfast::cuda::kRidgeThreads;
  const int n = primal ? d : N;
  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto Z = cast(load(dir, "Z", size_t(B) * N * d)), Y = cast(load(dir, "Y", size_t(B) * N * C));
  const auto mu = cast(load(dir, "mu", B)), G = cast(load(dir, "G", size_t(B) * d * C));
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> W(size_t(B) * d * C, nan), L(size_t(B) * n * n, nan), aux(size_t(B) * n * C, nan);
  std::vector<T> dZ(size_t(B) * N * d, nan), dY(size_t(B) * N * C, nan), dmu(B, nan);
  std::vector<int> info(B, -1);
  const size_t bytes = ddfast::cuda::ridge_solve_smem_bytes(n, C, sizeof(T));
  emu::launch(B, kRidgeThreads, bytes, [&] {
    ddfast::cuda::ridge_solve_fwd_kernel<T>(Z.data(), Y.data(), mu.data(), compute_w ? W.data() : nullptr, L.data(),
                                            aux.data(), info.data(), N, d, C, primal);
  });
  bool all_ok = true;
  for (int b = 0; b < B; ++b) all_ok = all_ok && info[b] == 0;
  if (all_ok)
    emu::launch(B, kRidgeThreads, bytes, [&] {
      ddfast::cuda::ridge_solve_bwd_kernel<T>(G.data(), Z.data(), Y.data(), L.data(), aux.data(),
                                              need_dz ? dZ.data() : nullptr, need_dy ? dY.data() : nullptr,
                                              need_dmu ? dmu.data() : nullptr, N, d, C, primal);
    });
  save(dir, "W", widen(W));
  save(dir, "L", widen(L));
  save(dir, "aux", widen(aux));
  save(dir, "dZ", widen(dZ));
  save(dir, "dY", widen(dY));
  save(dir, "dmu", widen(dmu));
  save(dir, "info", info);
}

int main(int argc, char** argv) {
  if (argc != 7 && argc != 8 && argc != 12) return 1;
  const char* dir = argv[1];
  const int B = std::atoi(argv[2]), N = std::atoi(argv[3]), d = std::atoi(argv[4]), C = std::atoi(argv[5]);
  const bool primal = std::atoi(argv[6]) != 0;
  const bool f32 = argc > 7 && std::strcmp(argv[7], "f32") == 0;
  bool flags[4] = {true, true, true, true};
  if (argc == 12)
    for (int i = 0; i < 4; ++i) flags[i] = std::atoi(argv[8 + i]) != 0;
  if (f32)
    run<float>(dir, B, N, d, C, primal, flags[0], flags[1], flags[2], flags[3]);
  else
    run<double>(dir, B, N, d, C, primal, flags[0], flags[1], flags[2], flags[3]);
  return 0;
}
