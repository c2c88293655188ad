// bigmodel::attention's kernels compiled for AVX512 (the bodies are in attention_kernel.h);
// attention.cpp runs them only where torch runs its own AVX512 kernels.
#include "attention_prelude.h"

#if BIGMODEL_CPU_VECTOR_VARIANTS
#include "cpu_vec_avx512.h"
#include "attention_kernel.h"
#include "cpu_vec_end.h"
#endif
