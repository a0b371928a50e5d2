//! Preference pairs for DPO: a question about one or more films (with earlier turns), a chosen and
//! a rejected answer. One JSON list, each entry in one of the layouts preference data comes in:
//!
//! * ours: `{"image" | "images", "prompt", "chosen", "rejected"[, "history", "id"]}`;
//! * RLAIF-V: the question as `"question"`;
//! * a conversation (`"conversations"` in LLaVA's `from`/`value` turns or `"messages"` in
//!   ShareGPT's `role`/`content`) whose last user turn is the question and whose earlier turns are
//!   the history; a last assistant turn after it (the dataset's own answer) is not part of the
//!   prompt;
//! * LLaVA-RLHF: such a conversation with `"output_1"`, `"output_2"` (text or `{"value"}`) and
//!   `"preference"` (1 or 2) naming the chosen one.
//!
//! `<image>` markers in the question or history are stripped; there is one per film or none.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

use super::{
    check_images, decode, describe, read_json, resolve, BadKind, BadRecord, Films, LoadOptions,
    Record, Schema,
};

/// One usable pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Position in the source file.
    pub index: usize,
    pub id: String,
    /// The films as the file names them, and resolved.
    pub img: Vec<String>,
    pub images: Vec<PathBuf>,
    pub prompt: String,
    /// Earlier `(question, answer)` turns.
    pub history: Vec<(String, String)>,
    pub chosen: String,
    pub rejected: String,
}

/// A pair file, loaded.
#[derive(Debug, Clone)]
pub struct LoadedPairs {
    pub file: PathBuf,
    pub total: usize,
    pub pairs: Vec<Pair>,
    pub bad: Vec<BadRecord>,
}

/// An answer: text, or a turn object with the text as `value` / `content` (LLaVA-RLHF's outputs).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an object {\"value\"}")]
enum Answer {
    Text(String),
    Turn {
        #[serde(alias = "content")]
        value: String,
    },
}

impl Answer {
    fn text(self) -> String {
        match self {
            Answer::Text(t) | Answer::Turn { value: t } => t,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "an object {\"from\", \"value\"} or {\"role\", \"content\"}")]
struct Turn {
    #[serde(alias = "role")]
    from: String,
    #[serde(alias = "content")]
    value: String,
}

/// A pair entry in any of the layouts (the fields each uses; others are ignored).
#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default, alias = "images")]
    image: Option<Films>,
    #[serde(default, alias = "question")]
    prompt: Option<String>,
    #[serde(default)]
    history: Vec<(String, String)>,
    #[serde(default, alias = "messages")]
    conversations: Option<Vec<Turn>>,
    #[serde(default)]
    chosen: Option<Answer>,
    #[serde(default)]
    rejected: Option<Answer>,
    #[serde(default)]
    output_1: Option<Answer>,
    #[serde(default)]
    output_2: Option<Answer>,
    #[serde(default)]
    preference: Option<u8>,
}

/// Load a pair file, validating every pair (films checked as `opts.check_images` says). With
/// `skip_bad = false` the first bad pair is an error.
pub fn load_pairs(path: &Path, opts: &LoadOptions) -> Result<LoadedPairs> {
    let value = read_json(path)?;
    let file = path.display().to_string();
    let root = match &opts.image_root {
        Some(r) => r.clone(),
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let Value::Array(items) = &value else {
        bail!(
            "{file}: wrong schema: a pair file is a list of {{\"image\", \"prompt\", \"chosen\", \
             \"rejected\"}}, found {}",
            describe(&value)
        );
    };
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match parse_pair(item, index, &root, opts) {
            Ok(p) => pairs.push(p),
            Err((kind, what)) => bad.push(BadRecord {
                index,
                id: None,
                kind,
                message: format!("{file}: pair {index}: {what}"),
            }),
        }
    }
    // The films, checked as a training list's are.
    let as_records: Vec<Record> = pairs
        .iter()
        .map(|p: &Pair| Record {
            index: p.index,
            id: p.id.clone(),
            img: p.img.clone(),
            images: p.images.clone(),
            prompt: p.prompt.clone(),
            label: p.chosen.clone(),
            history: p.history.clone(),
        })
        .collect();
    let image_bad = check_images(&as_records, opts, &file, Schema::TrainingList);
    if !image_bad.is_empty() {
        let drop: std::collections::HashSet<usize> = image_bad.iter().map(|b| b.index).collect();
        pairs.retain(|p| !drop.contains(&p.index));
        bad.extend(image_bad);
    }
    bad.sort_by_key(|b| b.index);
    if !opts.skip_bad {
        if let Some(first) = bad.first() {
            bail!("{first}; use --skip_bad to skip bad pairs");
        }
    }
    if pairs.is_empty() {
        bail!(
            "{file}: no usable pairs ({} in the file, {} bad)",
            items.len(),
            bad.len()
        );
    }
    Ok(LoadedPairs {
        file: path.to_path_buf(),
        total: items.len(),
        pairs,
        bad,
    })
}

