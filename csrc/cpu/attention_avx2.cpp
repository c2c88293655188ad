// bigmodel::attention's kernels compiled for AVX2 + FMA (the bodies are in attention_kernel.h);
// attention.cpp runs them only where torch runs its own AVX2 kernels.
#include "attention_prelude.h"

#if BIGMODEL_CPU_VECTOR_VARIANTS
#include "cpu_vec_avx2.h"
#include "attention_kernel.h"
#include "cpu_vec_end.h"
#endif
