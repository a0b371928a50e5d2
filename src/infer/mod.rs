//! Inference: sampling, KV-cached generation, chat prompts and sessions, the CLI chat and the web
//! demo. Shares the model code with training.

pub mod chat;
pub mod cli;
pub mod findings;
pub mod generate;
pub mod sampling;
pub mod web;
