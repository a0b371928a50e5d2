//! Dynamic loss scaling for fp16, as DeepSpeed's `DynamicLossScaler` does it (docs/reference.md
//! §5.3: `loss_scale 0` = dynamic, `initial_scale_power` 16, `loss_scale_window 400`,
//! `hysteresis 2`, `min_loss_scale 1`): an overflow skips the step and — once the hysteresis is
//! used up — halves the scale; `window` clean steps since the last overflow double it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub window: i64,
    pub min_scale: f64,
    pub hysteresis: i64,
    pub cur_hysteresis: i64,
    pub cur_iter: i64,
    pub last_overflow_iter: i64,
}

impl LossScaler {
    pub fn new(initial_scale_power: u32, window: i64, hysteresis: i64, min_scale: f64) -> Self {
        Self {
            scale: 2f64.powi(initial_scale_power as i32),
            window,
            min_scale,
            hysteresis,
            cur_hysteresis: hysteresis,
            cur_iter: 0,
            last_overflow_iter: -1,
        }
    }

    /// Record one step's outcome.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            if self.hysteresis == 1 || self.cur_hysteresis == 1 {
                self.scale = (self.scale / 2.0).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter;
        } else if (self.cur_iter - self.last_overflow_iter) % self.window == 0 {
            self.cur_hysteresis = self.hysteresis;
            self.scale *= 2.0;
        }
        self.cur_iter += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_deepspeed_dynamic_scaling() {
        let mut s = LossScaler::new(16, 3, 2, 1.0);
        s.update(true); // first overflow is absorbed by the hysteresis
        assert_eq!(s.scale, 65536.0);
        s.update(true); // second halves
        assert_eq!(s.scale, 32768.0);
        // (cur_iter − last_overflow) % window == 0 after 3 clean iterations doubles it.
        s.update(false);
        s.update(false);
        assert_eq!(s.scale, 32768.0);
        s.update(false);
        assert_eq!(s.scale, 65536.0);
        let mut low = LossScaler::new(0, 400, 1, 1.0);
        low.update(true);
        assert_eq!(low.scale, 1.0, "never below min_scale");
    }
}
