// Fused residuals of the per-example label meta-gradient on CUDA: one warp per row, kRowsPerBlock
// rows (warps) per block, warp-shuffle reductions, max-subtracted softmax.
//
//   fwd: p = softmax(Z), s_i = Σ_c Y_ic, R = scale·(p·s − Y), loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic
//   bwd: v = H GWᵀ + gb + Vb, p = softmax(Z), out = scale·(v − (p·v)1)
//
// The bwd GEMM runs kClassTile classes at a time: the lanes of the row's warp split d (coalesced
// loads of H and GW rows), one warp sum per class; v goes straight into the output row, which the
// same warp then turns into the residual in place (no N×C intermediate besides the output).
//
// Seed: label-distillation §3 eq. 1, Appendix B.
// Equivalent PyTorch: ddfast.reference.label_metagrad (soft_cross_entropy, head_residual_ref).
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile_label_metagrad.py) the kernels compile
// as host C++ with a warp of one lane (DDFAST_WARP_SIZE 1), which checks their arithmetic and row
// indexing on a machine without a GPU.
#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>

#include <cmath>

#include "label_metagrad.h"
#define DDFAST_WARP_SIZE 32
#define DDFAST_SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#define DDFAST_SYNCWARP() __syncwarp()
#endif

namespace ddfast {
namespace cuda {
namespace {

constexpr int kWarp = DDFAST_WARP_SIZE;
constexpr int kRowsPerBlock = 8;  // warps (rows) per block on the device
constexpr int kClassTile = 8;     // classes accumulated per pass over a row of H

enum LabelMetagradError : int {
  kLmgOk = 0,
  kLmgTooLarge = 1,
  kLmgLaunch = 2,
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += DDFAST_SHFL_XOR(v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T w = DDFAST_SHFL_XOR(v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Row of this warp (rows beyond N: the whole warp returns, so shuffles stay full-warp).
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
}

template <typename T>
__global__ void label_metagrad_fwd_kernel(const T* __restrict__ Z, const T* __restrict__ Y,
                                          T* __restrict__ R, T* __restrict__ loss, int64_t N, int C,
                                          T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = warp_row();
  if (row >= N) return;
  const T* z = Z + row * C;
  const T* y = Y + row * C;
  T* r = R + row * C;

  T m = -static_cast<T>(INFINITY);
  for (int c = lane; c < C; c += kWarp) m = z[c] > m ? z[c] : m;
  m = warp_max(m);
  T S = T(0), s = T(0);
  for (int c = lane; c < C; c += kWarp) {
    S += exp(z[c] - m);
    s += y[c];
  }
  S = warp_sum(S);
  s = warp_sum(s);
  const T logS = log(S), ps = s / S;
  T ce = T(0);
  for (int c = lane; c < C; c += kWarp) {
    const T zc = z[c] - m, yc = y[c];
    ce -= yc * (zc - logS);
    r[c] = scale * (exp(zc) * ps - yc);
  }
  ce = warp_sum(ce);
  if (lane == 0) loss[row] = ce;
}

// out doubles as the scratch for v (written and re-read by the row's own warp).
template <typename T>
__global__ void label_metagrad_bwd_kernel(const T* __restrict__ H, const T* __restrict__ GW,
                                          const T* __restrict__ gb, const T* __restrict__ Vb,
                                          const T* __restrict__ Z, T* __restrict__ out, int64_t N,
                                          int64_t d, int C, T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = warp_row();
  if (row >= N) return;
  const T* h = H + row * d;
  const T* z = Z + row * C;
  T* o = out + row * C;

  for (int c0 = 0; c0 < C; c0 += kClassTile) {
    const int nc = C - c0 < kClassTile ? C - c0 : kClassTile;
    const T* g = GW + static_cast<int64_t>(c0) * d;
    T acc[kClassTile];
#pragma unroll
    for (int j = 0; j < kClassTile; ++j) acc[j] = T(0);
    for (int64_t k = lane; k < d; k += kWarp) {
      const T hk = h[k];
#pragma unroll
      for (int j = 0; j < kClassTile; ++j)
        if (j < nc) acc[j] += hk * g[j * d + k];
    }
#pragma unroll
    for (int j = 0; j < kClassTile; ++j) {
      const T v = warp_sum(acc[j]);
      if (j < nc && lane == j % kWarp) {
        const int c = c0 + j;
        o[c] = v + (gb != nullptr ? gb[c] : T(0)) + (Vb != nullptr ? Vb[row * C + c] : T(0));
      }
    }
  }
  DDFAST_SYNCWARP();  // v written by other lanes of this warp is read below

  T m = -static_cast<T>(INFINITY);
  for (int c = lane; c < C; c += kWarp) m = z[c] > m ? z[c] : m;
  m = warp_max(m);
  T S = T(0), pv = T(0);
  for (int c = lane; c < C; c += kWarp) {
    const T e = exp(z[c] - m);
    S += e;
    pv += e * o[c];
  }
  S = warp_sum(S);
  pv = warp_sum(pv) / S;
  for (int c = lane; c < C; c += kWarp) o[c] = scale * (o[c] - pv);
}

}  // namespace

#ifndef DDFAST_HOST_EMULATION

const char* label_metagrad_error_string(int code) {
  switch (code) {
    case kLmgOk: return "ok";
    case kLmgTooLarge: return "number of classes C exceeds 2^31 - 1 or a size is negative";
    case kLmgLaunch: return "kernel launch failed";
    default: return "unknown error";
  }
}

namespace {

unsigned blocks_for(int64_t N) {
  return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
}

bool sizes_ok(int64_t N, int64_t d, int64_t C) {
  return N >= 0 && d >= 0 && C >= 0 && C <= 0x7fffffff && (N + kRowsPerBlock - 1) / kRowsPerBlock <= 0x7fffffff;
}

}  // namespace

template <typename T>
int label_metagrad_fwd_launch(const T* Z, const T* Y, T* R, T* loss_rows, int64_t N, int64_t C,
                              double scale, cudaStream_t stream) {
  if (!sizes_ok(N, 0, C)) return kLmgTooLarge;
  if (N == 0) return kLmgOk;
  label_metagrad_fwd_kernel<T><<<blocks_for(N), kRowsPerBlock * kWarp, 0, stream>>>(
      Z, Y, R, loss_rows, N, static_cast<int>(C), static_cast<T>(scale));
  return cudaGetLastError() == cudaSuccess ? kLmgOk : kLmgLaunch;
}

template <typename T>
int label_metagrad_bwd_launch(const T* H, const T* GW, const T* gb, const T* Vb, const T* Z, T* out,
                              int64_t N, int64_t d, int64_t C, double scale, cudaStream_t stream) {
  if (!sizes_ok(N, d, C)) return kLmgTooLarge;
  if (N == 0 || C == 0) return kLmgOk;
  label_metagrad_bwd_kernel<T><<<blocks_for(N), kRowsPerBlock * kWarp, 0, stream>>>(
      H, GW, gb, Vb, Z, out, N, d, static_cast<int>(C), static_cast<T>(scale));
  return cudaGetLastError() == cudaSuccess ? kLmgOk : kLmgLaunch;
}

template int label_metagrad_fwd_launch<float>(const float*, const float*, float*, float*, int64_t, int64_t,
                                              double, cudaStream_t);
template int label_metagrad_fwd_launch<double>(const double*, const double*, double*, double*, int64_t,
                                               int64_t, double, cudaStream_t);
template int label_metagrad_bwd_launch<float>(const float*, const float*, const float*, const float*,
                                              const float*, float*, int64_t, int64_t, int64_t, double,
                                              cudaStream_t);
template int label_metagrad_bwd_launch<double>(const double*, const double*, const double*, const double*,
                                               const double*, double*, int64_t, int64_t, int64_t, double,
                                               cudaStream_t);

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
