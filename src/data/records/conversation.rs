//! Conversation files: LLaVA's and ShareGPT / LLaMA-Factory's layouts, one record per answer
//! (or the last), each with the turns before it as history.

use std::path::Path;

use serde_json::Value;

use super::{describe, resolve, BadKind, ConversationTurns, LoadOptions, Record, Schema};

/// The fewest tokens an earlier turn adds to a prompt: `问：Q\n答：A\n` holds two line breaks,
/// each its own token (`<n>`), whatever Q and A are.
pub const MIN_TOKENS_PER_TURN: usize = 2;

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

/// Question / answer pairs, the `<image>` markers counted in the questions, the turns left out.
type Pairs = (Vec<(String, String)>, usize, usize);

/// A conversation's turns as (question, answer) pairs in order, with the number of `<image>`
/// markers in its questions and the turns that make no pair (a last unanswered question, system
/// turns after the start; other system turns are skipped). Consecutive questions join.
fn question_answer_pairs(
    turns: &[Value],
    role_key: &str,
    text_key: &str,
    user: &str,
    assistant: &str,
) -> Result<Pairs, (BadKind, String)> {
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
