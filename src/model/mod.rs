//! The model: VisualGLM-6B (EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B) with XrayGLM's LoRA.

pub mod chatglm;
mod checkpointing;
pub mod config;
pub mod flops;
pub mod kernels;
pub mod kv_cache;
pub mod lora;
pub mod nf4;
pub mod nn;
pub mod positions;
pub mod qformer;
mod rotary;
pub mod visualglm;
pub mod vit;
