// Fused ReLU + 2×2 max-pool (stride 2, floor) on CUDA: plain CUDA launchers on raw pointers (no
// torch headers).
//
//   out[n,c,i,j]  = max_{a,b ∈ {0,1}} relu(x[n,c,2i+a,2j+b])
//   code[n,c,i,j] = first window position 2a+b (row-major) holding the maximum when it is > 0, the
//                   last NaN when there is one, else 4 (no gradient)
//   grad_in       = grad_out at the coded positions, 0 elsewhere
//
// Equivalent PyTorch: ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref (F.max_pool2d(F.relu(x), 2)).
#pragma once

#include <cstdint>

#ifndef __CUDA_RUNTIME_H__
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace ddfast {
namespace cuda {

// T: float, double, or uint16_t holding bfloat16 bits. x [N,C,H,W] contiguous (channels_last: the
// [N,H,W,C] order) in; out and code [N,C,H/2,W/2] in the same order out. H, W ≥ 2.
// Returns 0 on success, else an error code (see relu_max_pool2d_error_string).
template <typename T>
int relu_max_pool2d_fwd_launch(const T* x, T* out, uint8_t* code, int64_t N, int64_t C, int64_t H, int64_t W,
                               bool channels_last, cudaStream_t stream);

// grad_out and code [N,C,H/2,W/2], grad_in [N,C,H,W], all in the forward's order.
template <typename T>
int relu_max_pool2d_bwd_launch(const T* grad_out, const uint8_t* code, T* grad_in, int64_t N, int64_t C, int64_t H,
                               int64_t W, bool channels_last, cudaStream_t stream);

const char* relu_max_pool2d_error_string(int code);

}  // namespace cuda
}  // namespace ddfast
