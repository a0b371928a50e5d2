//! Image–report records: the two OpenI-zh JSON schemas, validation, and the training-list writer.
//!
//! Reference: VISUALGLM_SPEC.md §8. The committed `openi-zh.json` is
//! `{"annotations": [{"image_id", "caption"}]}`; XrayGLM's `FewShotDataset` reads the list
//! `[{"img", "prompt", "label"}]` that `build_ch_prompt.py` (fixed prompt) or
//! `build_ch_prompt-random.py` (one of 6 prompts, unseeded `random.choice`) makes from it (§8.5).
//! Here the random variant takes a seed, and `random.seed(seed)` + `random.choice` in Python picks
//! the same prompts.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::image::{decode_rgb, SixteenBit};
use super::rng::PyRandom;

/// The fixed prompt of `build_ch_prompt.py`.
pub const FIXED_PROMPT: &str = "通过这张胸部X光影像可以诊断出什么？";

/// The 6 prompts of `build_ch_prompt-random.py`, in its order.
pub const RANDOM_PROMPTS: [&str; 6] = [
    "通过这张胸部X光影像可以诊断出什么？",
    "这张图片的背景里有什么内容？",
    "详细描述一下这张图片",
    "看看这张图片并描述你注意到的内容",
    "请提供图片的详细描述",
    "你能为我描述一下这张图片的内容吗？",
];

/// How a prompt is attached to an `{"image_id", "caption"}` annotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PromptPolicy {
    /// Every record gets the same prompt.
    Fixed { prompt: String },
    /// `random.seed(seed)`, then `random.choice(RANDOM_PROMPTS)` per record in file order.
    Random { seed: i64 },
}

impl Default for PromptPolicy {
    fn default() -> Self {
        PromptPolicy::Fixed {
            prompt: FIXED_PROMPT.to_string(),
        }
    }
}

/// Which JSON layout a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schema {
    /// `{"annotations": [{"image_id", "caption"}]}` (OpenI-zh as committed).
    Annotations,
    /// `[{"img", "prompt", "label"}]` (XrayGLM's training list).
    TrainingList,
}

/// How hard image files are checked while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImageCheck {
    /// The file exists and is not empty.
    Exists,
    /// The file decodes as a PNG or JPEG (default: a corrupt image fails before training starts).
    #[default]
    Decode,
}

/// One usable record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Position in the source file.
    pub index: usize,
    /// `image_id`, or for a training list the image file stem.
    pub id: String,
    /// The image path as the training list writes it.
    pub img: String,
    /// The resolved image path.
    pub image: PathBuf,
    pub prompt: String,
    pub label: String,
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    NotAnObject,
    MissingField,
    NotAString,
    EmptyLabel,
    DuplicateId,
    MissingImage,
    EmptyImage,
    CorruptImage,
    /// An image that would pass the decoding memory limit (`XRAYGLM_MAX_IMAGE_MIB`).
    TooLarge,
    /// An image path outside the image root (`../x`, an absolute path) without the flag allowing it.
    OutsideRoot,
}

/// A record that was rejected, with a message naming the file and the record.
#[derive(Debug, Clone, Serialize)]
pub struct BadRecord {
    pub index: usize,
    pub id: Option<String>,
    pub kind: BadKind,
    pub message: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    /// Folder that relative image paths (and `<image_id>.png` names) resolve against. Default: the
    /// JSON file's folder.
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Prompt policy for the annotations schema (ignored for training lists).
    #[serde(default)]
    pub prompt: PromptPolicy,
    /// File extension of `<image_id>` images in the annotations schema.
    #[serde(default = "default_ext")]
    pub image_ext: String,
    #[serde(default)]
    pub check_images: ImageCheck,
    /// Skip and count bad records instead of failing.
    #[serde(default)]
    pub skip_bad: bool,
    /// Threads for image checks (0 = all cores).
    #[serde(default)]
    pub threads: usize,
    /// Accept image paths outside the image root (absolute, or climbing out with `..`).
    #[serde(default)]
    pub allow_outside_root: bool,
}

fn default_ext() -> String {
    "png".into()
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            image_root: None,
            prompt: PromptPolicy::default(),
            image_ext: default_ext(),
            check_images: ImageCheck::default(),
            skip_bad: false,
            allow_outside_root: false,
            threads: 0,
        }
    }
}

/// The result of loading a records file.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    pub schema: Schema,
    pub total: usize,
    pub records: Vec<Record>,
    pub bad: Vec<BadRecord>,
}

