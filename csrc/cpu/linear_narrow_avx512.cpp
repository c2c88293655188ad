// linear_narrow_kernel.h compiled for AVX512; linear_narrow.h runs it only at that level.
#include "cpu_vec.h"
#include "linear_narrow.h"  // its inline helpers keep the baseline ISA (see cpu_vec.h)

#if BIGMODEL_CPU_VECTOR_VARIANTS
#include "cpu_vec_avx512.h"
#include "linear_narrow_kernel.h"
#include "cpu_vec_end.h"
#endif
