// Launch geometry shared by the launchers in expand.cu and reduce.cu: the block width of the
// one-thread-per-column (expand_add, reduce_rows) and one-thread-per-element (keep_mask)
// kernels, and the number of blocks that cover a length.
#pragma once
#include <cstdint>

namespace lorakern {

constexpr int THREADS = 256;  // threads per block: columns (or elements) per block

// ceil(n / per) as a grid dimension: the blocks of `per` items that cover n items.
inline unsigned num_blocks(int64_t n, int64_t per) { return (unsigned)((n + per - 1) / per); }

}  // namespace lorakern