impl Loaded {
    /// Counts of bad records by kind.
    pub fn bad_counts(&self) -> Vec<(BadKind, usize)> {
        let mut m: Vec<(BadKind, usize)> = Vec::new();
        for b in &self.bad {
            match m.iter_mut().find(|(k, _)| *k == b.kind) {
                Some((_, n)) => *n += 1,
                None => m.push((b.kind, 1)),
            }
        }
        m
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Read and parse a JSON file; a syntax error names the file, line and column.
pub fn read_json(path: &Path) -> Result<Value> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text: {e}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{}: malformed JSON at line {}, column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// The image file a record names: relative to the root, and — unless `allow_outside` — kept
/// inside it (no absolute path, no `..` that climbs above the root).
fn resolve(root: &Path, p: &str, allow_outside: bool) -> Result<PathBuf, (BadKind, String)> {
    use std::path::Component;
    let pb = PathBuf::from(p);
    if pb.is_absolute() {
        if allow_outside {
            return Ok(pb);
        }
        return Err((
            BadKind::OutsideRoot,
            format!(
                "image path {p:?} is absolute; give it relative to the image root {} \
                 (or allow paths outside it: data.allow_outside_root / --allow-outside-root)",
                root.display()
            ),
        ));
    }
    let mut depth = 0i64;
    for c in pb.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 && !allow_outside {
            return Err((
                BadKind::OutsideRoot,
                format!(
                    "image path {p:?} leaves the image root {} \
                     (allow it with data.allow_outside_root / --allow-outside-root)",
                    root.display()
                ),
            ));
        }
    }
    Ok(root.join(pb))
}

/// Load a records file in either schema, validating every record.
///
/// With `skip_bad = false` the first bad record is an error; otherwise bad records are counted and
/// left out. A file that cannot be parsed, or has neither schema, is always an error.
pub fn load_records(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let value = read_json(path)?;
    let file = path.display().to_string();
    let root = match &opts.image_root {
        Some(r) => r.clone(),
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let (schema, items) = match &value {
        Value::Array(items) => (Schema::TrainingList, items),
        Value::Object(map) => match map.get("annotations") {
            Some(Value::Array(items)) => (Schema::Annotations, items),
            Some(other) => bail!("{file}: wrong schema: \"annotations\" is {}, expected a list", describe(other)),
            None => bail!(
                "{file}: wrong schema: expected a list of {{\"img\", \"prompt\", \"label\"}} or \
                 {{\"annotations\": [{{\"image_id\", \"caption\"}}]}}, found an object with keys {:?}",
                map.keys().take(5).collect::<Vec<_>>()
            ),
        },
        other => bail!(
            "{file}: wrong schema: expected a list or an object with \"annotations\", found {}",
            describe(other)
        ),
    };
    let mut rng = match &opts.prompt {
        PromptPolicy::Random { seed } => Some(PyRandom::new(*seed)),
        PromptPolicy::Fixed { .. } => None,
    };
    let mut bad: Vec<BadRecord> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        // The random prompt is drawn for every record in file order, bad ones included, so that
        // skipping a record never changes the prompts of the others.
        let drawn = rng.as_mut().map(|r| r.choice(&RANDOM_PROMPTS).to_string());
        let id_hint = item
            .get(if schema == Schema::Annotations {
                "image_id"
            } else {
                "img"
            })
            .and_then(Value::as_str)
            .map(str::to_string);
        let fail = |kind: BadKind, what: String| BadRecord {
            index,
            id: id_hint.clone(),
            kind,
            message: match &id_hint {
                Some(id) => format!("{file}: record {index} ({}{id}): {what}", id_label(schema)),
                None => format!("{file}: record {index}: {what}"),
            },
        };
        let parsed = parse_one(schema, item, &root, opts, drawn).map_err(|(k, w)| fail(k, w));
        let rec = match parsed {
            Ok(r) => r,
            Err(b) => {
                bad.push(b);
                continue;
            }
        };
        let key = match schema {
            Schema::Annotations => rec.id.clone(),
            Schema::TrainingList => format!("{}\u{0}{}\u{0}{}", rec.img, rec.prompt, rec.label),
        };
        if let Some(&first) = seen.get(&key) {
            let what = match schema {
                Schema::Annotations => format!("duplicate image_id, first seen at record {first}"),
                Schema::TrainingList => {
                    format!("duplicate of record {first} (same img, prompt and label)")
                }
            };
            bad.push(fail(BadKind::DuplicateId, what));
            continue;
        }
        seen.insert(key, index);
        records.push(Record { index, ..rec });
    }
    // Image checks run in parallel; their failures are reported in record order.
    let image_bad = check_images(&records, opts, &file, schema);
    if !image_bad.is_empty() {
        let drop: std::collections::HashSet<usize> = image_bad.iter().map(|b| b.index).collect();
        records.retain(|r| !drop.contains(&r.index));
        bad.extend(image_bad);
    }
    bad.sort_by_key(|b| b.index);
    if !opts.skip_bad {
        if let Some(first) = bad.first() {
            let more = if bad.len() > 1 {
                format!(" (and {} more bad records)", bad.len() - 1)
            } else {
                String::new()
            };
            bail!("{first}{more}; use --skip-bad to skip bad records");
        }
    }
    if records.is_empty() {
        bail!(
            "{file}: no usable records ({} in the file, {} bad)",
            items.len(),
            bad.len()
        );
    }
    Ok(Loaded {
        file: path.to_path_buf(),
        schema,
        total: items.len(),
        records,
        bad,
    })
}

fn id_label(schema: Schema) -> &'static str {
    match schema {
        Schema::Annotations => "image_id ",
        Schema::TrainingList => "img ",
    }
}

