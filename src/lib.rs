//! xrayglm: XrayGLM (VisualGLM-6B = EVA-CLIP ViT-g + BLIP-2 Q-Former + ChatGLM-6B, fine-tuned with
//! LoRA on OpenI-zh chest X-ray reports) reproduced in Rust on libtorch.
//!
//! The reference system is described, with sources, in `../shared/reference/VISUALGLM_SPEC.md`.

pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod infer;
pub mod io;
pub mod model;
pub mod prepare;
pub mod tokenizer;
pub mod train;
pub mod weights;
