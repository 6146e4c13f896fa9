// Self-test of tests/cuda_host_emulation_runtime.h: small kernels with and without the barriers they
// need. usage: selftest CASE  (prints the result, or the runtime exits with status 3 on a defect)
//   sum_ok       block sum through shared memory with its barrier          → prints 32640 (Σ 0..255)
//   sum_racy     the same without the barrier between write and read      → order-dependent result
//   shfl_ok      warp butterfly sum by __shfl_xor_sync                     → prints 496 (Σ 0..31) per warp
//   divergent    half of each warp at __syncthreads(), half at __syncwarp() → exit 3 (deadlock)
//   shfl_exited  a shuffle after some lanes of the warp returned           → exit 3
//   smem_over    a write one byte past the declared dynamic shared memory  → exit 3
#include "cuda_host_emulation_runtime.h"

#include <string>

__global__ void sum_kernel(int* out, bool barrier) {
  __shared__ int buf[256];
  buf[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < 256; ++i) s += buf[i];
    *out = s;
  }
}

__global__ void shfl_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x % 32);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

__global__ void divergent_kernel() {
  if (threadIdx.x % 32 < 16)
    __syncthreads();
  else
    __syncwarp();
}

__global__ void shfl_exited_kernel() {
  if (threadIdx.x % 32 >= 16) return;
  (void)__shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void smem_over_kernel(size_t bytes) {
  DDFAST_DYNAMIC_SHARED(raw);
  if (threadIdx.x == 0) raw[bytes] = 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 1;
  const std::string c = argv[1];
  if (c == "sum_ok" || c == "sum_racy") {
    int out = 0;
    emu::launch(1, 256, 0, [&] { sum_kernel(&out, c == "sum_ok"); });
    std::printf("%d\n", out);
  } else if (c == "shfl_ok") {
    std::vector<int> out(64);
    emu::launch(1, 64, 0, [&] { shfl_kernel(out.data()); });
    for (int v : out)
      if (v != 496) return 4;
    std::printf("496\n");
  } else if (c == "divergent") {
    emu::launch(1, 256, 0, [] { divergent_kernel(); });
  } else if (c == "shfl_exited") {
    emu::launch(1, 32, 0, [] { shfl_exited_kernel(); });
  } else if (c == "smem_over") {
    emu::launch(1, 32, 100, [] { smem_over_kernel(100); });
  } else {
    return 1;
  }
  return 0;
}
