// C++ smoke test of the CMake-built library: calls the ops through the dispatcher (as a
// libtorch user would) and compares them with ATen formulas of the reference ops.
#include "ultra_fast.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <vector>

namespace {

at::Tensor call(const char* name, std::initializer_list<at::Tensor> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  std::vector<c10::IValue> stack(args.begin(), args.end());
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// An in-place op with no outputs (schema "-> ()"): its effect is on the first argument.
void call_inplace(const char* name, std::vector<c10::IValue> stack) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
}

bool close(const char* what, const at::Tensor& a, const at::Tensor& b) {
  const double err = (a - b).abs().max().item<double>();
  const double scale = b.abs().max().item<double>();
  const bool ok = err <= 1e-12 * std::max(scale, 1.0);
  std::cout << what << ": max abs error " << err << (ok ? " ok" : " FAILED") << "\n";
  return ok;
}

}  // namespace

int main() {
  std::cout << "ultra_fast build: " << ultra_fast::build_info() << "\n";
  at::manual_seed(0);
  const int64_t B = 2, T = 5, H = 3, N = 17;
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor A = at::rand({B, H, N, N}, opts).softmax(-1);
  const at::Tensor G = at::randn({T, B, H, N, N}, opts).transpose(0, 1);  // engine layout
  const at::Tensor v = at::rand({B, T, N}, opts);
  const at::Tensor P = at::randn({B, T, N, N}, opts);

  const at::Tensor C = (G.clamp_min(0) * A.unsqueeze(1)).mean(2);
  bool ok = true;
  ok &= close("contribution", call("ultra_fast::contribution", {G, A}), C);
  ok &= close("rollout_step", call("ultra_fast::rollout_step", {v, G, A}),
              v + at::matmul(v.unsqueeze(-2), C).squeeze(-2));
  ok &= close("paper_step", call("ultra_fast::paper_step", {P, G, A}), P + at::matmul(C, P));

  const at::Tensor g = at::randn({B, H, T, N, N}, opts);  // one cotangent of A per target
  const at::Tensor gs = g.clone();
  call_inplace("ultra_fast::softmax_backward_", {gs, A});
  const at::Tensor a = A.unsqueeze(2);
  ok &= close("softmax_backward_", gs, a * (g - (g * a).sum(-1, true)));
  const at::Tensor gw = at::randn({T, B, N, 8}, opts), xhat = at::randn({B, N, 8}, opts);
  const at::Tensor rstd = at::rand({B, N, 1}, opts), res = at::randn({T, B, N, 8}, opts);
  const at::Tensor out = gw.clone();
  call_inplace("ultra_fast::layer_norm_backward_", {out, xhat, rstd, res});
  ok &= close("layer_norm_backward_", out,
              rstd * (gw - gw.mean(-1, true) - xhat * (gw * xhat).mean(-1, true)) + res);
  return ok ? 0 : 1;
}
