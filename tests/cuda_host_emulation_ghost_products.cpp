// Host emulation of csrc/cuda/ghost_products.cu under tests/cuda_host_emulation_runtime.h: cooperative
// threads, warps of 32, the launchers' grids and block size. Reads raw float64 inputs written by
// tests/test_cuda_compile_ghost_products.py, runs the kernels in float64 or float32, and writes the
// outputs as float64.
//
// usage: emu DIR N1 P1 N2 P2 K O f32|f64
//   inputs  DIR/{A1,G1,A2,G2,V}: [N1,P1,K], [N1,P1,O], [N2,P2,K], [N2,P2,O], [O,K]
//   outputs DIR/{bilinear [N1], norms_ghost [N1], norms_mat [N1], inner [N1,N2], W [N1,O,K]}
#include "cuda_host_emulation_runtime.h"

#include GHOST_PRODUCTS_CU

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
  std::vector<double> w(v.begin(), v.end());
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "wb");
  if (!w.empty()) std::fwrite(w.data(), sizeof(double), w.size(), f);
  std::fclose(f);
}

template <typename T>
static void run(const char* dir, int64_t N1, int64_t P1, int64_t N2, int64_t P2, int64_t K, int64_t O) {
  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto A1 = cast(load(dir, "A1", size_t(N1 * P1 * K))), G1 = cast(load(dir, "G1", size_t(N1 * P1 * O)));
  const auto A2 = cast(load(dir, "A2", size_t(N2 * P2 * K))), G2 = cast(load(dir, "G2", size_t(N2 * P2 * O)));
  const auto V = cast(load(dir, "V", size_t(O * K)));
  std::vector<T> bil(N1, T(12345)), ng(N1, T(12345)), nm(N1, T(12345)), inner(size_t(N1 * N2), T(12345));
  std::vector<T> W(size_t(N1 * O * K), T(12345));
  using namespace ddfast::cuda;
  auto grid = [](int64_t blocks) { return static_cast<unsigned>(blocks); };
  emu::launch(grid(ghost_per_example_blocks(N1)), kGpThreads, 0,
              [&] { ghost_bilinear_fwd_kernel<T>(A1.data(), G1.data(), V.data(), bil.data(), N1, P1, K, O); });
  emu::launch(grid(ghost_per_example_blocks(N1)), kGpThreads, 0,
              [&] { ghost_norms_fwd_kernel<T>(A1.data(), G1.data(), ng.data(), N1, P1, K, O, true); });
  emu::launch(grid(ghost_per_example_blocks(N1)), kGpThreads, 0,
              [&] { ghost_norms_fwd_kernel<T>(A1.data(), G1.data(), nm.data(), N1, P1, K, O, false); });
  emu::launch(grid(ghost_inner_blocks(N1, N2)), kGpThreads, 0, [&] {
    ghost_inner_fwd_kernel<T>(A1.data(), G1.data(), A2.data(), G2.data(), inner.data(), N1, P1, N2, P2, K, O);
  });
  // W in two blocks of examples (n0 = 0 and n0 = half), as the caller of the launcher blocks it.
  const int64_t half = N1 / 2;
  emu::launch(grid(ghost_materialize_blocks(half, O, K)), kGpThreads, 0,
              [&] { ghost_materialize_kernel<T>(A1.data(), G1.data(), W.data(), 0, half, P1, K, O); });
  emu::launch(grid(ghost_materialize_blocks(N1 - half, O, K)), kGpThreads, 0, [&] {
    ghost_materialize_kernel<T>(A1.data(), G1.data(), W.data() + half * O * K, half, N1 - half, P1, K, O);
  });
  save(dir, "bilinear", bil);
  save(dir, "norms_ghost", ng);
  save(dir, "norms_mat", nm);
  save(dir, "inner", inner);
  save(dir, "W", W);
}

int main(int argc, char** argv) {
  if (argc != 9) return 1;
  const char* dir = argv[1];
  const int64_t N1 = std::atoll(argv[2]), P1 = std::atoll(argv[3]), N2 = std::atoll(argv[4]);
  const int64_t P2 = std::atoll(argv[5]), K = std::atoll(argv[6]), O = std::atoll(argv[7]);
  if (std::strcmp(argv[8], "f32") == 0)
    run<float>(dir, N1, P1, N2, P2, K, O);
  else
    run<double>(dir, N1, P1, N2, P2, K, O);
  return 0;
}
