// Host emulation of csrc/cuda/label_metagrad.cu under tests/cuda_host_emulation_runtime.h: cooperative
// threads, warps of 32, the launchers' grids and block sizes. Reads raw float64 inputs written by
// tests/test_cuda_compile_label_metagrad.py, runs the kernels in float64 or float32, and writes the
// outputs as float64.
//
// usage: emu DIR N d C has_gb has_vb scale f32|f64
#include "cuda_host_emulation_runtime.h"

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

template <typename T>
static void run(const char* dir, int64_t N, int64_t d, int C, bool has_gb, bool has_vb, double scale) {
  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto Z = cast(load(dir, "Z", size_t(N) * C)), Y = cast(load(dir, "Y", size_t(N) * C));
  const auto H = cast(load(dir, "H", size_t(N) * d)), GW = cast(load(dir, "GW", size_t(C) * d));
  const auto gb = cast(load(dir, "gb", size_t(C))), Vb = cast(load(dir, "Vb", size_t(N) * C));
  std::vector<T> R(size_t(N) * C), loss(N), out(size_t(N) * C, T(12345));
  using namespace ddfast::cuda;
  emu::launch(label_metagrad_fwd_blocks(N), kRowsPerBlock * kWarp, 0, [&] {
    ddfast::cuda::label_metagrad_fwd_kernel<T>(Z.data(), Y.data(), R.data(), loss.data(), N, C, T(scale));
  });
  emu::launch(label_metagrad_bwd_blocks(N), kBwdThreads, 0, [&] {
    ddfast::cuda::label_metagrad_bwd_kernel<T>(H.data(), GW.data(), has_gb ? gb.data() : nullptr,
                                               has_vb ? Vb.data() : nullptr, Z.data(), out.data(), N, d, C,
                                               T(scale));
  });
  save(dir, "R", R);
  save(dir, "loss", loss);
  save(dir, "out", out);
}

int main(int argc, char** argv) {
  if (argc != 9) return 1;
  const char* dir = argv[1];
  const int64_t N = std::atoll(argv[2]), d = std::atoll(argv[3]);
  const int C = std::atoi(argv[4]);
  const bool has_gb = std::atoi(argv[5]) != 0, has_vb = std::atoi(argv[6]) != 0;
  const double scale = std::atof(argv[7]);
  if (std::strcmp(argv[8], "f32") == 0)
    run<float>(dir, N, d, C, has_gb, has_vb, scale);
  else
    run<double>(dir, N, d, C, has_gb, has_vb, scale);
  return 0;
}
