// Fused batched ridge / kernel-ridge solve on the GPU: launchers on raw device pointers.
//
//   dual   (primal=false):  A = Z Zᵀ + μI (N×N),  L = chol(A),  α = A⁻¹Y,  W = Zᵀα      (aux = α)
//   primal (primal=true):   H = Zᵀ Z + μI (d×d),  L = chol(H),  W = H⁻¹ZᵀY              (aux = W)
//
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
//
// Plain C++ header (no CUDA headers needed): the host-compiled binding includes it.
#pragma once

#include <cstdint>

#if !defined(__DRIVER_TYPES_H__) && !defined(__CUDA_RUNTIME_H__)
// The same declaration as the CUDA runtime's driver_types.h.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#endif

namespace ddfast {
namespace cuda {

// Error codes returned by the launchers (0 = success).
enum RidgeSolveError : int {
  kRidgeSolveOk = 0,
  kRidgeSolveInvalidArgument = 1,   // a negative size
  kRidgeSolveFactorTooLarge = 2,    // factor size n (N dual, d primal) > ridge_solve_max_n()
  kRidgeSolveSharedMemory = 3,      // the n×n factor does not fit in this device's shared memory
  kRidgeSolveWorkspace = 4,         // the global workspace of the backward could not be allocated
  kRidgeSolveCudaErrorBase = 1000,  // 1000 + cudaError_t of a failed CUDA runtime call / launch
};

// Forward, one thread block per batch member. Contiguous row-major inputs:
//   Z [B,N,d], Y [B,N,C], mu [B] (μ > 0, regulariser and jitter included).
// Outputs: W [B,d,C]; L [B,n,n] (lower Cholesky factor, upper triangle zeroed); aux [B,n,C]
// (α dual, W primal); info [B]: 0, or k > 0 when the leading minor of order k is not positive
// definite (pivot <= 0 or non-finite; as LAPACK potrf). Where info[b] != 0, W[b] and aux[b] are NaN.
// Returns 0, or an error code (nothing is launched for a size error).
template <typename T>
int ridge_solve_fwd_launch(const T* Z, const T* Y, const T* mu, T* W, T* L, T* aux, int* info,
                           int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

// Backward with the saved factor L (only its lower triangle is read) and aux; G = dLoss/dW [B,d,C].
//   dual:   Bm = A⁻¹ZG;  dY = Bm;  dZ = α(G − ZᵀBm)ᵀ − BmWᵀ;  dμ = −Σ Bm∘α
//   primal: V = H⁻¹G;  dY = ZV;  dZ = (Y − ZW)Vᵀ − dY Wᵀ;  dμ = −Σ V∘W
// dZ [B,N,d], dY [B,N,C], dmu [B]: each optional (nullptr = not computed).
// Returns 0, or an error code.
template <typename T>
int ridge_solve_bwd_launch(const T* G, const T* Z, const T* Y, const T* L, const T* aux, T* dZ,
                           T* dY, T* dmu, int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

// Largest supported factor size n (N for dual, d for primal).
int ridge_solve_max_n();

// Text of a launcher error code.
const char* ridge_solve_error_string(int code);

}  // namespace cuda
}  // namespace ddfast