fn get_str<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<&'a str, (BadKind, String)> {
    match obj.get(key) {
        None => Err((BadKind::MissingField, format!("missing field \"{key}\""))),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err((
            BadKind::NotAString,
            format!("field \"{key}\" is {}, expected a string", describe(v)),
        )),
    }
}

fn parse_one(
    schema: Schema,
    item: &Value,
    root: &Path,
    opts: &LoadOptions,
    drawn: Option<String>,
) -> Result<Record, (BadKind, String)> {
    let obj = item.as_object().ok_or_else(|| {
        (
            BadKind::NotAnObject,
            format!("expected an object, found {}", describe(item)),
        )
    })?;
    match schema {
        Schema::Annotations => {
            let id = get_str(obj, "image_id")?;
            if id.trim().is_empty() {
                return Err((BadKind::MissingField, "empty image_id".into()));
            }
            let caption = get_str(obj, "caption")?;
            if caption.trim().is_empty() {
                return Err((BadKind::EmptyLabel, "empty caption".into()));
            }
            let name = format!("{id}.{}", opts.image_ext);
            let image = resolve(root, &name, opts.allow_outside_root)?;
            let prompt = match (&opts.prompt, drawn) {
                (_, Some(p)) => p,
                (PromptPolicy::Fixed { prompt }, None) => prompt.clone(),
                (PromptPolicy::Random { .. }, None) => unreachable!("random policy always draws"),
            };
            Ok(Record {
                index: 0,
                id: id.to_string(),
                image,
                img: name,
                prompt,
                label: caption.to_string(),
            })
        }
        Schema::TrainingList => {
            let img = get_str(obj, "img")?;
            if img.trim().is_empty() {
                return Err((BadKind::MissingField, "empty img".into()));
            }
            let prompt = get_str(obj, "prompt")?;
            let label = get_str(obj, "label")?;
            if label.trim().is_empty() {
                return Err((BadKind::EmptyLabel, "empty label".into()));
            }
            let image = resolve(root, img, opts.allow_outside_root)?;
            let id = match obj.get("image_id").and_then(Value::as_str) {
                Some(id) => id.to_string(),
                None => image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            Ok(Record {
                index: 0,
                id,
                img: img.to_string(),
                image,
                prompt: prompt.to_string(),
                label: label.to_string(),
            })
        }
    }
}

/// Check one image file.
pub fn check_image(path: &Path, check: ImageCheck) -> Result<(), (BadKind, String)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            BadKind::MissingImage,
            format!("image {} not found: {e}", path.display()),
        )
    })?;
    if !meta.is_file() {
        return Err((
            BadKind::MissingImage,
            format!("image {} is not a file", path.display()),
        ));
    }
    if meta.len() == 0 {
        return Err((
            BadKind::EmptyImage,
            format!("image {} is empty (0 bytes)", path.display()),
        ));
    }
    if check == ImageCheck::Decode {
        let bytes = std::fs::read(path).map_err(|e| {
            (
                BadKind::MissingImage,
                format!("image {} cannot be read: {e}", path.display()),
            )
        })?;
        decode_rgb(&bytes, SixteenBit::Scale).map_err(|e| {
            if e.is::<crate::data::image::ImageTooLarge>() {
                (
                    BadKind::TooLarge,
                    format!("image {} is too large to decode: {e:#}", path.display()),
                )
            } else {
                (
                    BadKind::CorruptImage,
                    format!("image {} is corrupt: {e:#}", path.display()),
                )
            }
        })?;
    }
    Ok(())
}

fn check_images(
    records: &[Record],
    opts: &LoadOptions,
    file: &str,
    schema: Schema,
) -> Vec<BadRecord> {
    let threads = crate::data::worker_threads(opts.threads).min(records.len().max(1));
    let chunk = records.len().div_ceil(threads).max(1);
    let mut out: Vec<BadRecord> = std::thread::scope(|s| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter_map(|r| {
                            check_image(&r.image, opts.check_images)
                                .err()
                                .map(|(kind, what)| BadRecord {
                                    index: r.index,
                                    id: Some(r.id.clone()),
                                    kind,
                                    message: format!(
                                        "{file}: record {} ({}{}): {what}",
                                        r.index,
                                        id_label(schema),
                                        if schema == Schema::Annotations {
                                            &r.id
                                        } else {
                                            &r.img
                                        }
                                    ),
                                })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("image check thread panicked"))
            .collect()
    });
    out.sort_by_key(|b| b.index);
    out
}

/// One entry of XrayGLM's training list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainEntry {
    pub img: String,
    pub prompt: String,
    pub label: String,
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
            img: relative_to(&r.image, &base),
            prompt: r.prompt.clone(),
            label: r.label.clone(),
        })
        .collect();
    let absolute = entries
        .iter()
        .filter(|e| Path::new(&e.img).is_absolute())
        .count();
    let mut s = serde_json::to_string_pretty(&entries)?;
    s.push('\n');
    crate::io::write_atomic(path, s.as_bytes())?;
    Ok(absolute)
}
