//! What a run shows while it works: a progress bar on a terminal, plain log lines where no
//! terminal is (mpirun, Slurm, `nohup … > log`), nothing on ranks other than 0.

use std::io::IsTerminal;
use std::time::Instant;

/// How progress is shown.
pub enum Progress {
    /// A bar redrawn at every step (stderr is a terminal and `progress = true`).
    Bar(indicatif::ProgressBar),
    /// One line per log interval on stderr.
    Lines { start: Instant, first: u64 },
    /// Nothing (ranks other than 0).
    Quiet,
}

impl Progress {
    /// The display for a job of `total` units that starts at `position`.
    pub fn new(bar_wanted: bool, root: bool, total: u64, position: u64, template: &str) -> Self {
        if !root {
            return Self::Quiet;
        }
        if bar_wanted && std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                b.set_style(style);
            }
            b.set_position(position);
            return Self::Bar(b);
        }
        Self::Lines {
            start: Instant::now(),
            first: position,
        }
    }

    /// Move the bar (no output in the other modes).
    pub fn set(&self, position: u64, message: impl FnOnce() -> String) {
        if let Self::Bar(b) = self {
            b.set_position(position);
            b.set_message(message());
        }
    }

    /// A plain line (only where there is no bar): `what` followed by the ETA from the rate so far.
    pub fn line(&self, position: u64, total: u64, what: impl FnOnce() -> String) {
        if let Self::Lines { start, first } = self {
            let done = position.saturating_sub(*first) as f64;
            let left = total.saturating_sub(position) as f64;
            let eta = if done > 0.0 {
                format!(" eta {}", hms(start.elapsed().as_secs_f64() / done * left))
            } else {
                String::new()
            };
            crate::errln!("{}{eta}", what());
        }
    }

    pub fn finish(&self) {
        if let Self::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// Seconds as `h:mm:ss`.
pub fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
