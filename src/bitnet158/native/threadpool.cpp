// The thread pool of threadpool.h.
//
// A job is published as one 64-bit word: generation (high half) | next unclaimed chunk (low
// half). Threads claim chunks with compare-exchange on that word, so a claim can only succeed
// for the job it read, and the caller may finish every chunk by itself.
#include "threadpool.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

namespace bitnet158 {

namespace {

using ChunkFn = void (*)(void*, int64_t);

// This thread's place in the pool: 0 for callers, 1 .. threads - 1 for the workers.
thread_local int t_pool_index = 0;

// How long an idle worker polls for the next job before it sleeps: long enough to stay awake
// between the matrix products of one decode step, short enough not to steal a shared CPU.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

int default_threads() {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return std::max(1, CPU_COUNT(&set));
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n ? static_cast<int>(n) : 1;
}

class Pool {
public:
    explicit Pool(int threads) : threads_(threads), pid_(getpid()) {}
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;

    int threads() const { return threads_.load(std::memory_order_relaxed); }
    pid_t pid() const { return pid_; }

    void resize(int threads) {
        std::lock_guard<std::mutex> busy(submit_);
        stop_workers();
        threads_ = threads;
    }

    void run(int64_t chunks, ChunkFn call, void* ctx) {
        std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
        if (!busy.owns_lock() || threads_ == 1 || chunks <= 1 || chunks > 0x7fffffff) {
            for (int64_t i = 0; i < chunks; ++i)
                call(ctx, i);
            return;
        }
        if (workers_.empty())
            start_workers();
        call_.store(call, std::memory_order_relaxed);
        ctx_.store(ctx, std::memory_order_relaxed);
        total_.store(chunks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const uint64_t job = ((state_.load(std::memory_order_relaxed) >> 32) + 1) << 32;
        state_.store(job, std::memory_order_seq_cst);  // publishes the fields above
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(sleep_mu_);
            sleep_cv_.notify_all();
        }
        work(job);
        // Wait for chunks other threads claimed; they are running, so this is short.
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < 4096)
                cpu_relax();
            else
                std::this_thread::yield();
        }
    }

private:
    // Claim and run chunks of the job published as `s` until none is left or a new job
    // replaced it. A successful claim of (job, i) proves chunk i of that job was unclaimed, so
    // its caller is still waiting and the fields read below are that job's.
    void work(uint64_t s) {
        const uint64_t job = s >> 32;
        const ChunkFn call = call_.load(std::memory_order_relaxed);
        void* const ctx = ctx_.load(std::memory_order_relaxed);
        const int64_t total = total_.load(std::memory_order_relaxed);
        while ((s >> 32) == job && static_cast<int64_t>(s & 0xffffffffu) < total) {
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                             std::memory_order_acquire)) {
                call(ctx, static_cast<int64_t>(s & 0xffffffffu));
                done_.fetch_add(1, std::memory_order_release);
                ++s;
            }
        }
    }

    uint64_t wait_for_job(uint64_t seen) {
        const auto deadline = std::chrono::steady_clock::now() + kSpin;
        for (int i = 1;; ++i) {
            const uint64_t s = state_.load(std::memory_order_acquire);
            if ((s >> 32) != seen || stop_.load(std::memory_order_relaxed))
                return s;
            if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline)
                break;
            cpu_relax();
        }
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        uint64_t s = 0;
        sleep_cv_.wait(lock, [&] {
            s = state_.load(std::memory_order_seq_cst);
            return (s >> 32) != seen || stop_.load(std::memory_order_relaxed);
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        return s;
    }

    void worker_loop(uint64_t seen) {
        for (;;) {
            const uint64_t s = wait_for_job(seen);
            if (stop_.load(std::memory_order_acquire))
                return;
            seen = s >> 32;
            work(s);
        }
    }

    void start_workers() {
        stop_.store(false);
        const uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
        for (int i = 1; i < threads_; ++i)
            workers_.emplace_back([this, seen, i] {
                t_pool_index = i;
                worker_loop(seen);
            });
    }

    void stop_workers() {
        {
            std::lock_guard<std::mutex> lock(sleep_mu_);
            stop_.store(true);
            sleep_cv_.notify_all();
        }
        for (std::thread& w : workers_)
            w.join();
        workers_.clear();
    }

    std::atomic<int> threads_;
    const pid_t pid_;
    std::mutex submit_;  // one job at a time; a concurrent caller runs alone
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> state_{0};
    std::atomic<int64_t> done_{0};
    std::atomic<int64_t> total_{0};
    std::atomic<ChunkFn> call_{nullptr};
    std::atomic<void*> ctx_{nullptr};
    std::atomic<bool> stop_{false};
    std::atomic<int> sleepers_{0};
    std::mutex sleep_mu_;
    std::condition_variable sleep_cv_;
};

