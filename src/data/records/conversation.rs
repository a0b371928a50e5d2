//! Conversation files: LLaVA's and ShareGPT / LLaMA-Factory's layouts, one record per answer
//! (or the last), each with the turns before it as history.

use std::path::Path;

use serde_json::Value;

use serde::Deserialize;

use super::{decode, resolve, BadKind, ConversationTurns, Films, LoadOptions, Record, Schema};

/// The fewest tokens an earlier turn adds to a prompt: `问：Q\n答：A\n` holds two line breaks,
/// each its own token (`<n>`), whatever Q and A are.
pub const MIN_TOKENS_PER_TURN: usize = 2;

/// LLaVA: `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`.
#[derive(Debug, Deserialize)]
struct Llava {
    #[serde(default)]
    id: Option<Id>,
    #[serde(default)]
    image: Option<Films>,
    conversations: Vec<LlavaTurn>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "an object {\"from\", \"value\"}")]
struct LlavaTurn {
    from: String,
    value: String,
}

/// ShareGPT / LLaMA-Factory: `{"messages": [{"role": "user"|"assistant"|"system", "content"}],
/// "images": [..]}`.
#[derive(Debug, Deserialize)]
struct ShareGpt {
    #[serde(default)]
    id: Option<Id>,
    #[serde(default)]
    images: Option<Films>,
    messages: Vec<ShareGptTurn>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "an object {\"role\", \"content\"}")]
struct ShareGptTurn {
    role: String,
    content: String,
}

/// A conversation's id: a string, or a number as some exports write it.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a number")]
enum Id {
    Text(String),
    Number(serde_json::Number),
}

/// Either layout, read: its id, its films and its `(role, text)` turns, with the names its
/// layout gives the role key and the user's and assistant's roles.
struct Conversation {
    id: Option<String>,
    films: Vec<String>,
    turns: Vec<(String, String)>,
    role_key: &'static str,
    user: &'static str,
    assistant: &'static str,
}

impl Conversation {
    fn decode(schema: Schema, item: &Value) -> Result<Self, (BadKind, String)> {
        let id = |i: Option<Id>| {
            i.map(|i| match i {
                Id::Text(s) => s,
                Id::Number(n) => n.to_string(),
            })
        };
        let films = |f: Option<Films>| {
            f.map(|f| f.paths().into_iter().map(str::to_string).collect())
                .unwrap_or_default()
        };
        Ok(match schema {
            Schema::Llava => {
                let c: Llava = decode(item)?;
                Conversation {
                    id: id(c.id),
                    films: films(c.image),
                    turns: c
                        .conversations
                        .into_iter()
                        .map(|t| (t.from, t.value))
                        .collect(),
                    role_key: "from",
                    user: "human",
                    assistant: "gpt",
                }
            }
            _ => {
                let c: ShareGpt = decode(item)?;
                Conversation {
                    id: id(c.id),
                    films: films(c.images),
                    turns: c
                        .messages
                        .into_iter()
                        .map(|t| (t.role, t.content))
                        .collect(),
                    role_key: "role",
                    user: "user",
                    assistant: "assistant",
                }
            }
        })
    }
}

/// The turns of a LLaVA or ShareGPT conversation as records: one per assistant turn (or the last
/// only), each with the turns before it as history; the films are marked by `<image>`. Also
/// returns how many turns make no sample (a last unanswered question, late system turns).
pub(super) fn parse_conversation(
    schema: Schema,
    item: &Value,
    index: usize,
    root: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Record>, usize), (BadKind, String)> {
    let c = Conversation::decode(schema, item)?;
    let images = &c.films;
    if images.is_empty() {
        return Err((
            BadKind::MissingField,
            "no image: every sample needs a film (\"image\" / \"images\")".into(),
        ));
    }
    let (pairs, markers, dropped) = question_answer_pairs(&c)?;
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
    let id =
        c.id.clone()
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

/// Question / answer pairs, the `<image>` markers counted in the questions, the turns left out.
type Pairs = (Vec<(String, String)>, usize, usize);

/// A conversation's turns as (question, answer) pairs in order, with the number of `<image>`
/// markers in its questions and the turns that make no pair (a last unanswered question, system
/// turns after the start; other system turns are skipped). Consecutive questions join.
fn question_answer_pairs(c: &Conversation) -> Result<Pairs, (BadKind, String)> {
    let (role_key, user, assistant) = (c.role_key, c.user, c.assistant);
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut pending: Option<String> = None;
    let mut markers = 0;
    let mut late_system = 0;
    for (k, (role, text)) in c.turns.iter().enumerate() {
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