fn parse_pair(
    item: &Value,
    index: usize,
    root: &Path,
    opts: &LoadOptions,
) -> Result<Pair, (BadKind, String)> {
    let e: Entry = decode(item)?;
    let img: Vec<String> = match &e.image {
        Some(f) => f.paths().into_iter().map(str::to_string).collect(),
        None => Vec::new(),
    };
    if img.is_empty() || img.iter().any(|p| p.trim().is_empty()) {
        return Err((
            BadKind::MissingField,
            "no image: every pair needs a film (\"image\" / \"images\")".into(),
        ));
    }
    let (prompt, history) = match (e.prompt, e.conversations) {
        (Some(p), None) => (p, e.history),
        (None, Some(turns)) => prompt_of_turns(&turns)?,
        (Some(_), Some(_)) => {
            return Err((
                BadKind::MissingField,
                "both a prompt and a conversation: give one".into(),
            ))
        }
        (None, None) => {
            return Err((
                BadKind::MissingField,
                "missing field \"prompt\" (or \"question\", \"conversations\", \"messages\")"
                    .into(),
            ))
        }
    };
    let markers = prompt.matches("<image>").count()
        + history
            .iter()
            .map(|(q, _)| q.matches("<image>").count())
            .sum::<usize>();
    if markers > 0 && markers != img.len() {
        return Err((
            BadKind::MissingField,
            format!(
                "{markers} <image> markers for {} image(s): give one marker per film",
                img.len()
            ),
        ));
    }
    let strip = |s: &str| s.replace("<image>", "").trim().to_string();
    let (chosen, rejected) = answers(e.chosen, e.rejected, e.output_1, e.output_2, e.preference)?;
    if chosen.trim().is_empty() || rejected.trim().is_empty() {
        return Err((BadKind::EmptyLabel, "an empty answer".into()));
    }
    if chosen.trim() == rejected.trim() {
        return Err((
            BadKind::IdenticalPair,
            "the chosen and the rejected answers are the same".into(),
        ));
    }
    let images = img
        .iter()
        .map(|p| resolve(root, p, opts.allow_outside_root))
        .collect::<Result<Vec<_>, _>>()?;
    let id = match e.id {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("pair_{index}"),
    };
    Ok(Pair {
        index,
        id,
        img,
        images,
        prompt: strip(&prompt),
        history: history.iter().map(|(q, a)| (strip(q), a.clone())).collect(),
        chosen,
        rejected,
    })
}

/// The chosen and rejected answers: given as such, or LLaVA-RLHF's two outputs and preference.
fn answers(
    chosen: Option<Answer>,
    rejected: Option<Answer>,
    one: Option<Answer>,
    two: Option<Answer>,
    preference: Option<u8>,
) -> Result<(String, String), (BadKind, String)> {
    match (chosen, rejected, one, two, preference) {
        (Some(c), Some(r), None, None, None) => Ok((c.text(), r.text())),
        (None, None, Some(a), Some(b), Some(1)) => Ok((a.text(), b.text())),
        (None, None, Some(a), Some(b), Some(2)) => Ok((b.text(), a.text())),
        (None, None, Some(_), Some(_), p) => Err((
            BadKind::MissingField,
            format!("\"preference\" is {p:?}: 1 or 2 names the chosen output"),
        )),
        _ => Err((
            BadKind::MissingField,
            "give \"chosen\" and \"rejected\" (or \"output_1\", \"output_2\" and \"preference\")"
                .into(),
        )),
    }
}

/// Earlier `(question, answer)` turns.
type History = Vec<(String, String)>;

/// The question (the last user turn) and the `(question, answer)` turns before it; system turns
/// are skipped and a last assistant turn after the question is not part of the prompt.
fn prompt_of_turns(turns: &[Turn]) -> Result<(String, History), (BadKind, String)> {
    let user = |r: &str| matches!(r, "human" | "user");
    let assistant = |r: &str| matches!(r, "gpt" | "assistant");
    let mut history = Vec::new();
    let mut pending: Option<String> = None;
    let mut asked = false;
    for (k, t) in turns.iter().enumerate() {
        let role = t.from.as_str();
        if role == "system" {
            continue;
        }
        if user(role) {
            pending = Some(match pending.take() {
                Some(p) => format!("{p}\n{}", t.value),
                None => t.value.clone(),
            });
            asked = true;
        } else if assistant(role) {
            if let Some(q) = pending.take() {
                history.push((q, t.value.clone()));
            }
        } else {
            return Err((
                BadKind::UnknownRole,
                format!("turn {k}: unknown role {role:?}"),
            ));
        }
    }
    if !asked {
        return Err((
            BadKind::MissingField,
            "the conversation has no question".into(),
        ));
    }
    let prompt = match pending {
        Some(q) => q,
        // The last question was answered in the file: that answer is the dataset's own.
        None => history.pop().map(|(q, _)| q).unwrap_or_default(),
    };
    Ok((prompt, history))
}
