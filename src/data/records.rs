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

/// The fewest tokens an earlier turn adds to a prompt: `问：Q\n答：A\n` holds two line breaks,
/// each its own token (`<n>`), whatever Q and A are.
pub const MIN_TOKENS_PER_TURN: usize = 2;

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

/// Studies by their number of views (`data.group_views`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StudyCounts {
    pub studies: usize,
    pub one_view: usize,
    pub two_views: usize,
    pub three_or_more: usize,
    /// Studies whose films carry different captions (OpenI-zh translated each film's copy of the
    /// report on its own); the first view's caption is the target.
    pub differing_captions: usize,
}

/// The most films one study may have when `data.group_views` groups them; more means the ids
/// are not per study (e.g. `synth_00001 … synth_00512`).
pub const MAX_VIEWS_PER_STUDY: usize = 16;

/// `<report>_<k>` → (report, k) for OpenI-style image ids (`k` a view number: digits without a
/// leading zero, so a zero-padded running number like `synth_00001` is not a view).
pub fn study_of(image_id: &str) -> Option<(&str, u64)> {
    let (report, k) = image_id.rsplit_once('_')?;
    if report.is_empty()
        || k.is_empty()
        || !k.bytes().all(|b| b.is_ascii_digit())
        || (k.len() > 1 && k.starts_with('0'))
    {
        return None;
    }
    Some((report, k.parse().ok()?))
}

/// Merge per-film annotation records into one record per study, the views in `k` order, the study
/// where the first of its films is in the file. A film whose id is not `<report>_<k>` comes back as an error.
pub fn group_study_views(
    records: Vec<Record>,
) -> (Vec<Record>, StudyCounts, Vec<(Record, String)>) {
    let mut order: Vec<String> = Vec::new();
    let mut by_study: HashMap<String, Vec<(u64, Record)>> = HashMap::new();
    let mut bad = Vec::new();
    for r in records {
        match study_of(&r.id) {
            Some((report, k)) => {
                let report = report.to_string();
                if !by_study.contains_key(&report) {
                    order.push(report.clone());
                }
                by_study.entry(report).or_default().push((k, r));
            }
            None => {
                let why = format!(
                    "image_id {:?} is not <report>_<k>: cannot group it into a study \
                     (data.group_views)",
                    r.id
                );
                bad.push((r, why));
            }
        }
    }
    let mut counts = StudyCounts::default();
    let mut out = Vec::with_capacity(order.len());
    for report in order {
        let mut views = by_study.remove(&report).unwrap_or_default();
        if views.len() > MAX_VIEWS_PER_STUDY {
            let n = views.len();
            for (_, r) in views {
                let why = format!(
                    "study {report:?} would have {n} films (at most {MAX_VIEWS_PER_STUDY}): the \
                     image ids are not per study (<report>_<k>, k the view number), so \
                     data.group_views cannot group them"
                );
                bad.push((r, why));
            }
            continue;
        }
        views.sort_by_key(|(k, _)| *k);
        counts.studies += 1;
        match views.len() {
            1 => counts.one_view += 1,
            2 => counts.two_views += 1,
            _ => counts.three_or_more += 1,
        }
        if views.iter().any(|(_, r)| r.label != views[0].1.label) {
            counts.differing_captions += 1;
        }
        let mut first = views[0].1.clone();
        first.index = views
            .iter()
            .map(|(_, r)| r.index)
            .min()
            .unwrap_or(first.index);
        first.id = report;
        first.img = views.iter().flat_map(|(_, r)| r.img.clone()).collect();
        first.images = views.iter().flat_map(|(_, r)| r.images.clone()).collect();
        out.push(first);
    }
    out.sort_by_key(|r| r.index);
    (out, counts, bad)
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
    let (schema, items) = match &value {
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
    };
    let mut rng = match &opts.prompt {
        PromptPolicy::Random { seed } => Some(PyRandom::new(*seed)),
        PromptPolicy::Fixed { .. } => None,
    };
    let mut bad: Vec<BadRecord> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut dropped_turns = 0;
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
            Schema::Llava | Schema::ShareGpt => {
                parse_conversation(schema, item, index, &root, opts).map(|(r, dropped)| {
                    dropped_turns += dropped;
                    r
                })
            }
            _ => parse_one(schema, item, &root, opts, drawn).map(|r| vec![r]),
        };
        let recs = match parsed.map_err(|(k, w)| fail(k, w)) {
            Ok(r) => r,
            Err(b) => {
                bad.push(b);
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
            bad.push(fail(BadKind::DuplicateId, what));
            continue;
        }
        for rec in recs {
            seen.insert(key(&rec), index);
            records.push(Record { index, ..rec });
        }
    }
    let mut studies = None;
    let grouped = opts.group_views && schema == Schema::Annotations;
    if schema == Schema::Annotations
        && !grouped
        && records.iter().all(|r| study_of(&r.id).is_some())
    {
        studies = Some(group_study_views(records.clone()).1);
    }
    if grouped {
        let (by_study, counts, ungroupable) = group_study_views(std::mem::take(&mut records));
        records = by_study;
        studies = Some(counts);
        bad.extend(ungroupable.into_iter().map(|(r, why)| BadRecord {
            index: r.index,
            id: Some(r.id.clone()),
            kind: BadKind::NotAStudy,
            message: format!("{file}: record {} (image_id {}): {why}", r.index, r.id),
        }));
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
        grouped,
        dropped_turns,
    })
}

