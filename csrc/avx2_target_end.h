// End of the AVX2 region opened by avx2_target_begin.h.
#pragma GCC pop_options
