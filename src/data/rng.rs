//! Deterministic random numbers.
//!
//! [`PyRandom`] is the Mersenne Twister MT19937 seeded like CPython's `random.seed(int)`
//! (`init_by_array` over the 32-bit words of |seed|), with `getrandbits`, `randbelow` and `choice`
//! as CPython computes them. `random.seed(s); random.choice(prompts)` in Python and
//! `PyRandom::new(s).choice(&prompts)` here pick the same prompts, so XrayGLM's
//! `build_ch_prompt-random.py` becomes reproducible once it is given a seed (spec §8.5).
//! The algorithm is the published MT19937 (Matsumoto & Nishimura 1998, 2002 init_by_array).

const N: usize = 624;
const M: usize = 397;

#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    fn init_genrand(s: u32) -> [u32; N] {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1812433253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        mt
    }

    /// Seed from a key of 32-bit words (MT19937 `init_by_array`).
    pub fn from_key(key: &[u32]) -> Self {
        let mut mt = Self::init_genrand(19650218);
        let (mut i, mut j) = (1usize, 0usize);
        let mut k = N.max(key.len());
        while k > 0 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1664525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
            k -= 1;
        }
        k = N - 1;
        while k > 0 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1566083941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            k -= 1;
        }
        mt[0] = 0x8000_0000;
        Self { mt, index: N }
    }

    /// `random.Random(seed)` for a Python int seed.
    pub fn new(seed: i64) -> Self {
        let mut v = seed.unsigned_abs();
        let mut key = Vec::new();
        while v > 0 {
            key.push(v as u32);
            v >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        Self::from_key(&key)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.mt[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.mt[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.getrandbits(k)` for 1 ≤ k ≤ 64.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!((1..=64).contains(&k));
        if k <= 32 {
            return (self.next_u32() >> (32 - k)) as u64;
        }
        // CPython fills 32-bit words from the least significant end; the last word is truncated.
        let lo = self.next_u32() as u64;
        let hi = (self.next_u32() >> (64 - k)) as u64;
        lo | (hi << 32)
    }

    /// `random._randbelow(n)` (rejection sampling on `n.bit_length()` bits).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.choice(seq)`.
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.randbelow(items.len() as u64) as usize]
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)
    }

    /// Fisher–Yates shuffle (CPython's `random.shuffle` order).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// sat 0.3.6's `RandomMappingDataset.__getitem__(index)` over `n` samples (the with-replacement
/// sampler XrayGLM trained with, spec §5.5): `random.Random(index)` draws 16 seeds
/// (`randint(0, 2**32-1)`) for a NumPy `RandomState`, whose legacy `randint(n)` (masked rejection on
/// 32-bit draws) picks the sample.
pub fn sat_random_mapping(index: u64, n: u64) -> u64 {
    assert!(n > 0 && n <= 1 << 32, "sat sampler needs 0 < n <= 2^32");
    let mut py = PyRandom::new(index as i64);
    let seeds: Vec<u32> = (0..16).map(|_| py.randbelow(1 << 32) as u32).collect();
    let mut np = PyRandom::from_key(&seeds);
    let max = n - 1;
    if max == 0 {
        return 0;
    }
    let mut mask = max;
    for shift in [1, 2, 4, 8, 16, 32] {
        mask |= mask >> shift;
    }
    loop {
        let v = np.next_u32() as u64 & mask;
        if v <= max {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The MT19937 reference implementation (init_by_array {0x123,0x234,0x345,0x456})
        // prints 1067595299 955945823 477289528 as its first outputs.
        let mut r = PyRandom::from_key(&[0x123, 0x234, 0x345, 0x456]);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [1067595299, 955945823, 477289528]
        );
    }
}
