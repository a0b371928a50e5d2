//! One image–report record per entry: OpenI annotations (`{"image_id", "caption"}`) and XrayGLM's
//! training list (`{"img", "prompt", "label"}`), which `prepare-data` also writes.

use std::path::{Component, Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{decode, resolve, BadKind, LoadOptions, PromptPolicy, Record, Schema};

/// An OpenI annotation: `{"image_id", "caption"}`, the film `<image_id>.<ext>`.
#[derive(Debug, Deserialize)]
struct Annotation {
    image_id: String,
    caption: String,
}

/// One record of the annotations or the training list.
pub(super) fn parse_one(
    schema: Schema,
    item: &Value,
    root: &Path,
    opts: &LoadOptions,
    drawn: Option<String>,
) -> Result<Record, (BadKind, String)> {
    match schema {
        Schema::Annotations => {
            let a: Annotation = decode(item)?;
            if a.image_id.trim().is_empty() {
                return Err((BadKind::MissingField, "empty image_id".into()));
            }
            if a.caption.trim().is_empty() {
                return Err((BadKind::EmptyLabel, "empty caption".into()));
            }
            let name = format!("{}.{}", a.image_id, opts.image_ext);
            let image = resolve(root, &name, opts.allow_outside_root)?;
            let prompt = match (&opts.prompt, drawn) {
                (_, Some(p)) => p,
                (PromptPolicy::Fixed { prompt }, None) => prompt.clone(),
                (PromptPolicy::Random { .. }, None) => unreachable!("random policy always draws"),
            };
            Ok(Record {
                index: 0,
                id: a.image_id,
                images: vec![image],
                img: vec![name],
                prompt,
                label: a.caption,
                history: Vec::new(),
            })
        }
        // The training list (conversations go through `parse_conversation`).
        _ => {
            let e: TrainEntry = decode(item)?;
            let img: Vec<String> = e.img.paths().into_iter().map(str::to_string).collect();
            if img.is_empty() || img.iter().any(|p| p.trim().is_empty()) {
                return Err((BadKind::MissingField, "empty img".into()));
            }
            if e.label.trim().is_empty() {
                return Err((BadKind::EmptyLabel, "empty label".into()));
            }
            let images = img
                .iter()
                .map(|p| resolve(root, p, opts.allow_outside_root))
                .collect::<Result<Vec<_>, _>>()?;
            let id = match e.image_id {
                Some(id) => id,
                None => images[0]
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            Ok(Record {
                index: 0,
                id,
                img,
                images,
                prompt: e.prompt,
                label: e.label,
                history: e.history,
            })
        }
    }
}

/// One entry of XrayGLM's training list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainEntry {
    pub img: Films,
    pub prompt: String,
    pub label: String,
    /// Earlier `[question, answer]` turns (conversations only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<(String, String)>,
    /// The record's id when the list names one (else the first film's file stem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

/// A training list's `img`: one path (XrayGLM's layout), or a list for a study's several views.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged, expecting = "a path or a list of paths")]
pub enum Films {
    One(String),
    Several(Vec<String>),
}

impl Films {
    fn from_paths(mut paths: Vec<String>) -> Self {
        if paths.len() == 1 {
            Films::One(paths.remove(0))
        } else {
            Films::Several(paths)
        }
    }

    pub fn paths(&self) -> Vec<&str> {
        match self {
            Films::One(p) => vec![p.as_str()],
            Films::Several(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `path` relative to `base` when it lies below it, otherwise absolute.
pub fn relative_to(path: &Path, base: &Path) -> String {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    };
    let (p, b) = (abs(path), abs(base));
    match p.strip_prefix(&b) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => p.to_string_lossy().into_owned(),
    }
}

/// Write the training list for `records`, with image paths relative to the output's folder where
/// possible. Atomic.
/// Returns how many image paths it had to write absolute (films outside the list's folder).
pub fn write_training_list(path: &Path, records: &[Record]) -> Result<usize> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let entries: Vec<TrainEntry> = records
        .iter()
        .map(|r| TrainEntry {
            img: Films::from_paths(r.images.iter().map(|p| relative_to(p, &base)).collect()),
            prompt: r.prompt.clone(),
            label: r.label.clone(),
            history: r.history.clone(),
            image_id: None,
        })
        .collect();
    let absolute = entries
        .iter()
        .flat_map(|e| e.img.paths())
        .filter(|p| Path::new(p).is_absolute())
        .count();
    let mut s = serde_json::to_string_pretty(&entries)?;
    s.push('\n');
    crate::io::write_atomic(path, s.as_bytes())?;
    Ok(absolute)
}
