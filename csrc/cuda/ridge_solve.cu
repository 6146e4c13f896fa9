// Batched small-n ridge solve on CUDA: one thread block per problem, factor in shared memory.
//
//   dual   : A = Z Zᵀ + μI (N×N), L = chol(A), α = A⁻¹Y, W = Zᵀα
//   primal : H = Zᵀ Z + μI (d×d), L = chol(H), W = H⁻¹ZᵀY
//
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile.py) the kernels compile as host C++
// and run one thread per block, which checks their arithmetic on a machine without a GPU.
#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>

#include "ridge_solve.h"
#define DDFAST_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]
#endif

namespace ddfast {
namespace cuda {
namespace {

constexpr int kMaxN = 128;
constexpr int kThreads = 256;

enum Error : int {
  kOk = 0,
  kTooLarge = 1,
  kSharedMemory = 2,
  kLaunch = 3,
  kAlloc = 4,
};

template <typename T>
__device__ __forceinline__ bool finite_positive(T x) {
  return x > T(0) && x < T(INFINITY);
}

// Right-looking in-place Cholesky of the n×n shared matrix A (lower). Sets *flag to the 1-based
// failing order, or leaves it 0. Upper triangle zeroed on success.
template <typename T>
__device__ void block_cholesky(T* A, int n, int* flag) {
  for (int j = 0; j < n; ++j) {
    if (threadIdx.x == 0) {
      const T s = A[j * n + j];
      if (!finite_positive(s)) {
        *flag = j + 1;
      } else {
        A[j * n + j] = sqrt(s);
      }
    }
    __syncthreads();
    if (*flag) return;
    const T inv = T(1) / A[j * n + j];
    for (int i = j + 1 + threadIdx.x; i < n; i += blockDim.x) A[i * n + j] *= inv;
    __syncthreads();
    const int m = n - j - 1;  // trailing block: rows/cols j+1..n-1, lower part
    for (int idx = threadIdx.x; idx < m * m; idx += blockDim.x) {
      const int i = j + 1 + idx / m, k = j + 1 + idx % m;
      if (k <= i) A[i * n + k] -= A[i * n + j] * A[k * n + j];
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, k = idx % n;
    if (k > i) A[idx] = T(0);
  }
  __syncthreads();
}

// X (n×C, row-major, shared) ← (LLᵀ)⁻¹X: one thread per right-hand side column, no barriers inside.
template <typename T>
__device__ void block_cholesky_solve(const T* L, T* X, int n, int C) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    for (int i = 0; i < n; ++i) {
      T s = X[i * C + c];
      for (int k = 0; k < i; ++k) s -= L[i * n + k] * X[k * C + c];
      X[i * C + c] = s / L[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {
      T s = X[i * C + c];
      for (int k = i + 1; k < n; ++k) s -= L[k * n + i] * X[k * C + c];
      X[i * C + c] = s / L[i * n + i];
    }
  }
  __syncthreads();
}

template <typename T>
__device__ T block_sum(T v, T* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const T out = red[0];
  __syncthreads();
  return out;
}

template <typename T>
__global__ void ridge_solve_fwd_kernel(const T* __restrict__ Zg, const T* __restrict__ Yg,
                                       const T* __restrict__ mu, T* __restrict__ Wg,
                                       T* __restrict__ Lg, T* __restrict__ auxg, int* __restrict__ info,
                                       int N, int d, int C, bool primal) {
  DDFAST_DYNAMIC_SHARED(smem_raw);
  T* A = reinterpret_cast<T*>(smem_raw);
  const int n = primal ? d : N;
  T* X = A + n * n;
  __shared__ int flag;
  const int64_t b = blockIdx.x;
  const T* Z = Zg + b * N * d;
  const T* Y = Yg + b * N * C;
  if (threadIdx.x == 0) flag = 0;

  // Gram (lower triangle) + μ on the diagonal, and the right-hand sides.
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, j = idx % n;
    T s = T(0);
    if (j <= i) {
      if (primal) {
        for (int r = 0; r < N; ++r) s += Z[r * d + i] * Z[r * d + j];
      } else {
        for (int k = 0; k < d; ++k) s += Z[i * d + k] * Z[j * d + k];
      }
      if (i == j) s += mu[b];
    }
    A[idx] = s;
  }
  for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
    if (primal) {
      const int a = idx / C, c = idx % C;
      T s = T(0);
      for (int r = 0; r < N; ++r) s += Z[r * d + a] * Y[r * C + c];
      X[idx] = s;
    } else {
      X[idx] = Y[idx];
    }
  }
  __syncthreads();

