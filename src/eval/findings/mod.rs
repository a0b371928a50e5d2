//! A findings labeler for chest X-ray reports in Chinese and English: which of the 14 CheXpert
//! observations a report states as present, absent or uncertain, by rules a user can read.
//!
//! Conventions follow the CheXpert labeler (Irvin et al., AAAI 2019, "CheXpert: a large chest
//! radiograph dataset with uncertainty labels and expert comparison"; stanfordmlgroup/
//! chexpert-labeler `stages/aggregate.py`): mentions are found by phrase, each is classified by
//! negation and uncertainty cues in its scope, the mentions of one observation are aggregated
//! (positive over uncertain over negative), and No Finding is derived — positive when no
//! observation other than Support Devices is positive or uncertain. The classification itself is
//! NegEx-style (Chapman et al., J Biomed Inform 2001): a cue before or after a mention applies
//! when both are in the same clause, a clause ending at a sentence end or at a break word.
//!
//! The phrases and cues are data (`rules/findings/{zh,en}.toml`, embedded as the defaults; see
//! [`rules`] for the format): a user extends them, or writes a set for another body part, without
//! recompiling (`xrayglm findings --rules FILE`).

pub mod ce;
pub mod files;
pub mod rules;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use rules::{Labeler, RuleSet};

/// The 14 CheXpert observations, in CheXpert's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Observation {
    #[serde(rename = "No Finding")]
    NoFinding,
    #[serde(rename = "Enlarged Cardiomediastinum")]
    EnlargedCardiomediastinum,
    Cardiomegaly,
    #[serde(rename = "Lung Lesion")]
    LungLesion,
    #[serde(rename = "Lung Opacity")]
    LungOpacity,
    Edema,
    Consolidation,
    Pneumonia,
    Atelectasis,
    Pneumothorax,
    #[serde(rename = "Pleural Effusion")]
    PleuralEffusion,
    #[serde(rename = "Pleural Other")]
    PleuralOther,
    Fracture,
    #[serde(rename = "Support Devices")]
    SupportDevices,
}

impl Observation {
    pub const ALL: [Observation; 14] = [
        Self::NoFinding,
        Self::EnlargedCardiomediastinum,
        Self::Cardiomegaly,
        Self::LungLesion,
        Self::LungOpacity,
        Self::Edema,
        Self::Consolidation,
        Self::Pneumonia,
        Self::Atelectasis,
        Self::Pneumothorax,
        Self::PleuralEffusion,
        Self::PleuralOther,
        Self::Fracture,
        Self::SupportDevices,
    ];

    /// CheXpert's name (the rule files' `name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::NoFinding => "No Finding",
            Self::EnlargedCardiomediastinum => "Enlarged Cardiomediastinum",
            Self::Cardiomegaly => "Cardiomegaly",
            Self::LungLesion => "Lung Lesion",
            Self::LungOpacity => "Lung Opacity",
            Self::Edema => "Edema",
            Self::Consolidation => "Consolidation",
            Self::Pneumonia => "Pneumonia",
            Self::Atelectasis => "Atelectasis",
            Self::Pneumothorax => "Pneumothorax",
            Self::PleuralEffusion => "Pleural Effusion",
            Self::PleuralOther => "Pleural Other",
            Self::Fracture => "Fracture",
            Self::SupportDevices => "Support Devices",
        }
    }

    /// The two-letter code of the gold set and the compact tables.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoFinding => "NF",
            Self::EnlargedCardiomediastinum => "EC",
            Self::Cardiomegaly => "CM",
            Self::LungLesion => "LL",
            Self::LungOpacity => "LO",
            Self::Edema => "ED",
            Self::Consolidation => "CO",
            Self::Pneumonia => "PN",
            Self::Atelectasis => "AT",
            Self::Pneumothorax => "PX",
            Self::PleuralEffusion => "PE",
            Self::PleuralOther => "PO",
            Self::Fracture => "FR",
            Self::SupportDevices => "SD",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s) || o.code().eq_ignore_ascii_case(s))
    }
}

/// What a report says about an observation.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    NotMentioned,
    Negative,
    Uncertain,
    Positive,
}

impl State {
    /// CheXpert's aggregation of two mentions: positive over uncertain over negative.
    pub fn merge(self, other: State) -> State {
        self.max(other)
    }

