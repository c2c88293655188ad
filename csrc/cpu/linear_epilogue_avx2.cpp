// linear_epilogue_kernel.h compiled for AVX2 + FMA; linear_epilogue.h runs it only where torch
// runs its own AVX2 kernels.
#include "cpu_vec.h"
#include "linear_epilogue.h"  // its inline helpers keep the baseline ISA (see cpu_vec.h)

#if BIGMODEL_CPU_VECTOR_VARIANTS
#include "cpu_vec_avx2.h"
#include "linear_epilogue_kernel.h"
#include "cpu_vec_end.h"
#endif