fn id_label(schema: Schema) -> &'static str {
    match schema {
        Schema::Annotations => "image_id ",
        Schema::TrainingList => "img ",
        Schema::Llava | Schema::ShareGpt => "id ",
    }
}

/// The turns of a LLaVA or ShareGPT conversation as records: one per assistant turn (or the last
/// only), each with the turns before it as history; the films are marked by `<image>`. Also
/// returns how many turns make no sample (a last unanswered question, late system turns).
fn parse_conversation(
    schema: Schema,
    item: &Value,
    index: usize,
    root: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Record>, usize), (BadKind, String)> {
    let obj = item.as_object().ok_or_else(|| {
        (
            BadKind::NotAnObject,
            format!("expected an object, found {}", describe(item)),
        )
    })?;
    let (list_key, role_key, text_key, user, assistant) = match schema {
        Schema::Llava => ("conversations", "from", "value", "human", "gpt"),
        _ => ("messages", "role", "content", "user", "assistant"),
    };
    let turns = match obj.get(list_key) {
        Some(Value::Array(t)) => t,
        Some(v) => {
            return Err((
                BadKind::NotAList,
                format!("field \"{list_key}\" is {}, expected a list", describe(v)),
            ))
        }
        None => {
            return Err((
                BadKind::MissingField,
                format!("missing field \"{list_key}\""),
            ))
        }
    };
    let images: Vec<&str> = match schema {
        Schema::Llava => match obj.get("image") {
            None => vec![],
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(v) => {
                return Err((
                    BadKind::NotAString,
                    format!("field \"image\" is {}, expected a path", describe(v)),
                ))
            }
        },
        _ => match obj.get("images") {
            None => vec![],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => vec![s.as_str()],
            Some(v) => {
                return Err((
                    BadKind::NotAString,
                    format!(
                        "field \"images\" is {}, expected a list of paths",
                        describe(v)
                    ),
                ))
            }
        },
    };
    if images.is_empty() {
        return Err((
            BadKind::MissingField,
            "no image: every sample needs a film (\"image\" / \"images\")".into(),
        ));
    }
    let (pairs, markers, dropped) =
        question_answer_pairs(turns, role_key, text_key, user, assistant)?;
    // Each `<image>` is one film, in order (none: the films go in front, as VisualGLM's does).
    if markers > 0 && markers != images.len() {
        return Err((
            BadKind::MissingField,
            format!(
                "{markers} <image> markers for {} image(s): give one marker per film",
                images.len()
            ),
        ));
    }
    if pairs.is_empty() {
        return Err((BadKind::EmptyLabel, "no question with an answer".into()));
    }
    // Refused before any sample is built: the history of the last answer can never fit.
    if let Some(cap) = opts.max_history_turns {
        let earlier = pairs.len() - 1;
        if earlier > cap {
            return Err((
                BadKind::HistoryTooLong,
                format!(
                    "{} answers: the last has {earlier} earlier turns, and at most {cap} can ever \
                     fit sample.max_source_length (each takes at least {MIN_TOKENS_PER_TURN} \
                     tokens): split the conversation or raise sample.max_source_length",
                    pairs.len()
                ),
            ));
        }
    }
    let paths = images
        .iter()
        .map(|p| resolve(root, p, opts.allow_outside_root))
        .collect::<Result<Vec<_>, _>>()?;
    let img: Vec<String> = images.iter().map(|p| p.to_string()).collect();
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("conversation_{index}"));
    let first = match opts.conversation_turns {
        ConversationTurns::Every => 0,
        ConversationTurns::Last => pairs.len() - 1,
    };
    let records = (first..pairs.len())
        .map(|t| Record {
            index,
            id: if pairs.len() > 1 {
                format!("{id}#{t}")
            } else {
                id.clone()
            },
            img: img.clone(),
            images: paths.clone(),
            prompt: pairs[t].0.clone(),
            label: pairs[t].1.clone(),
            history: pairs[..t].to_vec(),
        })
        .collect();
    Ok((records, dropped))
}

