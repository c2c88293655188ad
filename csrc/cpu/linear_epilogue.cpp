// linear_epilogue_kernel.h compiled for the baseline instruction set (CPUs below AVX2, and
// ATEN_CPU_CAPABILITY=default).
#include "cpu_vec.h"

#define CPU_CAPABILITY DEFAULT
#include "linear_epilogue_kernel.h"
