//! Image–report records: the two OpenI-zh JSON schemas, validation, and the training-list writer.
//!
//! Reference: docs/reference.md §8. The committed `openi-zh.json` is
//! `{"annotations": [{"image_id", "caption"}]}`; XrayGLM's `FewShotDataset` reads the list
//! `[{"img", "prompt", "label"}]` that `build_ch_prompt.py` (fixed prompt) or
//! `build_ch_prompt-random.py` (one of 6 prompts, unseeded `random.choice`) makes from it (§8.5).
//! Here the random variant takes a seed, and `random.seed(seed)` + `random.choice` in Python picks
//! the same prompts.
//!
//! Conversations come in the layouts users already have: LLaVA's
//! `[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]` and ShareGPT /
//! LLaMA-Factory's `[{"messages": [{"role": "user"|"assistant"|"system", "content"}], "images":
//! [..]}]`, the image marked by `<image>` in a user turn. A conversation becomes one record per
//! assistant turn (its earlier turns as `history`, in VisualGLM's `问：…\n答：…\n` template) —
//! ChatGLM-6B's prefix is bidirectional, so an answer inside the prefix cannot be a target — or,
//! with `data.conversation_turns = "last"`, only the last one (XrayGLM's single-turn training).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rng::PyRandom;

mod conversation;
mod images;
mod list;
mod pairs;
mod study;

use conversation::parse_conversation;
pub use conversation::MIN_TOKENS_PER_TURN;
pub use images::check_image;
use images::check_images;
use list::parse_one;
pub use list::{relative_to, write_training_list, Films, TrainEntry};
pub use pairs::{load_pairs, LoadedPairs, Pair};
pub use study::{group_study_views, study_of, StudyCounts, MAX_VIEWS_PER_STUDY};

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
    /// `[{"img", "prompt", "label"[, "history"]}]` (XrayGLM's training list; `history`: earlier
    /// `[question, answer]` pairs, written for conversations).
    TrainingList,
    /// `[{"id", "image", "conversations": [{"from", "value"}]}]` (LLaVA).
    Llava,
    /// `[{"messages": [{"role", "content"}], "images": [..]}]` (ShareGPT / LLaMA-Factory).
    ShareGpt,
}

/// Which assistant turns of a conversation are training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConversationTurns {
    /// Every one (one record per turn, the earlier turns as its history).
    #[default]
    Every,
    /// Only the last (XrayGLM trains on single answers).
    Last,
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
    /// `image_id` (a study's report number with `data.group_views`), or for a training list the
    /// image file stem.
    pub id: String,
    /// The image paths as the file writes them (one per film, in order).
    pub img: Vec<String>,
    /// The resolved image paths (at least one; several: the views of one study, in order).
    pub images: Vec<PathBuf>,
    pub prompt: String,
    pub label: String,
    /// Earlier turns of a conversation: `(question, answer)` pairs before `prompt`.
    pub history: Vec<(String, String)>,
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
    /// An image id that `data.group_views` cannot place in a study (not `<report>_<k>`).
    NotAStudy,
    /// A field that must be a list (a conversation's turns) is something else.
    NotAList,
    /// A conversation turn whose role is neither the user's nor the assistant's (nor system).
    UnknownRole,
    /// An `<image>` marker in an answer (films go with questions).
    MarkerInAnswer,
    /// A conversation with more earlier turns than `sample.max_source_length` can ever hold.
    HistoryTooLong,
    /// A preference pair whose chosen and rejected answers are the same.
    IdenticalPair,
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
    /// Conversations: every assistant turn a target, or the last only.
    #[serde(default)]
    pub conversation_turns: ConversationTurns,
    /// Annotations: one record per study — the films `<report>_<k>` of one report, in `k`
    /// order, with one target report — instead of one per film.
    #[serde(default)]
    pub group_views: bool,
    /// Conversations: the most earlier turns a sample can have and still fit the prompt (set from
    /// `sample.max_source_length`); a conversation with more is refused before its samples are
    /// built. `None`: no limit.
    #[serde(default)]
    pub max_history_turns: Option<usize>,
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
            conversation_turns: ConversationTurns::default(),
            group_views: false,
            max_history_turns: None,
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
    /// Annotations named `<report>_<k>` (OpenI): the file's studies by number of views (counted
    /// before image checks).
    pub studies: Option<StudyCounts>,
    /// One record per study (`group_views`).
    pub grouped: bool,
    /// Conversation turns that make no sample: a last question without an answer, system turns
    /// after the conversation started.
    pub dropped_turns: usize,
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

