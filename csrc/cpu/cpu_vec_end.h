// Closes cpu_vec_avx2.h / cpu_vec_avx512.h: back to the baseline instruction set.
#pragma GCC pop_options
