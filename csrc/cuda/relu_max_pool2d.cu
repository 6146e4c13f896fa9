// Fused ReLU + 2×2 max-pool (stride 2, floor) on CUDA: one thread per output in the forward (four
// loads, a uint8 window code), one thread per input element in the backward (coalesced writes,
// zeros for the last row / column of an odd H / W); grid-stride loops.
//
//   out[n,c,i,j]  = max_{a,b ∈ {0,1}} relu(x[n,c,2i+a,2j+b])
//   code[n,c,i,j] = first window position 2a+b (row-major) holding the maximum when it is > 0, the
//                   last NaN when there is one, else kRmpNoGrad
//   grad_in       = 0 + grad_out at the coded positions (−0 as +0), 0 elsewhere
//
// Bit-for-bit F.max_pool2d(F.relu(x), 2) and its gradient (see csrc/cpu/relu_max_pool2d.cpp).
// bfloat16 arrives as its bits (uint16_t) and is compared as float (exact); values are copied.
// Equivalent PyTorch: ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref.
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile_relu_max_pool2d.py) the kernels compile
// as host C++ with one thread per block, which checks their arithmetic and indexing without a GPU.
#include <cstdint>
#include <cstring>

#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>

#include "relu_max_pool2d.h"
#endif

namespace ddfast {
namespace cuda {
namespace {

constexpr uint8_t kRmpNoGrad = 4;
constexpr int kRmpThreads = 256;
constexpr int64_t kRmpMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

enum ReluMaxPoolError : int {
  kRmpOk = 0,
  kRmpBadSize = 1,
  kRmpLaunch = 2,
};

// Storage S compared as A; zero_sign(g) = 0 + g.
template <typename S>
struct RmpElem {
  typedef S A;
  static __device__ __forceinline__ A get(S v) { return v; }
  static __device__ __forceinline__ S zero_sign(S g) { return g + S(0); }
};

template <>
struct RmpElem<uint16_t> {
  typedef float A;
  static __device__ __forceinline__ float get(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  static __device__ __forceinline__ uint16_t zero_sign(uint16_t g) { return g == 0x8000 ? uint16_t(0) : g; }
};

__device__ __forceinline__ int64_t rmp_first() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t rmp_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename S>
__global__ void relu_max_pool2d_fwd_kernel(const S* __restrict__ x, S* __restrict__ out, uint8_t* __restrict__ code,
                                           int64_t total, int64_t C, int64_t H, int64_t W, bool channels_last) {
  typedef RmpElem<S> E;
  typedef typename E::A A;
  const int64_t OH = H / 2, OW = W / 2;
  for (int64_t o = rmp_first(); o < total; o += rmp_stride()) {
    int64_t base, dc, dr;  // offset of window position 0, steps to position 1 and to position 2
    if (channels_last) {
      const int64_t c = o % C, t = o / C, j = t % OW, t2 = t / OW, i = t2 % OH, n = t2 / OH;
      base = ((n * H + 2 * i) * W + 2 * j) * C + c;
      dc = C;
      dr = W * C;
    } else {
      const int64_t j = o % OW, t = o / OW, i = t % OH, p = t / OH;
      base = (p * H + 2 * i) * W + 2 * j;
      dc = 1;
      dr = W;
    }
    const S a = x[base], b = x[base + dc], c = x[base + dr], d = x[base + dr + dc];
    const A fa = E::get(a), fb = E::get(b), fc = E::get(c), fd = E::get(d);
    S best = fa < A(0) ? S(0) : a;  // relu(a), keeping −0 and NaN
    A fbest = fa < A(0) ? A(0) : fa;
    uint8_t k = (fa > A(0) || fa != fa) ? uint8_t(0) : kRmpNoGrad;
    if (fb > fbest || fb != fb) {
      best = b;
      fbest = fb;
      k = 1;
    }
    if (fc > fbest || fc != fc) {
      best = c;
      fbest = fc;
      k = 2;
    }
    if (fd > fbest || fd != fd) {
      best = d;
      k = 3;
    }
    out[o] = best;
    code[o] = k;
  }
}

template <typename S>
__global__ void relu_max_pool2d_bwd_kernel(const S* __restrict__ g, const uint8_t* __restrict__ code,
                                           S* __restrict__ gi, int64_t total, int64_t C, int64_t H, int64_t W,
                                           bool channels_last) {
  const int64_t OH = H / 2, OW = W / 2;
  for (int64_t e = rmp_first(); e < total; e += rmp_stride()) {
    int64_t h, w, o;
    if (channels_last) {
      const int64_t c = e % C, t = e / C;
      w = t % W;
      const int64_t t2 = t / W;
      h = t2 % H;
      const int64_t n = t2 / H;
      o = ((n * OH + h / 2) * OW + w / 2) * C + c;
    } else {
      w = e % W;
      const int64_t t = e / W;
      h = t % H;
      const int64_t p = t / H;
      o = (p * OH + h / 2) * OW + w / 2;
    }
    S v = S(0);
    if (h < 2 * OH && w < 2 * OW && code[o] == static_cast<uint8_t>((h & 1) * 2 + (w & 1)))
      v = RmpElem<S>::zero_sign(g[o]);
    gi[e] = v;
  }
}

}  // namespace

#ifndef DDFAST_HOST_EMULATION

const char* relu_max_pool2d_error_string(int code) {
  switch (code) {
    case kRmpOk: return "ok";
    case kRmpBadSize: return "a size is negative, or H or W is below 2";
    case kRmpLaunch: return "kernel launch failed";
    default: return "unknown error";
  }
}

namespace {

bool rmp_sizes_ok(int64_t N, int64_t C, int64_t H, int64_t W) { return N >= 0 && C >= 0 && H >= 2 && W >= 2; }

unsigned rmp_blocks(int64_t total) {
  const int64_t b = (total + kRmpThreads - 1) / kRmpThreads;
  return static_cast<unsigned>(b < kRmpMaxBlocks ? b : kRmpMaxBlocks);
}

}  // namespace

template <typename T>
int relu_max_pool2d_fwd_launch(const T* x, T* out, uint8_t* code, int64_t N, int64_t C, int64_t H, int64_t W,
                               bool channels_last, cudaStream_t stream) {
  if (!rmp_sizes_ok(N, C, H, W)) return kRmpBadSize;
  const int64_t total = N * C * (H / 2) * (W / 2);
  if (total == 0) return kRmpOk;
  relu_max_pool2d_fwd_kernel<T><<<rmp_blocks(total), kRmpThreads, 0, stream>>>(x, out, code, total, C, H, W,
                                                                                channels_last);
  return cudaGetLastError() == cudaSuccess ? kRmpOk : kRmpLaunch;
}

template <typename T>
int relu_max_pool2d_bwd_launch(const T* grad_out, const uint8_t* code, T* grad_in, int64_t N, int64_t C, int64_t H,
                               int64_t W, bool channels_last, cudaStream_t stream) {
  if (!rmp_sizes_ok(N, C, H, W)) return kRmpBadSize;
  const int64_t total = N * C * H * W;
  if (total == 0) return kRmpOk;
  relu_max_pool2d_bwd_kernel<T><<<rmp_blocks(total), kRmpThreads, 0, stream>>>(grad_out, code, grad_in, total, C, H,
                                                                                 W, channels_last);
  return cudaGetLastError() == cudaSuccess ? kRmpOk : kRmpLaunch;
}

#define DDFAST_RMP_INSTANTIATE(T)                                                                              \
  template int relu_max_pool2d_fwd_launch<T>(const T*, T*, uint8_t*, int64_t, int64_t, int64_t, int64_t, bool, \
                                             cudaStream_t);                                                    \
  template int relu_max_pool2d_bwd_launch<T>(const T*, const uint8_t*, T*, int64_t, int64_t, int64_t, int64_t, \
                                             bool, cudaStream_t);

DDFAST_RMP_INSTANTIATE(float)
DDFAST_RMP_INSTANTIATE(double)
DDFAST_RMP_INSTANTIATE(uint16_t)
#undef DDFAST_RMP_INSTANTIATE

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
