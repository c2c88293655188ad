// transpose_kernel.h compiled for AVX2; transpose.h runs it only at that level.
#include "cpu_vec.h"
#include "transpose.h"  // its inline helpers keep the baseline ISA (see cpu_vec.h)

#if BIGMODEL_CPU_VECTOR_VARIANTS
#include "cpu_vec_avx2.h"
#include "transpose_kernel.h"
#include "cpu_vec_end.h"
#endif
