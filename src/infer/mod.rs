//! Inference: sampling, KV-cached generation, chat prompts and sessions, the CLI chat and the web
//! demo. Shares the model code with training.

pub mod generate;
pub mod sampling;
