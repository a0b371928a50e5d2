//! ChatGLM's two-dimensional positions, the rule parity depends on, written once (sat 0.3.6
//! `ChatGLMModel.get_position_ids`, XrayGLM's `get_masks_and_position_ids_glm`; reference: the
//! position ids of ChatGLM in the VisualGLM specification, §1.c).
//!
//! Index `i` of a sequence whose context (prompt, image slots, `[gMASK]`) ends at
//! `context_length` (the index of `<sop>`) has
//! * position `i` before the context end, and the `[gMASK]`'s index (`mask_position`) from it on;
//! * block position 0 before the context end, and `i − context_length + 1` from it on.
//!
//! A sample's whole sequence, a padded batch, a prefill and each decoding step all take their
//! positions from here.

use tch::{Device, Kind, Tensor};

/// One sequence's bidirectional prefix: where it ends (`<sop>`) and where its `[gMASK]` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Index of `<sop>`: `[0, context_length)` is the bidirectional prefix.
    pub context_length: i64,
    /// Index of the `[gMASK]` (or `[MASK]`): the position every token from `<sop>` on keeps.
    pub mask_position: i64,
}

impl Prefix {
    pub fn new(context_length: usize, mask_position: usize) -> Self {
        Self {
            context_length: context_length as i64,
            mask_position: mask_position as i64,
        }
    }

    /// `[position, block position]` of index `i`.
    pub fn at(&self, i: i64) -> [i64; 2] {
        if i < self.context_length {
            [i, 0]
        } else {
            [self.mask_position, i - self.context_length + 1]
        }
    }

    /// The positions and the block positions of indices `0..len`.
    pub fn sequence(&self, len: i64) -> (Vec<i64>, Vec<i64>) {
        (0..len).map(|i| self.at(i)).map(|[p, b]| (p, b)).unzip()
    }
}

/// `[B, 2, len]` position ids of a batch: row `r` with context `rows[r]`, indices `0..len`.
pub fn batch(rows: &[Prefix], len: i64, device: Device) -> Tensor {
    let mut flat = Vec::with_capacity(rows.len() * 2 * len as usize);
    for c in rows {
        let (pos, block) = c.sequence(len);
        flat.extend(pos);
        flat.extend(block);
    }
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, 2, len])
        .to_device(device)
}

/// `[B, 2, 1]` position ids of one decoding step: row `r` feeds the token at index `index`
/// of a sequence with context `context`.
pub fn step(rows: &[(Prefix, i64)], device: Device) -> Tensor {
    let flat: Vec<i64> = rows.iter().flat_map(|(c, i)| c.at(*i)).collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, 2, 1])
        .to_device(device)
}

/// ChatGLM's mask for sequences whose bidirectional prefix has `context_lengths[b]` tokens:
/// lower-triangular ones with every column `< context_length` set to 1. `[B, 1, S, S]` float.
pub fn attention_mask(context_lengths: &[i64], seq_len: i64, device: Device) -> Tensor {
    let b = context_lengths.len() as i64;
    let tril = Tensor::ones([seq_len, seq_len], (Kind::Float, device)).tril(0);
    let cols = Tensor::arange(seq_len, (Kind::Int64, device));
    let ctx = Tensor::from_slice(context_lengths)
        .to_device(device)
        .view([b, 1, 1]);
    let prefix = cols
        .view([1, 1, seq_len])
        .lt_tensor(&ctx)
        .to_kind(Kind::Float);
    tril.unsqueeze(0).maximum(&prefix).unsqueeze(1)
}

/// Position ids `[B, 2, S]` and context lengths from token ids, as sat's `get_inputs` derives them
/// (first `<sop>` ends the context; positions freeze at the first `[gMASK]`, or `[MASK]` when no
/// sequence of the batch has a `[gMASK]`). Sequences must not start with pads (XrayGLM pads right).
pub fn positions_from_ids(
    input_ids: &Tensor,
    bos: i64,
    mask: i64,
    gmask: i64,
) -> anyhow::Result<(Tensor, Vec<i64>)> {
    let (b, s) = input_ids.size2()?;
    let ids: Vec<i64> = Vec::<i64>::try_from(input_ids.to_device(Device::Cpu).flatten(0, -1))?;
    let any_gmask = ids.contains(&gmask);
    let mark = if any_gmask { gmask } else { mask };
    let mut rows = Vec::with_capacity(b as usize);
    let mut ctxs = Vec::with_capacity(b as usize);
    for row in ids.chunks(s as usize) {
        let ctx = row
            .iter()
            .position(|&t| t == bos)
            .ok_or_else(|| anyhow::anyhow!("a sequence has no <sop> ({bos})"))?
            as i64;
        let mpos = row
            .iter()
            .position(|&t| t == mark)
            .ok_or_else(|| anyhow::anyhow!("a sequence has no mask token ({mark})"))?
            as i64;
        rows.push(Prefix {
            context_length: ctx,
            mask_position: mpos,
        });
        ctxs.push(ctx);
    }
    Ok((batch(&rows, s, input_ids.device()), ctxs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's worked example: a prompt of 54 tokens, `[gMASK]` at 54, `<sop>` at 55.
    #[test]
    fn the_reference_example() {
        let c = Prefix::new(55, 54);
        let (pos, block) = c.sequence(60);
        assert_eq!(&pos[..56], &(0..55).chain([54]).collect::<Vec<i64>>()[..]);
        assert_eq!(&pos[55..], &[54; 5]);
        assert_eq!(&block[..55], &[0; 55]);
        assert_eq!(&block[55..], &[1, 2, 3, 4, 5]);
        assert_eq!(c.at(57), [54, 3]);
        let b = batch(&[c, Prefix::new(3, 2)], 5, Device::Cpu);
        assert_eq!(b.size(), [2, 2, 5]);
        let s = step(&[(c, 57), (Prefix::new(3, 2), 4)], Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(s.flatten(0, -1)).unwrap(),
            [54, 3, 2, 2]
        );
    }

    #[test]
    fn mask_and_positions_follow_glm() {
        let m = attention_mask(&[2], 4, Device::Cpu).view([4, 4]);
        let got: Vec<f32> = Vec::try_from(m.flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        assert_eq!(got, vec![1., 1., 0., 0.,
                             1., 1., 0., 0.,
                             1., 1., 1., 0.,
                             1., 1., 1., 1.]);
        let ids = Tensor::from_slice(&[5i64, 7, 130001, 130004, 9, 9]).view([1, 6]);
        let (pos, ctx) = positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
        assert_eq!(ctx, vec![3]);
        let p: Vec<i64> = Vec::try_from(pos.flatten(0, -1)).unwrap();
        assert_eq!(p, vec![0, 1, 2, 2, 2, 2, 0, 0, 0, 1, 2, 3]);
    }
}
