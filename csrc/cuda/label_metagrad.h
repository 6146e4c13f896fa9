// Fused residuals of the per-example label meta-gradient on CUDA: plain CUDA launchers on raw
// pointers (no torch headers).
//
//   fwd: p = softmax(Z), s_i = Σ_c Y_ic, R = scale·(p·s − Y), loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic
//   bwd: v = H GWᵀ + gb + Vb, p = softmax(Z), out = scale·(v − (p·v)1)
//
// One warp per row, several rows (warps) per block; softmax max-subtracted, reductions by warp
// shuffles. Seed: label-distillation §3 eq. 1, Appendix B.
// Equivalent PyTorch: ddfast.reference.label_metagrad (soft_cross_entropy, head_residual_ref).
#pragma once

#include <cstdint>

#ifndef __CUDA_RUNTIME_H__
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace ddfast {
namespace cuda {

// All arrays contiguous row-major: Z [N,C], Y [N,C] in; R [N,C], loss_rows [N] out.
// Returns 0 on success, else an error code (see label_metagrad_error_string).
template <typename T>
int label_metagrad_fwd_launch(const T* Z, const T* Y, T* R, T* loss_rows, int64_t N, int64_t C,
                              double scale, cudaStream_t stream);

// All arrays contiguous row-major: H [N,d], GW [C,d], gb [C] (or null), Vb [N,C] (or null),
// Z [N,C] in; out [N,C] (also the kernel's scratch for v; must not alias an input).
template <typename T>
int label_metagrad_bwd_launch(const T* H, const T* GW, const T* gb, const T* Vb, const T* Z, T* out,
                              int64_t N, int64_t d, int64_t C, double scale, cudaStream_t stream);

const char* label_metagrad_error_string(int code);

}  // namespace cuda
}  // namespace ddfast
