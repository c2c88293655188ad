// Included by a per-capability kernel file after cpu_vec.h: what follows, up to
// cpu_vec_end.h, is compiled for AVX2 + FMA and lands in namespaces named AVX2.
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
