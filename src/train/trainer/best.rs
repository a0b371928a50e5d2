//! The run's checkpoint policy: a save at each `train.save_interval` (rank 0 writes it), judged by
//! `train.best_metric` — the held-out loss, or a metric of reports generated on held-out films —
//! and made the run's `best` when better; `train.early_stop_patience` saves in a row without a
//! better value end the run.

use anyhow::{bail, Result};

use super::Trainer;
use crate::train::checkpoint;

impl Trainer<'_> {
    /// The `best_metric` of the current step (evaluated now when it was not yet).
    pub(super) fn best_value(&mut self) -> Result<Option<f64>> {
        use crate::config::BestMetric;
        let metric = self.cfg.train.best_metric;
        let step = self.state.step;
        if metric == BestMetric::None {
            return Ok(None);
        }
        if metric == BestMetric::ValLoss {
            if self.val_batches.is_empty() {
                bail!("train.best_metric = \"val_loss\" needs held-out films: set train.val_fraction > 0");
            }
            return Ok(Some(match (self.val_step == step, self.last_val) {
                (true, Some(v)) => v,
                _ => self.validate()?,
            }));
        }
        let r = match &self.last_gen {
            Some((s, r)) if *s == step => r.clone(),
            _ => self.generate()?,
        };
        Ok(Some(match metric {
            BestMetric::CeF1 => r.ce.as_ref().map_or(0.0, |c| c.micro.f1),
            BestMetric::Bleu4 => r.bleu_4,
            BestMetric::RougeL => r.rouge_l,
            // CIDEr-D (None and ValLoss returned above).
            _ => r.cider_d,
        }))
    }

    /// Whether `train.early_stop_patience` saves in a row did not beat the best.
    pub(super) fn early_stop(&self) -> bool {
        let p = self.cfg.train.early_stop_patience;
        let stop = p > 0 && self.misses >= p;
        if stop {
            crate::errln!(
                "early stop at step {}: {} saves without a better {} (best {:?})",
                self.state.step,
                self.misses,
                self.cfg.train.best_metric.name(),
                self.best.map(|b| (b.step, b.value))
            );
        }
        stop
    }

    /// A checkpoint of the current step (rank 0 writes it), judged by `train.best_metric`
    /// (every rank evaluates it: it may take collectives) and made the run's `best` when better.
    pub(super) fn save(&mut self) -> Result<()> {
        let value = self.best_value()?;
        let (step, root) = (self.state.step, self.comm.rank() == 0);
        if root {
            checkpoint::save(
                &self.run_dir,
                &self.chat.model,
                &self.opt,
                &self.state,
                self.cfg.train.keep_last,
            )?;
        }
        self.saved_step = step;
        if let Some(value) = value {
            let metric = self.cfg.train.best_metric;
            let better = match self.best {
                None => !value.is_nan(),
                Some(b) if metric.higher_is_better() => value > b.value,
                Some(b) => value < b.value,
            };
            if better {
                let record = checkpoint::BestRecord {
                    metric,
                    value,
                    step,
                };
                if root {
                    checkpoint::write_best(&self.run_dir, &record)?;
                }
                self.best = Some(record);
                self.misses = 0;
            } else {
                self.misses += 1;
            }
        }
        Ok(())
    }
}