/// One record's JSON as its format's struct (each format states its fields with serde). A bad
/// field is named by its path (`conversations[2].value`), with what it is and what was expected.
pub(super) fn decode<T: serde::de::DeserializeOwned>(item: &Value) -> Result<T, (BadKind, String)> {
    if !item.is_object() {
        return Err((
            BadKind::NotAnObject,
            format!("expected an object, found {}", describe(item)),
        ));
    }
    serde_path_to_error::deserialize(item).map_err(|e| field_error(item, &e))
}

/// The kind and message of a field that does not decode, from serde's wording ("missing field
/// `x`", "invalid type: …, expected …", or a container's own expectation).
fn field_error(
    item: &Value,
    e: &serde_path_to_error::Error<serde_json::Error>,
) -> (BadKind, String) {
    use serde_path_to_error::Segment;
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    if let Some(rest) = inner.strip_prefix("missing field `") {
        let name = rest.trim_end_matches('`');
        let full = match path.as_str() {
            "." => name.to_string(),
            p => format!("{p}.{name}"),
        };
        return (BadKind::MissingField, format!("missing field \"{full}\""));
    }
    let expected = inner
        .rsplit_once(", expected ")
        .map_or(inner.as_str(), |(_, x)| x)
        .replace("a tuple of size 2", "a [question, answer] pair")
        .replace("a sequence", "a list");
    let mut at = Some(item);
    for seg in e.path().iter() {
        at = at.and_then(|v| match seg {
            Segment::Seq { index } => v.get(*index),
            Segment::Map { key } => v.get(key.as_str()),
            _ => None,
        });
    }
    let found = at.map_or("something else", describe);
    let kind = if expected.contains("string") || expected.contains("path") {
        BadKind::NotAString
    } else if expected.contains("list") || expected.contains("pair") {
        BadKind::NotAList
    } else {
        BadKind::NotAnObject
    };
    (
        kind,
        format!("field \"{path}\" is {found}, expected {expected}"),
    )
}

/// Read and parse a JSON file; a syntax error names the file, line and column.
pub fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::io::read_bytes_capped(path, crate::io::MAX_DATA_BYTES)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e:#}", path.display()))?;
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
                 (or allow paths outside it: data.allow_outside_root / --allow_outside_root)",
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
                     (allow it with data.allow_outside_root / --allow_outside_root)",
                    root.display()
                ),
            ));
        }
    }
    let path = root.join(pb);
    // A symbolic link inside the root may still lead out of it.
    if !allow_outside {
        if let (Ok(real), Ok(real_root)) =
            (std::fs::canonicalize(&path), std::fs::canonicalize(root))
        {
            if !real.starts_with(&real_root) {
                return Err((
                    BadKind::OutsideRoot,
                    format!(
                        "image path {p:?} is a link to {}, outside the image root {} \
                         (allow it with data.allow_outside_root / --allow_outside_root)",
                        real.display(),
                        root.display()
                    ),
                ));
            }
        }
    }
    Ok(path)
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
    let (schema, items) = schema_of(&value, &file)?;
    let mut parsed = parse_items(schema, items, &file, &root, opts);
    let studies = group_studies(&mut parsed, schema, &file, opts);
    let Parsed {
        mut records,
        mut bad,
        dropped_turns,
    } = parsed;
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
            bail!("{first}{more}; use --skip_bad to skip bad records");
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
        studies,
        grouped: opts.group_views && schema == Schema::Annotations,
        dropped_turns,
    })
}

