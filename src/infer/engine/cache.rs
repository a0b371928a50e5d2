//! The engine's cache manager: film embeddings by content ([`ImageCache`]) and the keys, values
//! and first logits of whole prompts ([`PromptCache`]), each bounded in bytes and evicted least
//! recently used first.
//!
//! Why whole prompts and not token blocks (vLLM's automatic prefix caching, SGLang's radix tree):
//! those reuse the keys of a shared *prefix* and are exact for causal attention, where a token's
//! keys depend only on the tokens before it. ChatGLM-6B is a GLM (arXiv 2103.10360): its context —
//! every token before `<sop>`, films, history and question — attends bidirectionally (spec §1.c,
//! [`crate::model::positions::attention_mask`]), so from the second layer on the keys of the
//! first token depend on the last one. A follow-up turn, or a second question about the same film,
//! changes the context and with it the keys of every earlier token; reusing them would change the
//! replies. What is exact, and kept here:
//!
//! * a film's embeddings (ViT, Q-Former, projection: 32 slots), which do not depend on the text —
//!   every turn of a conversation re-sends its films, and the films are encoded once;
//! * a whole prompt (adapter, ids, films, placement): a prompt asked again (a regenerated reply,
//!   several samples of one question, clients asking the same thing of the same film) skips its
//!   prefill, and its first token is chosen from the stored logits.
//!
//! A hit returns what the uncached path computed for the same inputs, bit for bit (nothing is
//! recomputed or approximated); entries are copies, so evicting one never touches a row decoding.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest as _, Sha256};
use tch::Tensor;

use crate::model::chatglm::KvCache;

/// A SHA-256 content digest.
pub(super) type Digest = [u8; 32];

/// A film's digest: its preprocessed pixels (what the vision tower sees), bit for bit.
pub(super) fn film_digest(pixels: &[f32]) -> Digest {
    let mut h = Sha256::new();
    h.update(b"film\0");
    let mut buf = Vec::with_capacity(pixels.len() * 4);
    for p in pixels {
        buf.extend_from_slice(&p.to_le_bytes());
    }
    h.update(&buf);
    h.finalize().into()
}

/// A prompt's digest: the model (adapter) that reads it, its ids, where its films go and which
/// films they are. Two prompts share a digest only when every input of their prefill is equal.
pub(super) fn prompt_digest(model: usize, ids: &[i64], starts: &[i64], films: &[Digest]) -> Digest {
    let mut h = Sha256::new();
    h.update(b"prompt\0");
    h.update((model as u64).to_le_bytes());
    for part in [ids, starts] {
        h.update((part.len() as u64).to_le_bytes());
        for x in part {
            h.update(x.to_le_bytes());
        }
    }
    h.update((films.len() as u64).to_le_bytes());
    for f in films {
        h.update(f);
    }
    h.finalize().into()
}

/// Bytes of a tensor's elements.
pub(super) fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// A copy of `t` that shares no storage with it (a narrow of a batch would keep the whole batch
/// alive).
pub(super) fn own(t: &Tensor) -> Tensor {
    let mut c = t.empty_like();
    c.copy_(t);
    c
}

/// Entries by digest within a byte budget; the least recently used leave first.
pub(super) struct Lru<V> {
    budget: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<Digest, (V, usize, u64)>,
    order: BTreeMap<u64, Digest>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

impl<V> Lru<V> {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The entry for `key`, now the most recently used (counted as a hit or a miss).
    pub(super) fn get(&mut self, key: &Digest) -> Option<&V> {
        if !self.enabled() {
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(key) {
            Some((v, _, used)) => {
                self.order.remove(used);
                *used = tick;
                self.order.insert(tick, *key);
                self.hits += 1;
                Some(v)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keep `value` (`bytes` large) under `key`, evicting the least recently used entries until it
    /// fits; one larger than the whole budget is not kept (nor any with the cache off).
    pub(super) fn insert(&mut self, key: Digest, value: V, bytes: usize) {
        if !self.enabled() || bytes > self.budget {
            return;
        }
        if let Some((_, b, used)) = self.entries.remove(&key) {
            self.order.remove(&used);
            self.bytes -= b;
        }
        while self.bytes + bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.entries.insert(key, (value, bytes, self.tick));
        self.bytes += bytes;
    }
}

/// Film embeddings `[1, image_length, hidden]` by [`film_digest`].
pub(super) type ImageCache = Lru<Tensor>;

/// What a prompt's prefill leaves: its keys and values (one row) and its last position's logits.
pub(super) struct PromptEntry {
    pub(super) kv: KvCache,
    /// `[1, vocab]`.
    pub(super) logits: Tensor,
}

impl PromptEntry {
    /// Row `row` of a prefilled batch, copied out of it.
    pub(super) fn of_row(cache: &KvCache, logits: &Tensor, row: i64) -> (Self, usize) {
        let layers: Vec<Option<(Tensor, Tensor)>> = cache
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| (own(&k.narrow(0, row, 1)), own(&v.narrow(0, row, 1))))
            })
            .collect();
        let logits = own(&logits.narrow(0, row, 1));
        let bytes = layers
            .iter()
            .flatten()
            .map(|(k, v)| tensor_bytes(k) + tensor_bytes(v))
            .sum::<usize>()
            + tensor_bytes(&logits);
        (
            Self {
                kv: KvCache { layers },
                logits,
            },
            bytes,
        )
    }
}

/// Whole prompts by [`prompt_digest`].
pub(super) type PromptCache = Lru<PromptEntry>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Digest {
        [i; 32]
    }

