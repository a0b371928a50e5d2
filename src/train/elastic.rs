//! A run's global batch, fixed across world sizes: the samples of one optimizer step over every
//! rank and micro-batch. Accumulation per rank is derived from it and the number of ranks, so a
//! checkpoint written by N ranks resumes on M (M dividing the global batch into whole
//! micro-batches) on the same trajectory: global batch k is the same samples for every world size
//! (`data::batch`), each micro-batch's random streams are keyed by its place in the global batch
//! (`Trainer::micro_seed`), and the loader's position is carried over in global batches.
//!
//! The global batch is `train.global_batch_size`, else the checkpoint's when resuming, else
//! `ranks · loader.batch_size · train.grad_accum` (what every run before the key meant). A resume
//! never changes it: the recipe would change under the run.

use anyhow::{bail, Result};

use super::TrainerState;
use crate::config::Config;
use crate::data::batch::LoaderState;

/// How a step's samples are split: `global = world · micro · accum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalBatch {
    pub global: usize,
    pub world: usize,
    /// Micro-batch size per rank (`loader.batch_size`).
    pub micro: usize,
    /// Micro-batches each rank accumulates per step.
    pub accum: usize,
}

impl std::fmt::Display for GlobalBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} = {} rank(s) × micro-batch {} × accumulation {}",
            self.global, self.world, self.micro, self.accum
        )
    }
}

/// The global batch a checkpoint was trained with, when it says (checkpoints record the world
/// size and accumulation that wrote them).
pub fn saved_global_batch(saved: &TrainerState) -> Option<usize> {
    (saved.global_batch > 0).then_some(saved.global_batch)
}

/// This run's split of the global batch over `world` ranks; `saved` is the state being resumed.
/// A global batch that `world · loader.batch_size` does not divide is refused, naming the
/// numbers and the nearest world sizes and global batches that work.
pub fn resolve(cfg: &Config, world: usize, saved: Option<&TrainerState>) -> Result<GlobalBatch> {
    let (tc, micro) = (&cfg.train, cfg.loader.batch_size);
    let from_checkpoint = saved.and_then(saved_global_batch);
    let (global, source) = match (tc.global_batch_size, from_checkpoint) {
        (0, Some(g)) => (g, "the checkpoint's global batch"),
        (0, None) => (
            world * micro * tc.grad_accum as usize,
            "the global batch (ranks × loader.batch_size × train.grad_accum)",
        ),
        (g, Some(s)) if g != s => bail!(
            "train.global_batch_size = {g}, but the checkpoint being resumed was trained with a \
             global batch of {s}: a run keeps its global batch. Set train.global_batch_size = {s} \
             (or 0) to continue it, or start a new run from the checkpoint with train.init_from"
        ),
        (g, _) => (g, "train.global_batch_size"),
    };
    let per_round = world * micro;
    if global == 0 || !global.is_multiple_of(per_round) {
        let worlds: Vec<String> = (1..=global / micro.max(1))
            .filter(|w| global.is_multiple_of(w * micro))
            .map(|w| w.to_string())
            .collect();
        let below = global / per_round * per_round;
        let above = below + per_round;
        let fits = if below > 0 {
            format!("{below} or {above}")
        } else {
            above.to_string()
        };
        bail!(
            "{source} {global} cannot be split over {world} rank(s) × loader.batch_size {micro}: \
             it must be a multiple of {per_round}. World sizes that divide it: {}; global batch \
             sizes that fit {world} rank(s): {fits}",
            if worlds.is_empty() {
                format!("none (it is not a multiple of loader.batch_size {micro})")
            } else {
                worlds.join(", ")
            }
        );
    }
    let accum = global / per_round;
    Ok(GlobalBatch {
        global,
        world,
        micro,
        accum,
    })
}