    /// The gold files' mark: `+`, `-`, `?` (and `.` for not mentioned).
    pub fn mark(self) -> char {
        match self {
            Self::Positive => '+',
            Self::Negative => '-',
            Self::Uncertain => '?',
            Self::NotMentioned => '.',
        }
    }

    pub fn from_mark(c: char) -> Option<Self> {
        match c {
            '+' => Some(Self::Positive),
            '-' => Some(Self::Negative),
            '?' => Some(Self::Uncertain),
            '.' => Some(Self::NotMentioned),
            _ => None,
        }
    }
}

/// Which side a positive finding was stated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Left,
    Right,
    Both,
}

impl Side {
    fn merge(self, other: Side) -> Side {
        if self == other {
            self
        } else {
            Side::Both
        }
    }
}

/// One phrase found in a report, and how it was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mention {
    pub observation: Observation,
    pub state: State,
    /// The matched text.
    pub text: String,
    /// The cue that set the state, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
}

/// The labels of one report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Labels {
    pub states: [State; 14],
    pub sides: BTreeMap<Observation, Side>,
    pub mentions: Vec<Mention>,
}

impl Labels {
    /// Aggregate mentions (CheXpert's rule) and derive No Finding.
    pub fn from_mentions(mentions: Vec<Mention>) -> Self {
        let mut states = [State::NotMentioned; 14];
        let mut sides = BTreeMap::new();
        for m in &mentions {
            let i = m.observation.index();
            states[i] = states[i].merge(m.state);
            if let (State::Positive, Some(s)) = (m.state, m.side) {
                sides
                    .entry(m.observation)
                    .and_modify(|x: &mut Side| *x = x.merge(s))
                    .or_insert(s);
            }
        }
        let mut labels = Self {
            states,
            sides,
            mentions,
        };
        labels.derive_no_finding();
        labels
    }

    /// From explicit states (a gold file); No Finding is derived.
    pub fn from_states(states: &[(Observation, State)]) -> Self {
        let mut s = [State::NotMentioned; 14];
        for &(o, st) in states {
            s[o.index()] = s[o.index()].merge(st);
        }
        let mut labels = Self {
            states: s,
            ..Default::default()
        };
        labels.derive_no_finding();
        labels
    }

    fn derive_no_finding(&mut self) {
        let finding = Observation::ALL.iter().any(|&o| {
            !matches!(o, Observation::NoFinding | Observation::SupportDevices)
                && matches!(self.states[o.index()], State::Positive | State::Uncertain)
        });
        self.states[Observation::NoFinding.index()] = if finding {
            State::NotMentioned
        } else {
            State::Positive
        };
    }

    pub fn get(&self, o: Observation) -> State {
        self.states[o.index()]
    }

    /// `{"Cardiomegaly": "positive", …}`: the mentioned observations only.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for o in Observation::ALL {
            let s = self.get(o);
            if s != State::NotMentioned {
                m.insert(o.name().into(), serde_json::to_value(s).unwrap_or_default());
            }
        }
        serde_json::Value::Object(m)
    }

    /// The gold files' compact form: `CM+ PE- …` (No Finding left out: it is derived).
    pub fn compact(&self) -> String {
        Observation::ALL
            .iter()
            .filter(|&&o| o != Observation::NoFinding && self.get(o) != State::NotMentioned)
            .map(|&o| format!("{}{}", o.code(), self.get(o).mark()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Parse the compact form (`CM+ PE- LL?`); an unknown code or mark is an error.
    pub fn parse_compact(s: &str) -> anyhow::Result<Self> {
        let mut states = Vec::new();
        for tok in s.split_whitespace() {
            let (code, mark) = tok.split_at(tok.len().saturating_sub(1));
            let o = Observation::from_name(code)
                .ok_or_else(|| anyhow::anyhow!("unknown observation code {code:?} in {tok:?}"))?;
            let st = mark
                .chars()
                .next()
                .and_then(State::from_mark)
                .ok_or_else(|| anyhow::anyhow!("unknown state mark in {tok:?} (+, -, ?)"))?;
            states.push((o, st));
        }
        Ok(Self::from_states(&states))
    }
}