  block_cholesky(A, n, &flag);
  if (threadIdx.x == 0) info[b] = flag;
  if (flag) return;
  block_cholesky_solve(A, X, n, C);

  T* L = Lg + b * n * n;
  T* aux = auxg + b * n * C;
  T* W = Wg + b * d * C;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) L[idx] = A[idx];
  for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) aux[idx] = X[idx];
  for (int idx = threadIdx.x; idx < d * C; idx += blockDim.x) {
    if (primal) {
      W[idx] = X[idx];
    } else {
      const int k = idx / C, c = idx % C;
      T s = T(0);
      for (int i = 0; i < N; ++i) s += Z[i * d + k] * X[i * C + c];
      W[idx] = s;
    }
  }
}

// scratch: per problem 2·max(d, N)·C values (dual: T and W, d×C each; primal: ZV and Y−ZW, N×C each).
template <typename T>
__global__ void ridge_solve_bwd_kernel(const T* __restrict__ Gg, const T* __restrict__ Zg,
                                       const T* __restrict__ Yg, const T* __restrict__ Lg,
                                       const T* __restrict__ auxg, T* __restrict__ dZg,
                                       T* __restrict__ dYg, T* __restrict__ dmu,
                                       T* __restrict__ scratch, int N, int d, int C, bool primal) {
  DDFAST_DYNAMIC_SHARED(smem_raw);
  T* A = reinterpret_cast<T*>(smem_raw);
  const int n = primal ? d : N;
  T* X = A + n * n;          // n×C right-hand sides
  T* red = X + n * C;        // blockDim.x reduction buffer
  const int64_t b = blockIdx.x;
  const T* G = Gg + b * d * C;
  const T* Z = Zg + b * N * d;
  const T* Y = Yg + b * N * C;
  const T* aux = auxg + b * n * C;
  const int64_t ld = (d > N ? d : N) * C;
  T* S1 = scratch + b * 2 * ld;
  T* S2 = S1 + ld;

  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) A[idx] = Lg[b * n * n + idx];
  for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
    if (primal) {
      X[idx] = G[idx];
    } else {
      const int i = idx / C, c = idx % C;
      T s = T(0);
      for (int k = 0; k < d; ++k) s += Z[i * d + k] * G[k * C + c];
      X[idx] = s;
    }
  }
  __syncthreads();
  block_cholesky_solve(A, X, n, C);  // dual: Bm = A⁻¹ZG;  primal: V = H⁻¹G

  if (dmu != nullptr) {
    T part = T(0);
    for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) part += X[idx] * aux[idx];
    const T total = block_sum(part, red);
    if (threadIdx.x == 0) dmu[b] = -total;
  }
  if (!primal) {
    if (dYg != nullptr)
      for (int idx = threadIdx.x; idx < N * C; idx += blockDim.x) dYg[b * N * C + idx] = X[idx];
    if (dZg == nullptr) return;
    // S1 = T = G − ZᵀBm, S2 = W = Zᵀα   (d×C)
    for (int idx = threadIdx.x; idx < d * C; idx += blockDim.x) {
      const int k = idx / C, c = idx % C;
      T t = G[idx], w = T(0);
      for (int i = 0; i < N; ++i) {
        const T z = Z[i * d + k];
        t -= z * X[i * C + c];
        w += z * aux[i * C + c];
      }
      S1[idx] = t;
      S2[idx] = w;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < N * d; idx += blockDim.x) {
      const int i = idx / d, k = idx % d;
      T s = T(0);
      for (int c = 0; c < C; ++c) s += aux[i * C + c] * S1[k * C + c] - X[i * C + c] * S2[k * C + c];
      dZg[b * N * d + idx] = s;
    }
  } else {
    // S1 = ZV, S2 = Y − ZW   (N×C); W = aux
    for (int idx = threadIdx.x; idx < N * C; idx += blockDim.x) {
      const int r = idx / C, c = idx % C;
      T zv = T(0), zw = T(0);
      for (int a = 0; a < d; ++a) {
        const T z = Z[r * d + a];
        zv += z * X[a * C + c];
        zw += z * aux[a * C + c];
      }
      S1[idx] = zv;
      S2[idx] = Y[idx] - zw;
      if (dYg != nullptr) dYg[b * N * C + idx] = zv;
    }
    if (dZg == nullptr) return;
    __syncthreads();
    for (int idx = threadIdx.x; idx < N * d; idx += blockDim.x) {
      const int r = idx / d, a = idx % d;
      T s = T(0);
      for (int c = 0; c < C; ++c) s += S2[r * C + c] * X[a * C + c] - S1[r * C + c] * aux[a * C + c];
      dZg[b * N * d + idx] = s;
    }
  }
}

}  // namespace