    #[test]
    fn the_least_recently_used_leave_first_and_the_budget_holds() {
        let mut c: Lru<u32> = Lru::new(100);
        c.insert(key(1), 1, 40);
        c.insert(key(2), 2, 40);
        assert_eq!(c.get(&key(1)), Some(&1)); // 1 is now the most recent
        c.insert(key(3), 3, 40); // evicts 2
        assert_eq!(c.get(&key(2)), None);
        assert_eq!(c.get(&key(1)), Some(&1));
        assert_eq!(c.get(&key(3)), Some(&3));
        assert_eq!((c.bytes(), c.len()), (80, 2));
        assert_eq!((c.hits, c.misses), (3, 1));
        // Replacing an entry counts its bytes once; one over the budget is not kept.
        c.insert(key(3), 33, 50);
        assert_eq!((c.bytes(), c.len()), (90, 2));
        c.insert(key(4), 4, 101);
        assert_eq!(c.get(&key(4)), None);
        assert_eq!(c.bytes(), 90);
        // A large entry evicts as many as it needs.
        c.insert(key(5), 5, 100);
        assert_eq!((c.bytes(), c.len()), (100, 1));
        // Budget 0: nothing is kept and nothing is counted.
        let mut off: Lru<u32> = Lru::new(0);
        off.insert(key(1), 1, 0);
        assert_eq!(off.get(&key(1)), None);
        assert_eq!((off.hits, off.misses, off.len()), (0, 0, 0));
    }

    #[test]
    fn digests_tell_every_input_apart() {
        let f = film_digest(&[0.5, -1.0]);
        assert_ne!(f, film_digest(&[0.5, -1.0000001]));
        assert_ne!(f, film_digest(&[0.5]));
        let base = prompt_digest(0, &[1, 2, 3], &[1], &[f]);
        assert_eq!(base, prompt_digest(0, &[1, 2, 3], &[1], &[f]));
        assert_ne!(base, prompt_digest(1, &[1, 2, 3], &[1], &[f]));
        assert_ne!(base, prompt_digest(0, &[1, 2, 4], &[1], &[f]));
        assert_ne!(base, prompt_digest(0, &[1, 2, 3], &[2], &[f]));
        assert_ne!(base, prompt_digest(0, &[1, 2, 3], &[1], &[key(0)]));
        // Lengths are part of the digest: [1, 2] + [3] is not [1] + [2, 3].
        assert_ne!(
            prompt_digest(0, &[1, 2], &[3], &[]),
            prompt_digest(0, &[1], &[2, 3], &[])
        );
    }

    #[test]
    fn an_entry_owns_its_row() {
        let mut k = Tensor::arange(2 * 3, (tch::Kind::Float, tch::Device::Cpu)).view([2, 1, 3, 1]);
        let mut v = &k * 2;
        let cache = KvCache {
            layers: vec![Some((k.shallow_clone(), v.shallow_clone()))],
        };
        let mut logits = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let (e, bytes) = PromptEntry::of_row(&cache, &logits, 1);
        assert_eq!(bytes, (3 + 3 + 2) * 4);
        let _ = k.fill_(0.0);
        let _ = v.fill_(0.0);
        let _ = logits.fill_(0.0);
        let (ek, ev) = e.kv.layers[0].as_ref().unwrap();
        assert_eq!(
            Vec::<f32>::try_from(ek.flatten(0, -1)).unwrap(),
            [3., 4., 5.]
        );
        assert_eq!(
            Vec::<f32>::try_from(ev.flatten(0, -1)).unwrap(),
            [6., 8., 10.]
        );
        assert_eq!(
            Vec::<f32>::try_from(e.logits.flatten(0, -1)).unwrap(),
            [3., 4.]
        );
    }
}
