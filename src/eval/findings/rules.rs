//! The labeler's rule files and their compiled form.
//!
//! A rule file (TOML; the defaults are `rules/findings/en.toml` and `rules/findings/zh.toml`):
//!
//! ```toml
//! language = "en"   # "en": lower-cased, phrases match whole words; "zh": any characters
//! gap = 30          # the most characters a `~` in a phrase skips (never past a clause end)
//! [cues]
//! negation_before = ["no", "without"]      # "no effusion"
//! negation_after = ["is not seen"]         # "effusion is not seen"
//! uncertain_before = ["possible", "may"]   # "possible effusion"
//! uncertain_after = ["is suspected"]
//! uncertain_strong = ["cannot be excluded"] # read before negation, on either side
//! clause_break = ["but", "however"]        # end a cue's scope (besides sentence ends)
//! clause_continue = [", such as"]          # a break inside one of these does not end it
//! [sides]
//! left = ["left"]; right = ["right"]; both = ["bilateral"]
//! [[observation]]
//! name = "Pleural Effusion"                # a CheXpert name
//! positive = ["effusion", "pleural fluid"] # mentions, classified by the cues
//! negative = ["costophrenic angles~sharp"] # statements of normal: negative as they stand
//! uncertain = []                           # uncertain as they stand ("borderline …")
//! ignore = ["pericardial effusion"]        # look like a mention, mean something else
//! ```
//!
//! Phrase syntax: literal text; `~` skips up to `gap` characters within the clause; in English a
//! word ending in `*` matches any ending (`atelecta*`). Sentences end at `. ! ? ;` (and `。！？；`)
//! and line breaks. Within a clause, a `*_before` cue applies to the mentions after it and a
//! `*_after` cue to the mentions before it; cues inside a mention (不 in 肺不张) or inside a
//! `uncertain_strong` cue (排除 in 不能排除) do not count. Longer phrases win over shorter ones
//! they contain.

use std::path::Path;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::Deserialize;

use super::{Labels, Mention, Observation, Side, State};
use crate::eval::metrics::Lang;

const BUILTIN_EN: &str = include_str!("../../../rules/findings/en.toml");
const BUILTIN_ZH: &str = include_str!("../../../rules/findings/zh.toml");

/// A rule file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    pub language: Lang,
    #[serde(default = "default_gap")]
    pub gap: usize,
    #[serde(default)]
    pub cues: Cues,
    #[serde(default)]
    pub sides: Sides,
    #[serde(rename = "observation")]
    pub observations: Vec<ObservationRules>,
}

/// The longest gap (`~`) or `near` distance a rule file may set, in characters.
pub const MAX_GAP: usize = 200;

fn default_gap() -> usize {
    30
}

