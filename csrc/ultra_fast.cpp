// Operator schemas of the ultra_fast library (the one TORCH_LIBRARY block), and build info.
// Kernels: cpu/ultra_ops_cpu.cpp (CPU), cuda/ultra_ops_cuda.cu (CUDA).
#include "ultra_fast.h"

#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <sstream>

namespace ultra_fast {

#ifdef WITH_CUDA
std::string cuda_build_info();  // defined in cuda/ultra_ops_cuda.cu
#endif

std::string build_info() {
  std::ostringstream s;
  s << "cpu=1";
#ifdef WITH_CUDA
  s << ";cuda=1;" << cuda_build_info();
#else
  s << ";cuda=0";
#endif
#ifdef _OPENMP
  s << ";openmp=1";
#else
  s << ";openmp=0";
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  s << ";cpu_simd=target_clones(x86-64-v4,x86-64-v3,default)";
#else
  s << ";cpu_simd=compiler-default";
#endif
#ifdef ULTRA_FAST_PYTHON_MODULE
  s << ";python_module=1";
#else
  s << ";python_module=0";
#endif
#ifdef TORCH_VERSION_MAJOR
  s << ";torch_built=" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
    << TORCH_VERSION_PATCH;
#endif
  return s.str();
}

}  // namespace ultra_fast

TORCH_LIBRARY(ultra_fast, m) {
  m.def("contribution(Tensor G, Tensor A) -> Tensor");
  m.def("rollout_step(Tensor v, Tensor G, Tensor A) -> Tensor");
  m.def("paper_step(Tensor P, Tensor G, Tensor A) -> Tensor");
  // Fused pieces of the batched block backward, in place over their first argument.
  m.def("softmax_backward_(Tensor(a!) grad, Tensor attn) -> ()");
  m.def("layer_norm_backward_(Tensor(a!) grad, Tensor xhat, Tensor rstd, Tensor? residual) -> ()");
  // Which backends were compiled, as "key=value;..." (no tensor arguments).
  m.def("_build_info() -> str", &ultra_fast::build_info);
}
