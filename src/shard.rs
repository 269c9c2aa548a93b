//! Which serving thread this is: a leaf that every layer may ask, for state kept per thread
//! (the pool's idle connections, request statistics, spare timers). `serve::workers` sets it
//! when it starts a serving thread.

use std::cell::Cell;

thread_local! {
    /// 1 + this thread's index among the serving threads; 0 on any other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Which serving thread this is (1-based), or 0 on any other thread.
pub fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// Marks this thread as serving thread `n` (1-based).
pub(crate) fn set(n: usize) {
    SHARD.with(|s| s.set(n));
}

/// Slots of per-thread state kept (the pool's idle lists, the request statistics): serving
/// threads beyond this share them.
pub const SLOTS: usize = 64;

/// This thread's slot among [`SLOTS`] (slot 0 for any thread that does not serve).
pub fn slot() -> usize {
    shard() % SLOTS
}
