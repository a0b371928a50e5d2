//! The engine's output processor: each row picks its next token, its reply is decoded as `chat`
//! shows it, stable text is streamed, stop strings and limits end it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tch::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::{Event, Finish, Finished, Worker};
use crate::infer::sampling::Sampler;
use crate::infer::structured::Constraint;
use crate::model::positions::Prefix;
use crate::tokenizer::{ids, process_response};

/// One row being decoded.
pub(super) struct Row {
    /// Which model (index into [`EngineInfo::models`]).
    pub(super) model: usize,
    pub(super) events: UnboundedSender<Event>,
    pub(super) sampler: Sampler,
    pub(super) prompt_tokens: usize,
    /// The prompt's prefix: all of it but `<sop>`, and its `[gMASK]`.
    pub(super) prefix: Prefix,
    /// Prompt + reply tokens at most.
    pub(super) max_length: usize,
    pub(super) max_new: usize,
    pub(super) reply: Vec<i64>,
    /// The reply text sent so far.
    pub(super) shown: String,
    pub(super) stop: Vec<String>,
    /// When the request reached the server, and when the row's last token was chosen.
    pub(super) arrived: Instant,
    pub(super) last_token: Option<Instant>,
    /// The grammar the reply is held to (its text is then sent as decoded).
    pub(super) constraint: Option<Constraint>,
}

impl Worker {
    /// Each row from `first` on picks its next token from its row of `logits`; finished rows
    /// leave.
    pub(super) fn choose(&mut self, m: usize, logits: &Tensor, first: usize) {
        let tok = &self.chat.tokenizer;
        let g = &mut self.groups[m];
        let metrics = &self.stats.metrics;
        let mut done = Vec::new();
        for i in first..g.rows.len() {
            let r = &mut g.rows[i];
            let row_logits = logits.narrow(0, (i - first) as i64, 1);
            let picked = match r.constraint.as_mut() {
                None => Ok(row_logits),
                Some(c) => c.mask(&row_logits),
            }
            .and_then(|l| r.sampler.next(&l, &[r.reply.as_slice()]))
            .map(|p| p[0])
            .and_then(|t| {
                // The grammar takes every token but the end.
                if let Some(c) = r.constraint.as_mut().filter(|_| t != ids::EOP) {
                    c.advance(t)?;
                }
                Ok(t)
            });
            let finish = match picked {
                Err(e) => {
                    fail(&r.events, 500, format!("{e:#}"));
                    done.push(i);
                    continue;
                }
                Ok(t) if t == ids::EOP => Some(Finish::Stop),
                Ok(t) => {
                    r.reply.push(t);
                    let now = Instant::now();
                    match r.last_token.replace(now) {
                        None => metrics.first_token(r.model, (now - r.arrived).as_secs_f64()),
                        Some(t0) => metrics.next_token(r.model, (now - t0).as_secs_f64()),
                    }
                    let full = r.prompt_tokens + r.reply.len() >= r.max_length
                        || r.reply.len() >= r.max_new;
                    // A complete grammar allows only the end: the reply is over.
                    if r.constraint.as_ref().is_some_and(|c| c.is_done()) {
                        Some(Finish::Stop)
                    } else {
                        r.advance(tok, full)
                    }
                }
            };
            if let Some(f) = finish {
                r.finish(tok, f);
                let secs = r.arrived.elapsed().as_secs_f64();
                metrics.finished(r.model, r.prompt_tokens, r.reply.len(), secs, f);
                done.push(i);
            }
        }
        for &i in done.iter().rev() {
            g.remove(i);
            self.stats.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Row {
    /// The reply text now: the decoded reply, processed as `chat` shows it, without leading
    /// spaces; cut before the first stop string (then `true`).
    fn text(&self, tok: &crate::tokenizer::ChatGlmTokenizer) -> (String, bool) {
        let raw = self.constraint.is_some();
        let text = tok
            .decode(&self.reply)
            .map(|t| if raw { t } else { process_response(&t) })
            .unwrap_or_default();
        let text = text.trim_start().to_string();
        let cut = self.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        match cut {
            Some(i) => (text[..i].to_string(), true),
            None => (text, false),
        }
    }

    /// After a new token: send the text that is now stable; `Some` when the reply is over
    /// (a stop string, or `full`: no room for another token).
    fn advance(&mut self, tok: &crate::tokenizer::ChatGlmTokenizer, full: bool) -> Option<Finish> {
        let (text, stopped) = self.text(tok);
        if stopped {
            return Some(Finish::Stop);
        }
        if full {
            return Some(Finish::Length);
        }
        // Hold back trailing white space and what could still become a stop string.
        let mut end = text.trim_end().len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                    end -= k;
                    break;
                }
            }
        }
        let stable = &text[..end];
        if stable.len() > self.shown.len() && stable.starts_with(self.shown.as_str()) {
            let _ = self
                .events
                .send(Event::Delta(stable[self.shown.len()..].to_string()));
            self.shown = stable.to_string();
        }
        None
    }

    /// Send the rest of the text and the end.
    fn finish(&mut self, tok: &crate::tokenizer::ChatGlmTokenizer, finish: Finish) {
        let (text, _) = self.text(tok);
        let text = text.trim_end();
        if text.len() > self.shown.len() && text.starts_with(self.shown.as_str()) {
            let _ = self
                .events
                .send(Event::Delta(text[self.shown.len()..].to_string()));
            self.shown = text.to_string();
        }
        let _ = self.events.send(Event::Done(Finished {
            text: self.shown.clone(),
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.reply.len(),
        }));
    }
}

pub(super) fn fail(events: &UnboundedSender<Event>, status: u16, message: impl Into<String>) {
    let _ = events.send(Event::Failed {
        status,
        message: message.into(),
    });
}
