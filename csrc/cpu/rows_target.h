// The opening of an instruction-set file of row kernels (rows_avx2.cpp, rows_avx512.cpp): the file
// defines LORAKERN_ROWS_TARGET (a target string, "avx2,fma") and includes this first. Every
// function after it, those of immintrin.h, rows.h and rows_vec.h (included here) among them,
// compiles for that target: GCC's target pragma holds to the end of the file; clang's attribute
// push needs LORAKERN_ROWS_TARGET_END (its pop) at the file's end.
#pragma once
#define LORAKERN_PRAGMA_(x) _Pragma(#x)
#define LORAKERN_PRAGMA(x) LORAKERN_PRAGMA_(x)
#if defined(__clang__)
LORAKERN_PRAGMA(clang attribute push(__attribute__((target(LORAKERN_ROWS_TARGET))), apply_to = function))
#define LORAKERN_ROWS_TARGET_END _Pragma("clang attribute pop")
#else
LORAKERN_PRAGMA(GCC target(LORAKERN_ROWS_TARGET))
#define LORAKERN_ROWS_TARGET_END
#endif
#include <immintrin.h>

#include "rows_vec.h"
