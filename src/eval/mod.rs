//! Evaluation of generated reports: corpus metrics and (later) checkpoint evaluation.

pub mod metrics;
