//! `xrayglm prepare-data`: records in either schema → validated training list + statistics.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::config::Config;
use crate::data::records::{load_records, write_training_list, BadKind, Schema, StudyCounts};
use crate::data::sample::SampleBuilder;
use crate::tokenizer::ChatGlmTokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct TokenStats {
    pub source_min: usize,
    pub source_max: usize,
    pub target_min: usize,
    pub target_median: usize,
    pub target_p95: usize,
    pub target_max: usize,
    pub longest_sample: usize,
    pub truncated: usize,
    /// Records whose prompt or report contains a control-token string (`[gMASK]`, `<eop>`, …):
    /// tokenized as literal text, never as control ids.
    pub control_literals: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub records_file: PathBuf,
    pub schema: Schema,
    pub generated: Option<usize>,
    /// Records in the file (films for annotations, conversations for conversation files).
    pub total: usize,
    /// Usable records (studies with `data.group_views`, conversations for conversation files).
    pub usable: usize,
    /// Training samples written: one per usable record, one per answer of a conversation.
    pub samples: usize,
    pub bad: Vec<(BadKind, usize)>,
    /// Conversation turns that make no sample: last questions without an answer, system turns
    /// after the conversation started.
    pub dropped_turns: usize,
    pub out: PathBuf,
    /// Films outside the training list's folder: written as absolute paths, which training reads
    /// only with `data.allow_outside_root = true`.
    pub absolute_paths: usize,
    pub tokens: Option<TokenStats>,
    /// Annotations named `<report>_<k>` (OpenI): their studies by number of views.
    pub studies: Option<StudyCounts>,
    /// Whether the training list has one sample per study (`data.group_views`).
    pub grouped: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.generated {
            writeln!(f, "generated {n} synthetic films")?;
        }
        writeln!(
            f,
            "records: {} ({:?} schema)",
            self.records_file.display(),
            self.schema
        )?;
        match (&self.studies, self.grouped) {
            (Some(s), true) => writeln!(
                f,
                "  total {} films in {} studies  usable {} studies  bad {} records",
                self.total,
                s.studies,
                self.usable,
                self.bad.iter().map(|(_, n)| n).sum::<usize>()
            )?,
            _ if matches!(self.schema, Schema::Llava | Schema::ShareGpt) => writeln!(
                f,
                "  total {} conversations  usable {} → {} samples (one per answer)  bad {} conversations",
                self.total,
                self.usable,
                self.samples,
                self.bad.iter().map(|(_, n)| n).sum::<usize>()
            )?,
            _ => writeln!(
                f,
                "  total {}  usable {}  bad {}",
                self.total,
                self.usable,
                self.bad.iter().map(|(_, n)| n).sum::<usize>()
            )?,
        }
        if self.dropped_turns > 0 {
            writeln!(
                f,
                "  {} turn(s) make no sample: a last question without an answer, or a system turn \
                 after the conversation started",
                self.dropped_turns
            )?;
        }
        for (k, n) in &self.bad {
            writeln!(f, "  skipped {n} × {k:?}")?;
        }
        if let Some(s) = &self.studies {
            writeln!(
                f,
                "studies in the file: {} — 1 view: {}, 2 views: {}, 3+ views: {}; {} with \
                 differing captions across their films (the first film's is the target){}",
                s.studies,
                s.one_view,
                s.two_views,
                s.three_or_more,
                s.differing_captions,
                if self.grouped {
                    "; one sample per study (data.group_views)"
                } else {
                    "; one sample per film (data.group_views=true: one per study)"
                }
            )?;
        }
        writeln!(f, "training list: {}", self.out.display())?;
        if self.absolute_paths > 0 {
            writeln!(
                f,
                "  {} film(s) are outside the list's folder and written as absolute paths: \
                 train on it with --set data.allow_outside_root=true",
                self.absolute_paths
            )?;
        }
        match &self.tokens {
            Some(t) => writeln!(
                f,
                "tokens: prompt {}–{}, report {}–{} (median {}, p95 {}), longest sample {}, truncated {}\n\
                 control-token strings (kept as literal text): {} record(s)",
                t.source_min, t.source_max, t.target_min, t.target_max, t.target_median, t.target_p95,
                t.longest_sample, t.truncated, t.control_literals
            ),
            None => writeln!(f, "tokens: no tokenizer found (set tokenizer.path or XRAYGLM_TOKENIZER); skipped"),
        }
    }
}

/// Run the preparation. `tokenizer` adds token statistics (and checks every record tokenizes).
/// The training list never replaces one of its inputs (the records file or an image), nor any
/// other existing file unless `force`.
pub fn run(cfg: &Config, tokenizer: Option<&ChatGlmTokenizer>, force: bool) -> Result<Summary> {
    let generated = ensure_synthetic(cfg)?;
    let loaded = load_records(&cfg.data.path, &cfg.load_options())?;
    let out = cfg.data.out_path();
    check_out(&out, &loaded.file, &loaded.records, force)?;
    let absolute_paths = write_training_list(&out, &loaded.records)?;
    let tokens = match tokenizer {
        Some(tok) => Some(token_stats(cfg, tok, &loaded.records)?),
        None => None,
    };

    Ok(Summary {
        records_file: loaded.file.clone(),
        schema: loaded.schema,
        generated,
        total: loaded.total,
        usable: {
            let mut indices: Vec<usize> = loaded.records.iter().map(|r| r.index).collect();
            indices.dedup();
            indices.len()
        },
        samples: loaded.records.len(),
        bad: loaded.bad_counts(),
        dropped_turns: loaded.dropped_turns,
        out,
        absolute_paths,
        tokens,
        studies: loaded.studies,
        grouped: loaded.grouped,
    })
}