/// Where this run's loader starts: the saved position, moved from the saving run's micro-batches
/// per rank to this run's (a checkpoint sits between steps, so it is a whole number of global
/// batches into its epoch).
pub fn loader_position(saved: &TrainerState, batch: &GlobalBatch) -> Result<LoaderState> {
    let old = saved.grad_accum;
    if old == 0 || old == batch.accum {
        return Ok(saved.loader);
    }
    if !saved.loader.offset.is_multiple_of(old) {
        bail!(
            "the checkpoint at step {} is {} micro-batches into epoch {}, not a whole number of \
             its steps of {old}: it cannot be resumed with another accumulation",
            saved.step,
            saved.loader.offset,
            saved.loader.epoch
        );
    }
    Ok(LoaderState {
        epoch: saved.loader.epoch,
        offset: saved.loader.offset / old * batch.accum,
    })
}

/// What the start line says when the world size changed since the checkpoint.
pub fn change_note(saved: &TrainerState, batch: &GlobalBatch) -> Option<String> {
    (saved.world_size > 0 && saved.world_size != batch.world).then(|| {
        format!(
            "resuming on {} rank(s) a run saved by {}: global batch {batch} (was {} rank(s) × \
             accumulation {})",
            batch.world, saved.world_size, saved.world_size, saved.grad_accum
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(global: usize, micro: usize, accum: i64) -> Config {
        let mut c = Config::default();
        c.train.global_batch_size = global;
        c.train.grad_accum = accum;
        c.loader.batch_size = micro;
        c
    }

    fn saved(world: usize, accum: usize, global: usize, offset: usize) -> TrainerState {
        TrainerState {
            step: 3,
            opt_steps: 3,
            skipped: 0,
            loader: LoaderState { epoch: 1, offset },
            scaler: None,
            base_model: String::new(),
            last_loss: 0.0,
            world_size: world,
            grad_accum: accum,
            global_batch: global,
        }
    }

    #[test]
    fn the_global_batch_is_kept_and_accumulation_derived() {
        // Fresh: ranks × micro × grad_accum, as before the key existed.
        let b = resolve(&cfg(0, 4, 2), 2, None).unwrap();
        assert_eq!((b.global, b.accum), (16, 2));
        // Given: accumulation follows the world size.
        assert_eq!(resolve(&cfg(16, 4, 1), 1, None).unwrap().accum, 4);
        assert_eq!(resolve(&cfg(16, 4, 1), 4, None).unwrap().accum, 1);
        // Resumed: the checkpoint's global batch, whatever grad_accum says.
        let s = saved(2, 1, 8, 2);
        let b = resolve(&cfg(0, 4, 1), 1, Some(&s)).unwrap();
        assert_eq!((b.global, b.accum), (8, 2));
        let e = resolve(&cfg(16, 4, 1), 1, Some(&s))
            .unwrap_err()
            .to_string();
        assert!(e.contains("global batch of 8"), "{e}");
    }

    #[test]
    fn a_world_that_cannot_divide_it_is_refused_with_what_works() {
        let e = resolve(&cfg(24, 4, 1), 4, None).unwrap_err().to_string();
        assert!(e.contains("24") && e.contains("multiple of 16"), "{e}");
        assert!(e.contains("World sizes that divide it: 1, 2, 3, 6"), "{e}");
        assert!(e.contains("16 or 32"), "{e}");
        let e = resolve(&cfg(6, 4, 1), 1, None).unwrap_err().to_string();
        assert!(
            e.contains("none (it is not a multiple of loader.batch_size 4)"),
            "{e}"
        );
    }

    #[test]
    fn the_loader_position_moves_in_whole_global_batches() {
        let b = |world, accum| GlobalBatch {
            global: 8,
            world,
            micro: 4,
            accum,
        };
        // Two ranks, accumulation 1, two steps into epoch 1 → one rank accumulating two.
        let at = loader_position(&saved(2, 1, 8, 2), &b(1, 2)).unwrap();
        assert_eq!((at.epoch, at.offset), (1, 4));
        let back = loader_position(&saved(1, 2, 8, 4), &b(2, 1)).unwrap();
        assert_eq!((back.epoch, back.offset), (1, 2));
        assert!(loader_position(&saved(1, 2, 8, 3), &b(2, 1)).is_err());
        // A checkpoint that does not record its split keeps its position.
        assert_eq!(
            loader_position(&saved(0, 0, 0, 3), &b(2, 1))
                .unwrap()
                .offset,
            3
        );
    }
}
