//! ChatGLM's key/value caches: [`KvCache`] for a batch decoded together from one prefill
//! (generation, `chat`, `eval`), [`SlotCache`] for rows of different lengths that join and leave
//! between steps (the serving engine's continuous batching).

use tch::{Kind, Tensor};

/// Per-layer keys (after rotary) and values `[B, heads, T, head_dim]` of the tokens decoded so
/// far; empty before the first pass.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the batch rows `rows` (finished sequences leave the batch).
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

/// Per-layer keys and values of sequences of different lengths decoded together (continuous
/// batching): `[rows, heads, capacity, head_dim]` per layer, row `r` holding its first `lens[r]`
/// positions. Rows join from a prefilled [`KvCache`] and leave by swap-remove, so the live rows
/// are always `0..rows()`; memory grows by doubling and is freed when the last row leaves.
#[derive(Debug, Default)]
pub struct SlotCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) lens: Vec<i64>,
}

impl SlotCache {
    /// Live rows.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Tokens held by each live row.
    pub fn lens(&self) -> &[i64] {
        &self.lens
    }

    /// Bytes the cache holds (capacity, not only the live rows).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| {
                (k.numel() * k.kind().elt_size_in_bytes())
                    + (v.numel() * v.kind().elt_size_in_bytes())
            })
            .sum()
    }

    /// Capacity `(rows, positions)`.
    pub(crate) fn capacity(&self) -> (i64, i64) {
        match self.layers.first() {
            Some((k, _)) => (k.size()[0], k.size()[2]),
            None => (0, 0),
        }
    }

    /// Make room for `rows` rows of `positions` positions, keeping what is held.
    pub(crate) fn reserve(&mut self, like: &[(Tensor, Tensor)], rows: i64, positions: i64) {
        let (r0, t0) = self.capacity();
        if rows <= r0 && positions <= t0 {
            return;
        }
        let (r1, t1) = (
            (rows.max(r0).max(1) as u64).next_power_of_two() as i64,
            (positions.max(t0).max(16) as u64).next_power_of_two() as i64,
        );
        let live = self.lens.len() as i64;
        let grow = |old: Option<&Tensor>, like: &Tensor| {
            let s = like.size();
            let t = Tensor::zeros([r1, s[1], t1, s[3]], (like.kind(), like.device()));
            if let Some(o) = old.filter(|_| live > 0) {
                t.narrow(0, 0, live)
                    .narrow(2, 0, t0)
                    .copy_(&o.narrow(0, 0, live));
            }
            t
        };
        let old = std::mem::take(&mut self.layers);
        self.layers = like
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let o = old.get(i);
                (grow(o.map(|x| &x.0), k), grow(o.map(|x| &x.1), v))
            })
            .collect();
    }

    /// Add row `row` of a prefilled cache as a new last row; returns its index.
    pub fn join(&mut self, from: &KvCache, row: i64) -> usize {
        let len = from.len();
        let like: Vec<(Tensor, Tensor)> = from
            .layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
            .collect();
        let r = self.lens.len() as i64;
        let (_, t0) = self.capacity();
        // Room for the prompt and a reply that may grow from it (doubling as it does).
        self.reserve(&like, r + 1, len.max(t0));
        for ((k, v), (fk, fv)) in self.layers.iter().zip(&like) {
            k.narrow(0, r, 1)
                .narrow(2, 0, len)
                .copy_(&fk.narrow(0, row, 1));
            v.narrow(0, r, 1)
                .narrow(2, 0, len)
                .copy_(&fv.narrow(0, row, 1));
        }
        self.lens.push(len);
        r as usize
    }

    /// Remove row `r`: the last row takes its place (what [`Vec::swap_remove`] does).
    pub fn swap_remove(&mut self, r: usize) {
        let last = self.lens.len() - 1;
        if r != last {
            let n = self.lens[last];
            for (k, v) in &self.layers {
                k.narrow(0, r as i64, 1)
                    .narrow(2, 0, n)
                    .copy_(&k.narrow(0, last as i64, 1).narrow(2, 0, n));
                v.narrow(0, r as i64, 1)
                    .narrow(2, 0, n)
                    .copy_(&v.narrow(0, last as i64, 1).narrow(2, 0, n));
            }
        }
        self.lens.swap_remove(r);
        if self.lens.is_empty() {
            self.layers.clear();
        }
    }
}

/// How one layer's attention uses a cache.
pub(crate) enum Kv<'a> {
    /// Earlier tokens in front of this call's, which are appended (prefill and equal-length
    /// batches): sat's `CachedAutoregressiveMixin`.
    Append(&'a mut Option<(Tensor, Tensor)>),
    /// One new token per row written at the row's own position `at[r]`; the keys are the first
    /// `keys` positions of every live row, the mask hides each row's unused ones.
    Slots {
        k: &'a mut Tensor,
        v: &'a mut Tensor,
        at: &'a Tensor,
        keys: i64,
    },
}

impl Kv<'_> {
    /// The keys and values `[B, heads, T, head_dim]` this call attends to, given its own `k`, `v`
    /// (post-rotary), which the cache takes in.
    pub(crate) fn attend(self, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        match self {
            Kv::Append(cache) => {
                let (k, v) = match cache.as_ref() {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
                    None => (k, v),
                };
                *cache = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            Kv::Slots {
                k: ck,
                v: cv,
                at,
                keys,
            } => {
                let b = k.size()[0];
                let rows = Tensor::arange(b, (Kind::Int64, k.device()));
                let idx = [Some(rows), None, Some(at.shallow_clone())];
                let _ = ck.index_put_(&idx, &k.squeeze_dim(2), false);
                let _ = cv.index_put_(&idx, &v.squeeze_dim(2), false);
                (
                    ck.narrow(0, 0, b).narrow(2, 0, keys),
                    cv.narrow(0, 0, b).narrow(2, 0, keys),
                )
            }
        }
    }
}
