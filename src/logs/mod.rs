//! What a run records and shows, for training and evaluation alike: the metrics JSONL and
//! TensorBoard event files ([`metrics`]), the progress bar or log lines ([`progress`]).

pub mod metrics;
pub mod progress;