/// A conversation's turns as (question, answer) pairs in order, with the number of `<image>`
/// markers in its questions and the turns that make no pair (a last unanswered question, system
/// turns after the start; other system turns are skipped). Consecutive questions join.
fn question_answer_pairs(
    turns: &[Value],
    role_key: &str,
    text_key: &str,
    user: &str,
    assistant: &str,
) -> Result<(Vec<(String, String)>, usize, usize), (BadKind, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut pending: Option<String> = None;
    let mut markers = 0;
    let mut late_system = 0;
    for (k, t) in turns.iter().enumerate() {
        let role = t.get(role_key).and_then(Value::as_str).unwrap_or("");
        let text = t.get(text_key).and_then(Value::as_str).ok_or_else(|| {
            (
                BadKind::NotAString,
                format!("turn {k}: \"{text_key}\" missing or not a string"),
            )
        })?;
        if role == "system" {
            late_system += usize::from(!pairs.is_empty() || pending.is_some());
            continue;
        }
        let marked = text.matches("<image>").count();
        if marked > 0 && role == assistant {
            return Err((
                BadKind::MarkerInAnswer,
                format!("turn {k}: an <image> marker in an answer: films go with the questions"),
            ));
        }
        markers += marked;
        let clean = text.replace("<image>", "").trim().to_string();
        match (role == user, role == assistant, pending.take()) {
            (true, _, None) => pending = Some(clean),
            (true, _, Some(mut p)) => {
                p.push('\n');
                p.push_str(&clean);
                pending = Some(p)
            }
            (_, true, Some(q)) => {
                if clean.is_empty() {
                    return Err((BadKind::EmptyLabel, format!("turn {k}: empty answer")));
                }
                pairs.push((q, clean))
            }
            (_, true, None) => {
                return Err((
                    BadKind::MissingField,
                    format!("turn {k}: an answer without a question before it"),
                ))
            }
            _ => {
                return Err((
                    BadKind::UnknownRole,
                    format!(
                        "turn {k}: unknown {role_key} {role:?} (expected {user:?}, {assistant:?} or \"system\")"
                    ),
                ))
            }
        }
    }
    let dropped = late_system + usize::from(pending.is_some());
    Ok((pairs, markers, dropped))
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
                images: vec![image],
                img: vec![name],
                prompt,
                label: caption.to_string(),
                history: Vec::new(),
            })
        }
        // The training list (conversations go through `parse_conversation`).
        _ => {
            let img: Vec<String> = match obj.get("img") {
                Some(Value::Array(a)) if !a.is_empty() => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        (
                            BadKind::NotAString,
                            "field \"img\" must be a path or a list of paths".to_string(),
                        )
                    })?,
                _ => vec![get_str(obj, "img")?.to_string()],
            };
            if img.iter().any(|p| p.trim().is_empty()) {
                return Err((BadKind::MissingField, "empty img".into()));
            }
            let prompt = get_str(obj, "prompt")?;
            let label = get_str(obj, "label")?;
            if label.trim().is_empty() {
                return Err((BadKind::EmptyLabel, "empty label".into()));
            }
            let images = img
                .iter()
                .map(|p| resolve(root, p, opts.allow_outside_root))
                .collect::<Result<Vec<_>, _>>()?;
            let history = match obj.get("history") {
                None => Vec::new(),
                Some(h) => {
                    serde_json::from_value::<Vec<(String, String)>>(h.clone()).map_err(|_| {
                        (
                            BadKind::NotAString,
                            "field \"history\" must be a list of [question, answer] pairs"
                                .to_string(),
                        )
                    })?
                }
            };
            let id = match obj.get("image_id").and_then(Value::as_str) {
                Some(id) => id.to_string(),
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
                prompt: prompt.to_string(),
                label: label.to_string(),
                history,
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
        let bytes =
            crate::io::read_bytes_capped(path, crate::io::MAX_IMAGE_BYTES).map_err(|e| {
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
                            r.images
                                .iter()
                                .find_map(|p| check_image(p, opts.check_images).err())
                                .map(|(kind, what)| BadRecord {
                                    index: r.index,
                                    id: Some(r.id.clone()),
                                    kind,
                                    message: format!(
                                        "{file}: record {} ({}{}): {what}",
                                        r.index,
                                        id_label(schema),
                                        if schema == Schema::Annotations {
                                            r.id.clone()
                                        } else {
                                            r.img.join(" + ")
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
    pub img: Films,
    pub prompt: String,
    pub label: String,
    /// Earlier `[question, answer]` turns (conversations only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<(String, String)>,
}

/// A training list's `img`: one path (XrayGLM's layout), or a list for a study's several views.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
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