fn default_near() -> usize {
    12
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cues {
    #[serde(default)]
    pub negation_before: Vec<String>,
    #[serde(default)]
    pub negation_after: Vec<String>,
    #[serde(default)]
    pub uncertain_before: Vec<String>,
    #[serde(default)]
    pub uncertain_after: Vec<String>,
    #[serde(default)]
    pub uncertain_strong: Vec<String>,
    /// Uncertainty that holds only for a mention right beside it ("X or Y", "X versus Y"): at most
    /// `near` characters away, on either side.
    #[serde(default)]
    pub uncertain_near: Vec<String>,
    /// Negation that holds only for a mention right beside it ("the tube has been removed").
    #[serde(default)]
    pub negation_near: Vec<String>,
    #[serde(default = "default_near")]
    pub near: usize,
    #[serde(default)]
    pub clause_break: Vec<String>,
    /// Text that keeps a clause going across a break inside it ("，如", ", such as"): the cue
    /// before still applies to the list that follows.
    #[serde(default)]
    pub clause_continue: Vec<String>,
    /// Breaks that may also separate the items of a negated list ("没有肺不张，胸腔积液或气胸"):
    /// a clause after one that is a list item (a mention with at most three characters before and
    /// after it) and has no cue of its own takes the negation that ended the clause before it.
    #[serde(default)]
    pub list_break: Vec<String>,
    /// NegEx's pseudo-cues: text that contains a cue but is none ("no change", 不规则, 无意识);
    /// cues inside them do not count.
    #[serde(default)]
    pub pseudo: Vec<String>,
    /// Words that state something is there ("有", "存在"): before the first mention of a clause
    /// they stop a negated list from carrying over.
    #[serde(default)]
    pub affirm: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sides {
    #[serde(default)]
    pub left: Vec<String>,
    #[serde(default)]
    pub right: Vec<String>,
    #[serde(default)]
    pub both: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationRules {
    pub name: String,
    #[serde(default)]
    pub positive: Vec<String>,
    #[serde(default)]
    pub negative: Vec<String>,
    #[serde(default)]
    pub uncertain: Vec<String>,
    #[serde(default)]
    pub ignore: Vec<String>,
}

impl RuleSet {
    /// The embedded default rules of a language.
    pub fn builtin(lang: Lang) -> Self {
        let (text, name) = match lang {
            Lang::En => (BUILTIN_EN, "rules/findings/en.toml"),
            Lang::Zh => (BUILTIN_ZH, "rules/findings/zh.toml"),
        };
        Self::parse(text, name).expect("the embedded rule files parse (tested)")
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::io::read_capped(path, crate::io::MAX_CONFIG_BYTES)
            .with_context(|| format!("reading rules {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, name: &str) -> Result<Self> {
        let r: RuleSet = toml::from_str(text).with_context(|| format!("{name}: bad rule file"))?;
        // `{name}:{line}` of the first line (after `after`) that holds `needle`.
        let at = |needle: &str, after: usize| -> String {
            text.lines()
                .enumerate()
                .skip(after)
                .find(|(_, l)| l.contains(needle))
                .map(|(i, _)| format!("{name}:{}", i + 1))
                .unwrap_or_else(|| name.to_string())
        };
        if r.gap > MAX_GAP {
            bail!(
                "{}: gap = {}: at most {MAX_GAP} characters",
                at("gap", 0),
                r.gap
            );
        }
        if r.cues.near > MAX_GAP {
            bail!(
                "{}: cues.near = {}: at most {MAX_GAP} characters",
                at("near", 0),
                r.cues.near
            );
        }
        // Every phrase must say something: `~` joins two non-empty parts.
        let check = |key: &str, list: &[String]| -> Result<()> {
            for p in list {
                if !p.trim().is_empty() && p.split('~').any(|part| part.trim().is_empty()) {
                    bail!(
                        "{}: {key}: the phrase {p:?} has an empty part around `~` (a gap must join \
                         two pieces of text; alone it matches every report)",
                        at(&format!("{p:?}"), 0)
                    );
                }
            }
            Ok(())
        };
        let c = &r.cues;
        for (key, list) in [
            ("cues.negation_before", &c.negation_before),
            ("cues.negation_after", &c.negation_after),
            ("cues.uncertain_before", &c.uncertain_before),
            ("cues.uncertain_after", &c.uncertain_after),
            ("cues.uncertain_strong", &c.uncertain_strong),
            ("cues.uncertain_near", &c.uncertain_near),
            ("cues.negation_near", &c.negation_near),
            ("cues.clause_break", &c.clause_break),
            ("cues.clause_continue", &c.clause_continue),
            ("cues.list_break", &c.list_break),
            ("cues.pseudo", &c.pseudo),
            ("cues.affirm", &c.affirm),
            ("sides.left", &r.sides.left),
            ("sides.right", &r.sides.right),
            ("sides.both", &r.sides.both),
        ] {
            check(key, list)?;
        }
        let mut seen: Vec<&str> = Vec::new();
        for o in &r.observations {
            for (kind, list) in [
                ("positive", &o.positive),
                ("negative", &o.negative),
                ("uncertain", &o.uncertain),
                ("ignore", &o.ignore),
            ] {
                check(&format!("observation {:?} {kind}", o.name), list)?;
            }
            if seen.contains(&o.name.as_str()) {
                let first = at(&format!("{:?}", o.name), 0);
                let line: usize = first
                    .rsplit(':')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                bail!(
                    "{}: a second [[observation]] {:?} (the first is at {first}): give each once",
                    at(&format!("{:?}", o.name), line),
                    o.name
                );
            }
            seen.push(&o.name);
            if Observation::from_name(&o.name).is_none() {
                bail!(
                    "{name}: unknown observation {:?} (the 14 CheXpert names: {})",
                    o.name,
                    Observation::ALL.map(|o| o.name()).join(", ")
                );
            }
            if Observation::from_name(&o.name) == Some(Observation::NoFinding) {
                bail!("{name}: No Finding is derived from the other observations, not matched");
            }
        }
        Ok(r)
    }
}

/// How a phrase list's matches are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Positive,
    Negative,
    Uncertain,
    Ignore,
}

/// One compiled phrase list.
struct Phrases {
    re: Option<Regex>,
}

impl Phrases {
    fn new(list: &[String], lang: Lang, gap: usize, what: &str) -> Result<Self> {
        let mut pats: Vec<(usize, String)> = Vec::new();
        for p in list {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            pats.push((p.chars().count(), phrase_regex(p, lang, gap)));
        }
        if pats.is_empty() {
            return Ok(Self { re: None });
        }
        // Longer phrases first: at one position the longest alternative wins.
        pats.sort_by_key(|p| std::cmp::Reverse(p.0));
        let alt = pats
            .iter()
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>()
            .join("|");
        let re = Regex::new(&alt).with_context(|| format!("compiling {what}"))?;
        Ok(Self { re: Some(re) })
    }

    fn find(&self, text: &str) -> Vec<(usize, usize)> {
        match &self.re {
            None => Vec::new(),
            Some(re) => re.find_iter(text).map(|m| (m.start(), m.end())).collect(),
        }
    }
}

/// A phrase as a regular expression: literal text, `~` a bounded gap within the clause, and in
/// English whole words (a word ending in `*` takes any ending).
fn phrase_regex(p: &str, lang: Lang, gap: usize) -> String {
    let stop = "[^.;:!?,，。；：！？、]";
    let parts: Vec<String> = p
        .split('~')
        .map(|part| {
            let part = part.trim();
            match lang {
                Lang::Zh => regex::escape(part),
                Lang::En => part
                    .to_lowercase()
                    .split_whitespace()
                    .map(|w| match w.strip_suffix('*') {
                        Some(stem) => format!("{}\\w*", regex::escape(stem)),
                        None => regex::escape(w),
                    })
                    .collect::<Vec<_>>()
                    .join("\\s+"),
            }
        })
        .collect();
    let body = parts.join(&format!("{stop}{{0,{gap}}}?"));
    match lang {
        Lang::Zh => format!("(?:{body})"),
        Lang::En => {
            let end = if p.trim_end().ends_with('*') {
                ""
            } else {
                "\\b"
            };
            format!("(?:\\b{body}{end})")
        }
    }
}

/// A rule set ready to label reports.
pub struct Labeler {
    lang: Lang,
    /// Per observation and kind: the phrases without a gap, and those with one (cues inside a
    /// gapped match count: "心脏轮廓没有明显扩大").
    mentions: Vec<(Observation, Kind, Phrases, Phrases)>,
    neg_before: Phrases,
    neg_after: Phrases,
    unc_before: Phrases,
    unc_after: Phrases,
    unc_strong: Phrases,
    unc_near: Phrases,
    neg_near: Phrases,
    near: usize,
    breaks: Phrases,
    continues: Phrases,
    list_breaks: Phrases,
    pseudo: Phrases,
    affirm: Phrases,
    sides: [(Side, Phrases); 3],
    sentence_end: Regex,
}

/// A span of the clause and what matched there.
#[derive(Debug, Clone, Copy)]
struct Hit {
    start: usize,
    end: usize,
}

impl Hit {
    fn overlaps(&self, o: &Hit) -> bool {
        self.start < o.end && o.start < self.end
    }
    fn contains(&self, o: &Hit) -> bool {
        self.start <= o.start && o.end <= self.end
    }
}

impl Labeler {
    pub fn new(rules: &RuleSet) -> Result<Self> {
        let (lang, gap) = (rules.language, rules.gap);
        let ph = |list: &[String], what: &str| Phrases::new(list, lang, gap, what);
        let mut mentions = Vec::new();
        for o in &rules.observations {
            let obs = Observation::from_name(&o.name).context("checked in RuleSet::parse")?;
            for (kind, list) in [
                (Kind::Positive, &o.positive),
                (Kind::Negative, &o.negative),
                (Kind::Uncertain, &o.uncertain),
                (Kind::Ignore, &o.ignore),
            ] {
                let (gapped, plain): (Vec<String>, Vec<String>) =
                    list.iter().cloned().partition(|p| p.contains('~'));
                mentions.push((obs, kind, ph(&plain, &o.name)?, ph(&gapped, &o.name)?));
            }
        }
        let c = &rules.cues;
        let s = &rules.sides;
        Ok(Self {
            lang,
            mentions,
            neg_before: ph(&c.negation_before, "negation_before")?,
            neg_after: ph(&c.negation_after, "negation_after")?,
            unc_before: ph(&c.uncertain_before, "uncertain_before")?,
            unc_after: ph(&c.uncertain_after, "uncertain_after")?,
            unc_strong: ph(&c.uncertain_strong, "uncertain_strong")?,
            unc_near: ph(&c.uncertain_near, "uncertain_near")?,
            neg_near: ph(&c.negation_near, "negation_near")?,
            near: c.near,
            breaks: ph(&c.clause_break, "clause_break")?,
            continues: ph(&c.clause_continue, "clause_continue")?,
            list_breaks: ph(&c.list_break, "list_break")?,
            pseudo: ph(&c.pseudo, "pseudo")?,
            affirm: ph(&c.affirm, "affirm")?,
            sides: [
                (Side::Left, ph(&s.left, "sides.left")?),
                (Side::Right, ph(&s.right, "sides.right")?),
                (Side::Both, ph(&s.both, "sides.both")?),
            ],
            // A full stop ends a sentence only before a space or the end ("1.2 cm" stays one).
            sentence_end: Regex::new(r"[!?;。！？；\n]|\.(?:\s|$)").context("sentence regex")?,
        })
    }

    /// The default labeler of a language.
    pub fn builtin(lang: Lang) -> Self {
        Self::new(&RuleSet::builtin(lang)).expect("the embedded rule files compile (tested)")
    }

    pub fn lang(&self) -> Lang {
        self.lang
    }

    /// Label one report.
    pub fn label(&self, report: &str) -> Labels {
        let text = match self.lang {
            Lang::En => report.to_lowercase(),
            Lang::Zh => report.to_string(),
        };
        let mut mentions = Vec::new();
        for sentence in split_keep(&text, &self.sentence_end) {
            let keep = self.continues.find(sentence);
            let breaks: Vec<(usize, usize)> = self
                .breaks
                .find(sentence)
                .into_iter()
                .filter(|&(s, e)| !keep.iter().any(|&(ks, ke)| s < ke && ks < e))
                .collect();
            let mut start = 0;
            // The negation cue that ended the previous clause, while a list may go on.
            let mut carried: Option<String> = None;
            for (b0, b1) in breaks.into_iter().chain([(sentence.len(), sentence.len())]) {
                if b0 > start {
                    carried =
                        self.label_clause(&sentence[start..b0], carried.take(), &mut mentions);
                }
                let list = self
                    .list_breaks
                    .find(&sentence[b0..b1])
                    .first()
                    .is_some_and(|&(s, e)| s == 0 && e == b1 - b0);
                if !list {
                    carried = None;
                }
                start = b1.max(start);
            }
        }
        Labels::from_mentions(mentions)
    }

    /// Every phrase of every observation in a clause, with the shorter hits of one observation
    /// inside a longer one dropped (and its mentions under an `ignore` hit); also the spans of
    /// the phrases' own words, inside which cues do not count (不 in 肺不张; a gap's do).
    fn mentions_in(&self, clause: &str) -> (Vec<(Observation, Kind, Hit)>, Vec<Hit>) {
        let mut hits: Vec<(Observation, Kind, Hit)> = Vec::new();
        let mut words: Vec<Hit> = Vec::new();
        for (obs, kind, plain, gapped) in &self.mentions {
            for (s, e) in plain.find(clause) {
                hits.push((*obs, *kind, Hit { start: s, end: e }));
                if *kind != Kind::Ignore {
                    words.push(Hit { start: s, end: e });
                }
            }
            for (s, e) in gapped.find(clause) {
                hits.push((*obs, *kind, Hit { start: s, end: e }));
            }
        }
        // One text matched by a plain and a gapped phrase of the same list is one mention.
        let mut once = std::collections::HashSet::new();
        hits.retain(|(o, k, h)| once.insert((*o, *k, h.start, h.end)));
        let kept = hits
            .iter()
            .filter(|(o, k, h)| {
                *k != Kind::Ignore
                    && !hits.iter().any(|(o2, k2, h2)| {
                        o2 == o
                            && ((*k2 == Kind::Ignore && h2.overlaps(h))
                                || (h2.contains(h) && (h2.end - h2.start) > (h.end - h.start)))
                    })
            })
            .copied()
            .collect();
        (kept, words)
    }

    /// The cues of a clause (none inside a mention's words, a pseudo-cue, or a strong
    /// uncertainty cue) and the sides it names.
    fn cues_in<'t>(&self, clause: &'t str, words: &[Hit]) -> ClauseCues<'t> {
        let find = |p: &Phrases, mask: &[Hit]| -> Vec<Hit> {
            p.find(clause)
                .into_iter()
                .map(|(s, e)| Hit { start: s, end: e })
                .filter(|c| !words.iter().chain(mask).any(|m| m.overlaps(c)))
                .collect()
        };
        let pseudo = find(&self.pseudo, &[]);
        let strong = find(&self.unc_strong, &pseudo);
        let mut mask = strong.clone();
        mask.extend(&pseudo);
        let neg_before = find(&self.neg_before, &mask);
        let neg_after = find(&self.neg_after, &mask);
        let mut negs = neg_before.clone();
        negs.extend(&neg_after);
        ClauseCues {
            clause,
            near: self.near,
            unc_before: find(&self.unc_before, &mask),
            unc_after: find(&self.unc_after, &mask),
            unc_near: find(&self.unc_near, &mask),
            neg_near: find(&self.neg_near, &mask),
            affirm: find(&self.affirm, &negs),
            neg_before,
            neg_after,
            strong,
            sides: self
                .sides
                .iter()
                .flat_map(|(side, p)| {
                    p.find(clause)
                        .into_iter()
                        .map(move |(s, e)| (*side, Hit { start: s, end: e }))
                })
                .collect(),
        }
    }

    /// Label the mentions of one clause; returns the negation cue of its last mention when that
    /// one was negated by a cue before it (a list that may go on after a list break).
    fn label_clause(
        &self,
        clause: &str,
        carried: Option<String>,
        out: &mut Vec<Mention>,
    ) -> Option<String> {
        let (kept, words) = self.mentions_in(clause);
        let c = self.cues_in(clause, &words);
        if kept.is_empty() {
            // No mention: a negation at the end still opens a list ("没有任何病灶巩固，气胸或…").
            return c.neg_before.last().map(|h| c.text(*h));
        }
        // A list carried over from the clause before: this clause is a list item — at most three
        // characters before its first mention ("局灶性") and after its last ("的证据"), no cue
        // and no "有" of its own ("右肺基底瘢痕也很稳定" is a sentence of its own). "或" beside a
        // mention is no cue here: "…，胸腔积液或气胸" goes on the list.
        let first = kept.iter().map(|(_, _, h)| h.start).min().unwrap_or(0);
        let last_end = kept.iter().map(|(_, _, h)| h.end).max().unwrap_or(0);
        let carried = carried.filter(|_| {
            !c.has_own_cues()
                && !c.affirm.iter().any(|a| a.end <= first)
                && clause[..first].chars().count() <= 3
                && clause[last_end..].trim_end().chars().count() <= 3
        });
        let mut last_negated: Option<(usize, String)> = None;
        for (obs, kind, h) in kept {
            let (state, cue) = match kind {
                Kind::Negative => (State::Negative, None),
                Kind::Uncertain => (State::Uncertain, None),
                _ => {
                    let (state, cue) = c.classify(&h, carried.as_deref());
                    let negated_before = c.before(&c.neg_before, &h).is_some();
                    if state == State::Negative
                        && (negated_before || carried.is_some())
                        && last_negated.as_ref().is_none_or(|(end, _)| h.end >= *end)
                    {
                        last_negated = cue.clone().map(|t| (h.end, t));
                    }
                    (state, cue)
                }
            };
            out.push(Mention {
                observation: obs,
                state,
                text: c.text(h),
                cue,
                side: (state == State::Positive).then(|| c.side_of(&h)).flatten(),
            });
        }
        // Carried on only when the negated mention is the clause's last.
        last_negated
            .filter(|(end, _)| *end >= last_end)
            .map(|(_, c)| c)
    }
}

/// The cues found in one clause.
struct ClauseCues<'t> {
    clause: &'t str,
    near: usize,
    strong: Vec<Hit>,
    neg_before: Vec<Hit>,
    neg_after: Vec<Hit>,
    neg_near: Vec<Hit>,
    unc_before: Vec<Hit>,
    unc_after: Vec<Hit>,
    unc_near: Vec<Hit>,
    affirm: Vec<Hit>,
    sides: Vec<(Side, Hit)>,
}

impl ClauseCues<'_> {
    fn text(&self, h: Hit) -> String {
        self.clause[h.start..h.end].to_string()
    }

    fn has_own_cues(&self) -> bool {
        [
            &self.strong,
            &self.neg_before,
            &self.neg_after,
            &self.unc_before,
            &self.unc_after,
            &self.neg_near,
        ]
        .iter()
        .any(|l| !l.is_empty())
    }

    /// The nearest cue before the mention (or inside its gap).
    fn before(&self, list: &[Hit], h: &Hit) -> Option<Hit> {
        list.iter()
            .rev()
            .find(|c| c.end <= h.start || h.contains(c))
            .copied()
    }

    /// The nearest cue after the mention (or inside its gap).
    fn after(&self, list: &[Hit], h: &Hit) -> Option<Hit> {
        list.iter()
            .find(|c| c.start >= h.end || h.contains(c))
            .copied()
    }

    /// A cue at most `near` characters from the mention, on either side.
    fn beside(&self, list: &[Hit], h: &Hit) -> Option<Hit> {
        list.iter()
            .find(|c| {
                let gap = if c.end <= h.start {
                    self.clause[c.end..h.start].chars().count()
                } else if c.start >= h.end {
                    self.clause[h.end..c.start].chars().count()
                } else {
                    0
                };
                gap <= self.near
            })
            .copied()
    }

    /// A positive-kind mention's state and the cue that set it: strong uncertainty, then
    /// negation, then a negated list carried over, then uncertainty, else positive.
    fn classify(&self, h: &Hit, carried: Option<&str>) -> (State, Option<String>) {
        if let Some(c) = self.strong.first() {
            return (State::Uncertain, Some(self.text(*c)));
        }
        if let Some(c) = self
            .before(&self.neg_before, h)
            .or_else(|| self.after(&self.neg_after, h))
            .or_else(|| self.beside(&self.neg_near, h))
        {
            return (State::Negative, Some(self.text(c)));
        }
        if let Some(c) = carried {
            return (State::Negative, Some(c.to_string()));
        }
        if let Some(c) = self
            .before(&self.unc_before, h)
            .or_else(|| self.after(&self.unc_after, h))
            .or_else(|| self.beside(&self.unc_near, h))
        {
            return (State::Uncertain, Some(self.text(c)));
        }
        (State::Positive, None)
    }

    /// The side named nearest before the mention in its clause, else nearest after.
    fn side_of(&self, h: &Hit) -> Option<Side> {
        self.sides
            .iter()
            .filter(|(_, s)| s.end <= h.start)
            .max_by_key(|(_, s)| s.end)
            .or_else(|| {
                self.sides
                    .iter()
                    .filter(|(_, s)| s.start >= h.end)
                    .min_by_key(|(_, s)| s.start)
            })
            .map(|(side, _)| *side)
    }
}

