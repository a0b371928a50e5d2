//! xrayglm: XrayGLM (VisualGLM-6B = EVA-CLIP ViT-g + BLIP-2 Q-Former + ChatGLM-6B, fine-tuned with
//! LoRA on OpenI-zh chest X-ray reports) reproduced in Rust on libtorch.
//!
//! The reference system is described, with sources, in `docs/reference.md`.

pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod infer;
pub mod io;
pub mod logs;
pub mod model;
pub mod prepare;
pub mod run;
pub mod tokenizer;
pub mod train;
pub mod weights;

/// `println!` that never panics: when stdout is closed (`xrayglm … | head`) the text is dropped
/// and the command carries on (a training run keeps training; its record is `metrics.jsonl`).
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `print!` that never panics (see [`outln!`]).
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `eprintln!` that never panics when stderr is a closed pipe (`… 2>&1 | head`).
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

/// `eprint!` that never panics (see [`errln!`]).
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($t)*);
    }};
}
