//! The run folder's layout, read by every command that takes a model folder (eval, chat, export,
//! serve) and by the trainer that writes it: `<train.out_dir>/<train.name>/` holds `<step>/`
//! folders (`lora.safetensors`, `optimizer.safetensors`, `model_config.json`,
//! `trainer_state.json`), `latest` (the step of the newest checkpoint, written after its folder)
//! and `best` (the step of the best checkpoint by `train.best_metric`, with `best.json`).
//! `RUN/latest` and `RUN/best` name their checkpoints wherever a model folder is taken.
//! Writing them is [`crate::train::checkpoint`]'s.

use std::path::{Path, PathBuf};

/// The files a step folder holds when its save finished.
pub const CHECKPOINT_FILES: [&str; 4] = [
    "lora.safetensors",
    "optimizer.safetensors",
    "model_config.json",
    "trainer_state.json",
];

/// Whether `dir` holds every file of a finished save.
pub fn is_complete(dir: &Path) -> bool {
    CHECKPOINT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Step numbers of the numbered folders in the run folder (complete or not), ascending.
pub fn step_folders(run_dir: &Path) -> Vec<i64> {
    let mut steps: Vec<i64> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .collect();
    steps.sort_unstable();
    steps
}

/// The newest step folder that holds a finished save.
pub fn newest_complete(run_dir: &Path) -> Option<i64> {
    step_folders(run_dir)
        .into_iter()
        .rev()
        .find(|s| is_complete(&run_dir.join(s.to_string())))
}

/// What `latest` says, when it names a complete step folder.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string(run_dir.join("latest")).ok()?;
    let name = s.trim();
    if name.is_empty() || name.parse::<i64>().is_err() {
        return None;
    }
    let dir = run_dir.join(name);
    is_complete(&dir).then_some(dir)
}

/// What `best` says, when it names a complete step folder.
pub fn best(run_dir: &Path) -> Option<PathBuf> {
    pointer(&run_dir.join("best"))
}

/// The checkpoint a `latest` or `best` file names (complete), for paths like `RUN/best`.
pub fn pointer(file: &Path) -> Option<PathBuf> {
    let name = file.file_name()?.to_str()?;
    if !matches!(name, "latest" | "best") || !file.is_file() {
        return None;
    }
    let step = std::fs::read_to_string(file).ok()?;
    let step = step.trim();
    step.parse::<i64>().ok()?;
    let dir = file.parent()?.join(step);
    is_complete(&dir).then_some(dir)
}

/// Why a `latest` or `best` file (`RUN/best`) does not lead to a checkpoint: it names no step, or
/// a step folder that is missing or incomplete. `None` when it leads to one, or is no such file.
pub fn pointer_error(file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?;
    if !matches!(name, "latest" | "best") || !file.is_file() {
        return None;
    }
    let said = std::fs::read_to_string(file).unwrap_or_default();
    let step = said.trim();
    if step.parse::<i64>().is_err() {
        return Some(format!(
            "the pointer {} names {step:?}, not a step",
            file.display()
        ));
    }
    let dir = file.parent()?.join(step);
    if !dir.is_dir() {
        return Some(format!(
            "the pointer {} names step {step}, but {} is missing",
            file.display(),
            dir.display()
        ));
    }
    let missing: Vec<&str> = CHECKPOINT_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the pointer {} names step {step}, but {} is not a complete checkpoint (no {})",
            file.display(),
            dir.display(),
            missing.join(", ")
        )
    })
}