/// The pieces of `text` between the matches of `sep` (the separators dropped).
fn split_keep<'a>(text: &'a str, sep: &Regex) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut start = 0;
    for m in sep.find_iter(text) {
        out.push(&text[start..m.start()]);
        start = m.end();
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_rule_files_parse_and_compile() {
        for lang in [Lang::En, Lang::Zh] {
            let r = RuleSet::builtin(lang);
            assert_eq!(r.language, lang);
            Labeler::new(&r).unwrap();
        }
    }

    #[test]
    fn phrases_match_whole_words_and_gaps_stay_in_the_clause() {
        let re = Regex::new(&phrase_regex("heart~enlarged", Lang::En, 30)).unwrap();
        assert!(re.is_match("the heart is mildly enlarged"));
        assert!(!re.is_match("the heart is normal, lungs enlarged"));
        let re = Regex::new(&phrase_regex("atelecta*", Lang::En, 30)).unwrap();
        assert!(re.is_match("bibasilar atelectatic change"));
        let re = Regex::new(&phrase_regex("mass", Lang::En, 30)).unwrap();
        assert!(!re.is_match("massive"));
    }

    #[test]
    fn unknown_observations_are_refused_by_name() {
        let e = RuleSet::parse(
            "language = \"en\"\n[[observation]]\nname = \"Cardiomegally\"\n",
            "x.toml",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("Cardiomegally"), "{e:#}");
    }
}
