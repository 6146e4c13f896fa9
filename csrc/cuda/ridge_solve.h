// Batched small-n ridge solve on CUDA: plain CUDA launchers on raw pointers (no torch headers).
//
//   dual   : A = Z Zᵀ + μI (N×N), L = chol(A), α = A⁻¹Y, W = Zᵀα            aux = α  [B,N,C]
//   primal : H = Zᵀ Z + μI (d×d), L = chol(H), W = H⁻¹ZᵀY                   aux = W  [B,d,C]
//
// One thread block per problem; the factor lives in shared memory (n = N dual, d primal, n <= 128).
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
#pragma once

#include <cstdint>

#ifndef __CUDA_RUNTIME_H__
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace ddfast {
namespace cuda {

// All arrays contiguous row-major: Z [B,N,d], Y [B,N,C], mu [B], W [B,d,C], L [B,n,n],
// aux [B,n,C], info [B] (0 ok, k>0: leading minor k not positive definite).
// Returns 0 on success, else an error code (see ridge_solve_error_string).
template <typename T>
int ridge_solve_fwd_launch(const T* Z, const T* Y, const T* mu, T* W, T* L, T* aux, int* info,
                           int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

// G [B,d,C] = ∂loss/∂W. dZ [B,N,d], dY [B,N,C], dmu [B] may be null (not needed).
//   dual:   Bm = A⁻¹ZG, dY = Bm, dZ = α(G − ZᵀBm)ᵀ − BmWᵀ, dμ = −Σ Bm∘α
//   primal: V = H⁻¹G, dY = ZV, dZ = (Y − ZW)Vᵀ − (ZV)Wᵀ, dμ = −Σ V∘W
template <typename T>
int ridge_solve_bwd_launch(const T* G, const T* Z, const T* Y, const T* L, const T* aux, T* dZ,
                           T* dY, T* dmu, int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

int ridge_solve_max_n();
const char* ridge_solve_error_string(int code);

}  // namespace cuda
}  // namespace ddfast
