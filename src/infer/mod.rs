//! Inference: sampling, KV-cached generation, chat prompts and sessions, the CLI chat and the web
//! demo. Shares the model code with training.

pub mod chat;
pub mod cli;
pub mod engine;
pub mod findings;
pub mod generate;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod ops;
pub mod sampling;
pub mod server;
pub mod structured;
pub mod web;