#ifndef DDFAST_HOST_EMULATION
namespace {

template <typename T, typename Kernel>
int prepare_shared(Kernel kernel, size_t bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return kLaunch;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return kLaunch;
  if (bytes > static_cast<size_t>(optin)) return kSharedMemory;
  if (bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) != cudaSuccess)
    return kSharedMemory;
  return kOk;
}

}  // namespace

int ridge_solve_max_n() { return kMaxN; }

const char* ridge_solve_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kTooLarge: return "factor size exceeds ridge_solve_max_n()";
    case kSharedMemory: return "problem does not fit in the device's shared memory per block";
    case kLaunch: return "kernel launch failed";
    case kAlloc: return "scratch allocation failed";
    default: return "unknown error";
  }
}

template <typename T>
int ridge_solve_fwd_launch(const T* Z, const T* Y, const T* mu, T* W, T* L, T* aux, int* info,
                           int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream) {
  const int64_t n = primal ? d : N;
  if (n > kMaxN || n < 1) return kTooLarge;
  if (B == 0) return kOk;
  const size_t bytes = sizeof(T) * static_cast<size_t>(n * n + n * C);
  const int rc = prepare_shared<T>(ridge_solve_fwd_kernel<T>, bytes);
  if (rc != kOk) return rc;
  ridge_solve_fwd_kernel<T><<<static_cast<unsigned>(B), kThreads, bytes, stream>>>(
      Z, Y, mu, W, L, aux, info, static_cast<int>(N), static_cast<int>(d), static_cast<int>(C), primal);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunch;
}

template <typename T>
int ridge_solve_bwd_launch(const T* G, const T* Z, const T* Y, const T* L, const T* aux, T* dZ,
                           T* dY, T* dmu, int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream) {
  const int64_t n = primal ? d : N;
  if (n > kMaxN || n < 1) return kTooLarge;
  if (B == 0) return kOk;
  const size_t bytes = sizeof(T) * static_cast<size_t>(n * n + n * C + kThreads);
  const int rc = prepare_shared<T>(ridge_solve_bwd_kernel<T>, bytes);
  if (rc != kOk) return rc;
  T* scratch = nullptr;
  const size_t scratch_bytes = sizeof(T) * static_cast<size_t>(B * 2 * (d > N ? d : N) * C);
  if (cudaMallocAsync(reinterpret_cast<void**>(&scratch), scratch_bytes, stream) != cudaSuccess)
    return kAlloc;
  ridge_solve_bwd_kernel<T><<<static_cast<unsigned>(B), kThreads, bytes, stream>>>(
      G, Z, Y, L, aux, dZ, dY, dmu, scratch, static_cast<int>(N), static_cast<int>(d),
      static_cast<int>(C), primal);
  const bool launched = cudaGetLastError() == cudaSuccess;
  cudaFreeAsync(scratch, stream);
  return launched ? kOk : kLaunch;
}

template int ridge_solve_fwd_launch<float>(const float*, const float*, const float*, float*, float*,
                                           float*, int*, int64_t, int64_t, int64_t, int64_t, bool,
                                           cudaStream_t);
template int ridge_solve_fwd_launch<double>(const double*, const double*, const double*, double*,
                                            double*, double*, int*, int64_t, int64_t, int64_t,
                                            int64_t, bool, cudaStream_t);
template int ridge_solve_bwd_launch<float>(const float*, const float*, const float*, const float*,
                                           const float*, float*, float*, float*, int64_t, int64_t,
                                           int64_t, int64_t, bool, cudaStream_t);
template int ridge_solve_bwd_launch<double>(const double*, const double*, const double*,
                                            const double*, const double*, double*, double*, double*,
                                            int64_t, int64_t, int64_t, int64_t, bool, cudaStream_t);

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