std::mutex g_mu;  // guards g_pool and g_requested
Pool* g_pool = nullptr;
int g_requested = 0;

// fork() copies only the calling thread: keep g_mu consistent across it, and let the child
// build a new pool (the parent's workers do not exist there; their pool is leaked, not joined).
void install_fork_handlers() {
    static std::once_flag once;
    std::call_once(once, [] {
        pthread_atfork([] { g_mu.lock(); }, [] { g_mu.unlock(); }, [] { g_mu.unlock(); });
    });
}

Pool& pool() {
    install_fork_handlers();
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_pool || g_pool->pid() != getpid())
        g_pool = new Pool(g_requested > 0 ? g_requested : default_threads());  // never freed
    return *g_pool;
}

}  // namespace

void set_num_threads(int n) {
    if (n < 1)
        throw std::invalid_argument("number of threads must be >= 1");
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(g_mu);
    g_requested = n;
    p.resize(n);
}

int num_threads() {
    return pool().threads();
}

namespace {

// One thread's share of a parallel_for_ranges job: [front, back) packed in one word, so the
// owner (taking from the front) and a thief (taking from the back) claim with one CAS each.
struct alignas(64) Share {
    std::atomic<uint64_t> range;
};

constexpr uint64_t pack_range(int64_t front, int64_t back) {
    return (uint64_t(front) << 32) | uint64_t(back);
}

struct RangesJob {
    void (*call)(void*, int64_t, int64_t);
    void* ctx;
    int64_t step;
    int shares;
    Share* share;

    // Claim up to `step` items of share i from its front (owner) or back (thief).
    bool claim(int i, bool from_front, int64_t& b, int64_t& e) const {
        uint64_t r = share[i].range.load(std::memory_order_relaxed);
        for (;;) {
            const int64_t front = int64_t(r >> 32), back = int64_t(r & 0xffffffffu);
            if (front >= back)
                return false;
            const int64_t take = std::min(step, back - front);
            b = from_front ? front : back - take;
            e = b + take;
            const uint64_t next = from_front ? pack_range(e, back) : pack_range(front, b);
            if (share[i].range.compare_exchange_weak(r, next, std::memory_order_relaxed))
                return true;
        }
    }

    // The share with the most items left, or -1 when all are empty.
    int fullest() const {
        int best = -1;
        int64_t most = 0;
        for (int i = 0; i < shares; ++i) {
            const uint64_t r = share[i].range.load(std::memory_order_relaxed);
            const int64_t left = int64_t(r & 0xffffffffu) - int64_t(r >> 32);
            if (left > most) {
                most = left;
                best = i;
            }
        }
        return best;
    }

    void run_share(int own) const {
        int64_t b, e;
        while (claim(own, true, b, e))
            call(ctx, b, e);
        for (int i; (i = fullest()) >= 0;)
            if (claim(i, false, b, e))
                call(ctx, b, e);
    }
};

}  // namespace

void parallel_for_ranges(int64_t n, int64_t step, void (*call)(void*, int64_t, int64_t),
                         void* ctx) {
    if (n <= 0)
        return;
    step = std::max<int64_t>(step, 1);
    const int shares = int(std::min<int64_t>(num_threads(), (n + step - 1) / step));
    if (shares <= 1 || n > 0x7fffffff) {
        call(ctx, 0, n);
        return;
    }
    std::vector<Share> share(static_cast<size_t>(shares));
    for (int i = 0; i < shares; ++i)
        share[size_t(i)].range.store(pack_range(n * i / shares, n * (i + 1) / shares),
                                     std::memory_order_relaxed);
    const RangesJob job{call, ctx, step, shares, share.data()};
    // A chunk runs the share of the thread that claimed it (then steals); a share nobody owns
    // is emptied by thieves. The pool's completion wait covers the stolen steps too, as a
    // thief's chunk returns only after its steps are done.
    parallel_for(shares, [&](int64_t) { job.run_share(t_pool_index % shares); });
}

void parallel_for_chunks(int64_t chunks, void (*call)(void*, int64_t), void* ctx) {
    if (chunks <= 0)
        return;
    pool().run(chunks, call, ctx);
}

}  // namespace bitnet158
