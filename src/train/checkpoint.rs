//! The run folder's checkpoints: which step folders are complete, what `train.resume` resumes
//! from, saving (atomic and durable), pruning to `keep_last`, and leftovers of dead processes.
//!
//! Layout under `<train.out_dir>/<train.name>/`: `<step>/` (`lora.safetensors`,
//! `optimizer.safetensors`, `model_config.json`, `trainer_state.json`), `latest` (the step of the
//! newest checkpoint, written after its folder), `best` (the step of the best checkpoint by
//! `train.best_metric`) with `best.json` (metric, value, step), `.<step>.partial/` while a save is
//! in progress. `RUN/latest` and `RUN/best` name their checkpoints wherever a model folder is
//! taken (eval, chat, export).
//!
//! Guarantees: a run never restarts silently over existing checkpoints (a broken `latest` falls
//! back to the newest complete step folder, saying so); pruning never deletes the checkpoint
//! `latest` names nor the newest complete one; every file and folder is fsynced before and after
//! its rename, so a power loss cannot leave a renamed-but-empty checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::optim::AdamW;
use super::TrainerState;
use crate::model::visualglm::VisualGlm;

pub use crate::run::{
    best, is_complete, latest, newest_complete, pointer, pointer_error, step_folders,
    CHECKPOINT_FILES,
};

/// The run's best checkpoint so far, as `best.json` records it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BestRecord {
    pub metric: crate::config::BestMetric,
    pub value: f64,
    pub step: i64,
}

