// Host emulation of csrc/cuda/relu_max_pool2d.cu: the kernels' grid-stride loops run as host C++,
// every (block, thread) of a small grid in turn. Reads raw inputs written by
// tests/test_cuda_compile_relu_max_pool2d.py in the element type under test and writes the outputs
// the same way.
//
// usage: emu DIR N C H W f32|f64|bf16 channels_last blocks threads
//   inputs  DIR/x [N,C,H,W], DIR/g [N,C,H/2,W/2]   (channels_last: stored in N,H,W,C order)
//   outputs DIR/out, DIR/code (uint8), DIR/gi      (the same order)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define DDFAST_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { unsigned x; };
static Dim3 threadIdx{0}, blockDim{1}, blockIdx{0}, gridDim{1};

#include RELU_MAX_POOL2D_CU

template <typename T>
static std::vector<T> load(const char* dir, const char* name, size_t n) {
  std::vector<T> v(n);
  char path[4096];
  std::snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = std::fopen(path, "rb");
  if (!f || (n > 0 && std::fread(v.data(), sizeof(T), n, f) != n)) std::exit(2);
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

template <typename F>
static void run_grid(unsigned blocks, unsigned threads, F&& body) {
  gridDim.x = blocks;
  blockDim.x = threads;
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx.x = t;
      body();
    }
  }
}

template <typename T>
static void run(const char* dir, int64_t N, int64_t C, int64_t H, int64_t W, bool cl, unsigned blocks,
                unsigned threads) {
  const int64_t in_n = N * C * H * W, out_n = N * C * (H / 2) * (W / 2);
  const auto x = load<T>(dir, "x", size_t(in_n));
  const auto g = load<T>(dir, "g", size_t(out_n));
  std::vector<T> out(static_cast<size_t>(out_n)), gi(static_cast<size_t>(in_n));
  std::vector<uint8_t> code(static_cast<size_t>(out_n), 255);
  std::memset(out.data(), 0x5a, out.size() * sizeof(T));  // poison: every element must be written
  std::memset(gi.data(), 0x5a, gi.size() * sizeof(T));
  using namespace ddfast::cuda;
  run_grid(blocks, threads, [&] {
    relu_max_pool2d_fwd_kernel<T>(x.data(), out.data(), code.data(), out_n, C, H, W, cl);
  });
  run_grid(blocks, threads, [&] {
    relu_max_pool2d_bwd_kernel<T>(g.data(), code.data(), gi.data(), in_n, C, H, W, cl);
  });
  save(dir, "out", out);
  save(dir, "code", code);
  save(dir, "gi", gi);
}

int main(int argc, char** argv) {
  if (argc != 10) return 1;
  const char* dir = argv[1];
  const int64_t N = std::atoll(argv[2]), C = std::atoll(argv[3]), H = std::atoll(argv[4]), W = std::atoll(argv[5]);
  const bool cl = std::atoi(argv[7]) != 0;
  const unsigned blocks = static_cast<unsigned>(std::atoi(argv[8])), threads = static_cast<unsigned>(std::atoi(argv[9]));
  if (std::strcmp(argv[6], "f32") == 0)
    run<float>(dir, N, C, H, W, cl, blocks, threads);
  else if (std::strcmp(argv[6], "f64") == 0)
    run<double>(dir, N, C, H, W, cl, blocks, threads);
  else
    run<uint16_t>(dir, N, C, H, W, cl, blocks, threads);  // bfloat16 bits
  return 0;
}
