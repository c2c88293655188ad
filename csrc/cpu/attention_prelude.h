// Everything attention_kernel.h needs apart from at::vec, included before a capability file
// turns on AVX2/AVX512 code generation (see cpu_vec.h).
#pragma once

#include "cpu_vec.h"
#include "attention_args.h"