pub fn read_best(run_dir: &Path) -> Option<BestRecord> {
    let text = std::fs::read_to_string(run_dir.join("best.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Point `best` at a saved checkpoint: `best.json`, then `best` (each atomic and durable).
pub fn write_best(run_dir: &Path, record: &BestRecord) -> Result<()> {
    crate::io::write_json_atomic(&run_dir.join("best.json"), record)?;
    crate::io::write_atomic(&run_dir.join("best"), record.step.to_string().as_bytes())
}

/// The checkpoint `train.resume = "auto"` continues from: the one `latest` names, or — when
/// `latest` is missing, empty or names a folder that is gone or incomplete — the newest complete
/// step folder, with a warning. `None` only when the run folder holds no complete checkpoint.
pub fn resume_auto(run_dir: &Path) -> Result<Option<PathBuf>> {
    if let Some(dir) = latest(run_dir) {
        return Ok(Some(dir));
    }
    let said = std::fs::read_to_string(run_dir.join("latest")).ok();
    match newest_complete(run_dir) {
        Some(step) => {
            let why = match said.as_deref().map(str::trim) {
                None => "there is no `latest`".to_string(),
                Some("") => "`latest` is empty".to_string(),
                Some(s) => format!("`latest` names {s:?}, which is not a complete checkpoint"),
            };
            let dir = run_dir.join(step.to_string());
            crate::errln!(
                "warning: {}: {why}; resuming from the newest complete checkpoint {}",
                run_dir.display(),
                dir.display()
            );
            Ok(Some(dir))
        }
        None if said.is_some() || !step_folders(run_dir).is_empty() => bail!(
            "{}: `latest` or step folders are there but no complete checkpoint (every step folder \
             lacks one of {}); refusing to start over in it. Resume from a checkpoint with \
             --resume DIR, or start a new run with another train.name (or move this folder away)",
            run_dir.display(),
            CHECKPOINT_FILES.join(", ")
        ),
        None => Ok(None),
    }
}

/// The checkpoint for `train.resume` (`auto`, `never` or a folder). Refuses, before anything is
/// written, to start a fresh run in a folder that already holds checkpoints.
pub fn resume_from(run_dir: &Path, resume: &crate::config::Resume) -> Result<Option<PathBuf>> {
    use crate::config::Resume;
    match resume {
        Resume::Auto => resume_auto(run_dir),
        Resume::Never => {
            if run_dir.join("latest").exists() || !step_folders(run_dir).is_empty() {
                bail!(
                    "{} already holds checkpoints; use train.resume = \"auto\" or another train.name",
                    run_dir.display()
                );
            }
            Ok(None)
        }
        Resume::From(path) => {
            let dir = crate::weights::source::resolve_run(path);
            if !is_complete(&dir) {
                bail!(
                    "train.resume {}: not a complete checkpoint (needs {})",
                    path.display(),
                    CHECKPOINT_FILES.join(", ")
                );
            }
            Ok(Some(dir))
        }
    }
}

/// Remove what dead processes left in the run folder (at the start of a run, before anything is
/// written): `.<step>.partial/` folders, `*.safetensors.tmp` files, and the `.<name>.<pid>.tmp`
/// files of processes no longer running. Returns how many were removed.
pub fn remove_stale(run_dir: &Path) -> usize {
    let mut removed = crate::io::remove_dead_leftovers(run_dir);
    let mut dirs = vec![run_dir.to_path_buf()];
    dirs.extend(
        step_folders(run_dir)
            .iter()
            .map(|s| run_dir.join(s.to_string())),
    );
    for d in dirs {
        for e in std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let gone = if name.starts_with('.') && name.ends_with(".partial") && path.is_dir() {
                std::fs::remove_dir_all(&path).is_ok()
            } else if name.ends_with(".safetensors.tmp") && path.is_file() {
                std::fs::remove_file(&path).is_ok()
            } else {
                false
            };
            removed += gone as usize;
        }
    }
    removed
}

/// Save a checkpoint: files into `.<step>.partial/` (each synced), the folder synced and renamed
/// to `<step>/`, the run folder synced, then `latest`, then pruning to `keep` checkpoints.
pub fn save(
    run_dir: &Path,
    model: &VisualGlm,
    opt: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<()> {
    let dir = run_dir.join(state.step.to_string());
    let tmp = run_dir.join(format!(".{}.partial", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let lora = model.lora.variables();
    let mut names: Vec<&String> = lora.keys().collect();
    names.sort();
    let list: Vec<(String, &Tensor)> = names.iter().map(|n| ((*n).clone(), &lora[*n])).collect();
    crate::weights::st::write(
        &tmp.join("lora.safetensors"),
        &list,
        &[("format", "xrayglm-lora".into())],
    )?;
    // Fault injection for the tests of a rank killed mid-save: the save waits here, its adapters
    // written and the rest not, for XRAYGLM_FAULT_SAVE_PAUSE_MS milliseconds.
    if let Some(ms) = std::env::var("XRAYGLM_FAULT_SAVE_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let ost: Vec<(String, &Tensor)> = opt.state_tensors();
    crate::weights::st::write(&tmp.join("optimizer.safetensors"), &ost, &[])?;
    let mut sat = model.cfg.to_sat();
    sat.qkv_layout = crate::model::config::QkvLayout::Interleaved;
    crate::io::write_json_atomic(&tmp.join("model_config.json"), &sat)?;
    let base = if Path::new(&state.base_model).is_absolute() {
        state.base_model.clone()
    } else {
        format!("../{}", state.base_model)
    };
    crate::io::write_json_atomic(
        &tmp.join("trainer_state.json"),
        &TrainerState {
            base_model: base,
            ..state.clone()
        },
    )?;
    crate::io::sync_dir(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    crate::io::sync_dir(run_dir)?;
    crate::io::write_atomic(&run_dir.join("latest"), state.step.to_string().as_bytes())?;
    prune(run_dir, keep, state.step);
    Ok(())
}

/// Keep the newest `keep` step folders (at least one). Never deleted: the folder `latest` names
/// (`current`), the newest complete one and the one `best` names, whatever their numbers.
pub fn prune(run_dir: &Path, keep: usize, current: i64) {
    let steps = step_folders(run_dir);
    let keep = keep.max(1);
    let best_step = std::fs::read_to_string(run_dir.join("best"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let protected = [Some(current), newest_complete(run_dir), best_step];
    let mut excess = steps.len().saturating_sub(keep);
    for s in steps {
        if excess == 0 {
            break;
        }
        if protected.contains(&Some(s)) {
            continue;
        }
        if std::fs::remove_dir_all(run_dir.join(s.to_string())).is_ok() {
            excess -= 1;
        }
    }
}