/// The layout of a records file and its entries.
fn schema_of<'v>(value: &'v Value, file: &str) -> Result<(Schema, &'v [Value])> {
    Ok(match value {
        Value::Array(items) => {
            let first = items.iter().find_map(Value::as_object);
            let has = |k: &str| first.is_some_and(|o| o.contains_key(k));
            let schema = if has("conversations") {
                Schema::Llava
            } else if has("messages") {
                Schema::ShareGpt
            } else {
                Schema::TrainingList
            };
            (schema, items)
        }
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
    })
}

/// The records of a file's entries before the image checks.
struct Parsed {
    records: Vec<Record>,
    bad: Vec<BadRecord>,
    dropped_turns: usize,
}

/// Every entry parsed in file order: its records, or why it is bad (a duplicate included).
fn parse_items(
    schema: Schema,
    items: &[Value],
    file: &str,
    root: &Path,
    opts: &LoadOptions,
) -> Parsed {
    let mut rng = match &opts.prompt {
        PromptPolicy::Random { seed } => Some(PyRandom::new(*seed)),
        PromptPolicy::Fixed { .. } => None,
    };
    let mut out = Parsed {
        records: Vec::new(),
        bad: Vec::new(),
        dropped_turns: 0,
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        // The random prompt is drawn for every record in file order, bad ones included, so that
        // skipping a record never changes the prompts of the others.
        let drawn = rng.as_mut().map(|r| r.choice(&RANDOM_PROMPTS).to_string());
        let id_hint = item
            .get(match schema {
                Schema::Annotations => "image_id",
                Schema::TrainingList => "img",
                Schema::Llava | Schema::ShareGpt => "id",
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
        let parsed = match schema {
            Schema::Llava | Schema::ShareGpt => parse_conversation(schema, item, index, root, opts)
                .map(|(r, dropped)| {
                    out.dropped_turns += dropped;
                    r
                }),
            _ => parse_one(schema, item, root, opts, drawn).map(|r| vec![r]),
        };
        let recs = match parsed.map_err(|(k, w)| fail(k, w)) {
            Ok(r) => r,
            Err(b) => {
                out.bad.push(b);
                continue;
            }
        };
        let key = |rec: &Record| match schema {
            Schema::Annotations => rec.id.clone(),
            _ => format!(
                "{:?}\u{0}{}\u{0}{}\u{0}{:?}",
                rec.img, rec.prompt, rec.label, rec.history
            ),
        };
        if let Some(&first) = recs.first().and_then(|r| seen.get(&key(r))) {
            let what = match schema {
                Schema::Annotations => format!("duplicate image_id, first seen at record {first}"),
                _ => format!(
                    "duplicate of record {first} (same image, question, answer and history)"
                ),
            };
            out.bad.push(fail(BadKind::DuplicateId, what));
            continue;
        }
        for rec in recs {
            seen.insert(key(&rec), index);
            out.records.push(Record { index, ..rec });
        }
    }
    out
}

/// OpenI annotations named `<report>_<k>`: the counts of views per study, and with
/// `group_views` one record per study (films that name no study become bad records).
fn group_studies(
    p: &mut Parsed,
    schema: Schema,
    file: &str,
    opts: &LoadOptions,
) -> Option<StudyCounts> {
    if schema != Schema::Annotations {
        return None;
    }
    if !opts.group_views {
        let all = p.records.iter().all(|r| study_of(&r.id).is_some());
        return all.then(|| group_study_views(p.records.clone()).1);
    }
    let (by_study, counts, ungroupable) = group_study_views(std::mem::take(&mut p.records));
    p.records = by_study;
    p.bad
        .extend(ungroupable.into_iter().map(|(r, why)| BadRecord {
            index: r.index,
            id: Some(r.id.clone()),
            kind: BadKind::NotAStudy,
            message: format!("{file}: record {} (image_id {}): {why}", r.index, r.id),
        }));
    Some(counts)
}

fn id_label(schema: Schema) -> &'static str {
    match schema {
        Schema::Annotations => "image_id ",
        Schema::TrainingList => "img ",
        Schema::Llava | Schema::ShareGpt => "id ",
    }
}