/// Refuse to write the training list over an input, or over any existing file without `force`.
fn check_out(
    out: &std::path::Path,
    records_file: &std::path::Path,
    records: &[crate::data::records::Record],
    force: bool,
) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if out.is_dir() {
        bail!("--out {}: is a folder; give a file name", out.display());
    }
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).ok();
    let target = canon(out);
    if target.is_some() && target == canon(records_file) {
        bail!(
            "--out {} is the records file being read; refusing to overwrite an input (choose another --out)",
            out.display()
        );
    }
    if let Some(r) = records
        .iter()
        .find(|r| target.is_some() && r.images.iter().any(|p| canon(p) == target))
    {
        bail!(
            "--out {} is the image of record {} ({}); refusing to overwrite an input",
            out.display(),
            r.index,
            r.id
        );
    }
    if !force {
        bail!(
            "--out {} already exists; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// Generate the synthetic demo set when the config points at it and it is missing, or was drawn
/// by another generator version or with another film count. Returns how many films were made.
pub fn ensure_synthetic(cfg: &Config) -> Result<Option<usize>> {
    use crate::config::SyntheticKind;
    if cfg.synthetic.count == 0 || cfg.data.path != default_synthetic_path(cfg) {
        return Ok(None);
    }
    let s = &cfg.synthetic;
    /// What a set's file says of how it was made.
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(default = "first_version")]
        version: u32,
        #[serde(default)]
        lateral: bool,
        #[serde(default)]
        kind: SyntheticKind,
        annotations: Vec<serde::de::IgnoredAny>,
    }
    fn first_version() -> u32 {
        1
    }
    if cfg.data.path.exists() {
        let version = match s.kind {
            SyntheticKind::Basic => crate::data::synthetic::GENERATOR_VERSION,
            SyntheticKind::Hard => crate::data::synthetic_hard::HARD_GENERATOR_VERSION,
        };
        let current = std::fs::read(&cfg.data.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Header>(&b).ok())
            .is_none_or(|f| {
                f.version == version
                    && f.kind == s.kind
                    && f.lateral == s.lateral
                    && f.annotations.len() == s.count * (1 + s.lateral as usize)
            });
        if current {
            return Ok(None);
        }
        crate::errln!(
            "{}: made by another version of the synthetic generator or with another count; redrawing {} films",
            cfg.data.path.display(),
            s.count
        );
    }
    match s.kind {
        SyntheticKind::Basic => {
            crate::data::synthetic::generate_views(&s.out_dir, s.count, s.size, s.seed, s.lateral)?;
        }
        SyntheticKind::Hard => {
            if s.lateral {
                bail!("synthetic.lateral: the hard set has PA films only");
            }
            crate::data::synthetic_hard::generate_hard(&s.out_dir, s.count, s.size, s.seed)?;
        }
    }
    Ok(Some(s.count))
}

/// The annotations file the synthetic generator writes for this config.
pub fn default_synthetic_path(cfg: &Config) -> PathBuf {
    match cfg.synthetic.kind {
        crate::config::SyntheticKind::Basic => {
            cfg.synthetic.out_dir.join("Xray").join("synth-zh.json")
        }
        crate::config::SyntheticKind::Hard => {
            crate::data::synthetic_hard::hard_path(&cfg.synthetic.out_dir)
        }
    }
}

fn token_stats(
    cfg: &Config,
    tok: &ChatGlmTokenizer,
    records: &[crate::data::records::Record],
) -> Result<TokenStats> {
    let builder = SampleBuilder::new(tok.clone(), cfg.sample.clone())?;
    let mut src = Vec::with_capacity(records.len());
    let mut tgt = Vec::with_capacity(records.len());
    let mut longest = 0;
    let mut truncated = 0;
    let controls = tok.control_pieces();
    let control_literals = records
        .iter()
        .filter(|r| {
            controls
                .iter()
                .any(|c| r.prompt.contains(c.as_str()) || r.label.contains(c.as_str()))
        })
        .count();
    for r in records {
        let what = || format!("{}: record {} ({})", cfg.data.path.display(), r.index, r.id);
        let films = r.images.len();
        let (source, _) = builder
            .source_ids_for(films, &r.history, &r.prompt)
            .with_context(what)?;
        src.push(source.len());
        tgt.push(tok.encode(&r.label)?.len());
        let s = builder
            .build_for(films, &r.history, &r.prompt, &r.label)
            .with_context(what)?;
        longest = longest.max(s.len());
        truncated += s.truncated as usize;
    }
    let mut sorted = tgt.clone();
    sorted.sort_unstable();
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    Ok(TokenStats {
        source_min: *src.iter().min().unwrap_or(&0),
        source_max: *src.iter().max().unwrap_or(&0),
        target_min: sorted[0],
        target_median: q(0.5),
        target_p95: q(0.95),
        target_max: *sorted.last().unwrap_or(&0),
        longest_sample: longest,
        truncated,
        control_literals,
    })
}
