//! The data path: records → images → samples → batches (docs/reference.md §1.d, §2, §8).

pub mod batch;
pub mod image;
pub mod records;
pub mod rng;
pub mod sample;
pub mod split;
pub mod synthetic;
pub mod synthetic_hard;

pub use split::split;

/// Threads to use: `n`, or all cores when 0.
pub fn worker_threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}
