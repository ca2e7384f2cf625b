// A small persistent thread pool: parallel_for over chunks that threads claim dynamically, and
// parallel_ranges over contiguous per-thread shares with stealing from their ends.
//
// Why not OpenMP: with libgomp's default wait policy, a 2-thread GEMV on a 2-core machine that
// other processes also use took ~16 ms per call instead of ~0.1 ms (every call waited a
// scheduler time slice for a worker that spun itself out of its share of the CPU). Here the
// caller works too and claims chunks like any worker, so a worker that is not scheduled in
// time costs nothing: the caller finishes its chunks. Workers spin briefly, then sleep.
#pragma once

#include <cstdint>
#include <type_traits>

namespace bitnet158 {

// Threads the pool uses, the caller included: set_num_threads(n >= 1) (std::invalid_argument
// otherwise); default: the CPUs this process may run on.
void set_num_threads(int n);
int num_threads();

// Run call(ctx, i) for every i in [0, chunks), on up to num_threads() threads, and return when
// all are done. Chunks must not throw. Concurrent callers (several Python threads) are safe:
// a call that finds the pool busy runs its chunks on its own thread.
void parallel_for_chunks(int64_t chunks, void (*call)(void* ctx, int64_t chunk), void* ctx);

// Run call(ctx, begin, end) over disjoint ranges covering [0, n), on up to num_threads()
// threads. Each thread starts on its own contiguous share and takes `step` items at a time from
// its front; a thread whose share is done takes steps from the back of the fullest other share.
// So every thread streams one contiguous range (the prefetchers see long runs) and all finish
// within about one step of each other, whatever their speeds. The pool's thread i (the caller
// is 0) owns share i, so calls that split the same rows alike give each thread the same part:
// what it wrote in one is in its own caches for the next.
void parallel_for_ranges(int64_t n, int64_t step, void (*call)(void* ctx, int64_t, int64_t),
                         void* ctx);

template <class F>
void parallel_ranges(int64_t n, int64_t step, F&& f) {
    using Fn = std::remove_reference_t<F>;
    parallel_for_ranges(
        n, step, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); },
        const_cast<void*>(static_cast<const void*>(&f)));
}

template <class F>
void parallel_for(int64_t chunks, F&& f) {
    using Fn = std::remove_reference_t<F>;
    parallel_for_chunks(
        chunks, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); },
        const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace bitnet158
