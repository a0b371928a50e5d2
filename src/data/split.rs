//! The train / held-out split of a records file: deterministic from a seed, the same in training
//! and in `eval`.

use super::records::Record;
use super::rng::PyRandom;

/// Split records into train / validation: `ceil(n · fraction)` held-out records (at least one and
/// one fewer than all, when `fraction > 0`), drawn by a seeded shuffle; order is kept in both parts.
pub fn split(records: Vec<Record>, fraction: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let n = records.len();
    let n_val = if fraction > 0.0 && n > 1 {
        ((n as f64 * fraction).ceil() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    PyRandom::from_key(&[seed as u32, (seed >> 32) as u32, 0x5eed]).shuffle(&mut order);
    let val_idx: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, r) in records.into_iter().enumerate() {
        if val_idx.contains(&i) {
            val.push(r)
        } else {
            train.push(r)
        }
    }
    (train, val)
}
