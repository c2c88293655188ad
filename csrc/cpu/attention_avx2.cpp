// bigmodel::attention's kernels compiled for AVX2 + FMA (the bodies are in attention_kernel.h);
// attention.cpp runs them only where torch runs its own AVX2 kernels.
#include "attention_prelude.h"

#if BIGMODEL_ATTN_VECTOR_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// GCC's target pragma does not define the ISA macros that at::vec and sleef.h test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "attention_kernel.h"
#pragma GCC pop_options
#else
namespace bigmodel::attn::AVX2 {
void forward(const Args&) { TORCH_CHECK(false, "bigmodel::attention: AVX2 kernels not built"); }
void backward(const Args&) { TORCH_CHECK(false, "bigmodel::attention: AVX2 kernels not built"); }
}  // namespace bigmodel::attn::AVX2
#endif
