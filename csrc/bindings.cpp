// The one translation unit that includes pybind11/torch glue: exposes the kernels as effkern._C.
// The ops themselves are declared once in Python (effkern/ops/<op>.py, torch.library.custom_op) and call
// these functions from their per-device dispatch.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "effkern compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("gqa_decode_cpu", &effkern::gqa_decode_cpu, "GQA decode attention, C++ CPU kernel");
  m.def("kv_append_cpu", &effkern::kv_append_cpu, "KV-cache append with RoPE/projection, C++ CPU kernel");
  m.def("low_rank_attention_fwd_cpu", &effkern::low_rank_attention_fwd_cpu, "low-rank attention core, C++ CPU");
  m.def("low_rank_attention_bwd_cpu", &effkern::low_rank_attention_bwd_cpu, "its backward, C++ CPU");
  m.def("residual_layer_norm_fwd_cpu", &effkern::residual_layer_norm_fwd_cpu, "residual add + LayerNorm, C++ CPU");
  m.def("residual_layer_norm_bwd_cpu", &effkern::residual_layer_norm_bwd_cpu, "its backward, C++ CPU");
  m.def("low_rank_linear_fwd_cpu", &effkern::low_rank_linear_fwd_cpu, "fused low-rank linear, C++ CPU");
  m.def("low_rank_linear_bwd_cpu", &effkern::low_rank_linear_bwd_cpu, "its backward, C++ CPU");
  m.def("low_rank_embedding_fwd_cpu", &effkern::low_rank_embedding_fwd_cpu, "compressed embedding lookup, C++ CPU");
  m.def("low_rank_embedding_bwd_cpu", &effkern::low_rank_embedding_bwd_cpu, "its backward, C++ CPU");
  m.def("cpu_isa", &effkern::cpu_isa, "the SIMD level the CPU kernels dispatched to on this machine");
#ifdef EFFKERN_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  m.def("gqa_decode_cuda", &effkern::gqa_decode_cuda, "GQA decode attention, CUDA kernel");
  m.def("kv_append_cuda", &effkern::kv_append_cuda, "KV-cache append with RoPE/projection, CUDA kernel");
  m.def("low_rank_attention_fwd_cuda", &effkern::low_rank_attention_fwd_cuda, "low-rank attention core, CUDA");
  m.def("low_rank_attention_bwd_cuda", &effkern::low_rank_attention_bwd_cuda, "its backward, CUDA");
  m.def("low_rank_linear_fwd_cuda", &effkern::low_rank_linear_fwd_cuda, "fused low-rank linear, CUDA");
  m.def("low_rank_linear_bwd_cuda", &effkern::low_rank_linear_bwd_cuda, "its backward up to dx, CUDA");
  m.def("low_rank_embedding_fwd_cuda", &effkern::low_rank_embedding_fwd_cuda, "compressed embedding lookup, CUDA");
  m.def("low_rank_embedding_de_cuda", &effkern::low_rank_embedding_de_cuda, "its per-bag gradient, CUDA");
#else
  m.attr("HAS_CUDA") = false;
#endif
}
