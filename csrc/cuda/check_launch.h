// Turns a launcher's cudaError_t (launchers.h) into a torch error naming the op, for the glue of
// every CUDA op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace dmup {

inline void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace dmup
