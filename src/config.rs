//! Run configuration: a TOML file in `configs/` plus `--set key=value` overrides.
//!
//! Every section rejects unknown keys, so a typo is an error that names the key. Relative paths
//! are taken from the current directory. `Config::default()` is the embedded default: the
//! synthetic chest X-ray demo set made by `xrayglm prepare-data`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::batch::LoaderConfig;
use crate::data::image::{ImageProcessor, SixteenBit};
use crate::data::records::{ImageCheck, LoadOptions, PromptPolicy, FIXED_PROMPT};
use crate::data::sample::SampleConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptMode {
    #[default]
    Fixed,
    Random,
}

/// Where the records come from and how they are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Records file: `{"annotations": [...]}` or a training list `[{"img","prompt","label"}]`.
    pub path: PathBuf,
    /// Folder for relative image paths; empty = the records file's folder.
    pub image_root: PathBuf,
    /// Extension of `<image_id>` images (annotations schema).
    pub image_ext: String,
    /// Prompt for annotations: `fixed` (`fixed_prompt`) or `random` (one of XrayGLM's 6, seeded).
    pub prompt: PromptMode,
    pub fixed_prompt: String,
    pub prompt_seed: i64,
    /// `exists` or `decode` (default): how image files are checked before anything starts.
    pub check_images: ImageCheck,
    /// Skip and count bad records instead of failing.
    pub skip_bad: bool,
    /// Training list written by `prepare-data`; empty = `<records stem>-prompt.json` beside it.
    pub out: PathBuf,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/synthetic/Xray/synth-zh.json"),
            image_root: PathBuf::new(),
            image_ext: "png".into(),
            prompt: PromptMode::Fixed,
            fixed_prompt: FIXED_PROMPT.into(),
            prompt_seed: 1234,
            check_images: ImageCheck::Decode,
            skip_bad: false,
            out: PathBuf::new(),
        }
    }
}

impl DataSection {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            image_root: (!self.image_root.as_os_str().is_empty()).then(|| self.image_root.clone()),
            prompt: match self.prompt {
                PromptMode::Fixed => PromptPolicy::Fixed {
                    prompt: self.fixed_prompt.clone(),
                },
                PromptMode::Random => PromptPolicy::Random {
                    seed: self.prompt_seed,
                },
            },
            image_ext: self.image_ext.clone(),
            check_images: self.check_images,
            skip_bad: self.skip_bad,
            threads: 0,
        }
    }

    /// The training list path `prepare-data` writes.
    pub fn out_path(&self) -> PathBuf {
        if !self.out.as_os_str().is_empty() {
            return self.out.clone();
        }
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into());
        self.path.with_file_name(format!("{stem}-prompt.json"))
    }
}

/// The synthetic demo set (`prepare-data --synthetic N`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSection {
    /// Films generated when the records file is missing (0 = never generate).
    pub count: usize,
    pub size: usize,
    pub seed: i64,
    pub out_dir: PathBuf,
}

impl Default for SyntheticSection {
    fn default() -> Self {
        Self {
            count: 256,
            size: 256,
            seed: 1234,
            out_dir: PathBuf::from("data/synthetic"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// `ice_text.model` or a `tokenizer.json`; empty = search (see `tokenizer::find`).
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSection {
    pub size: usize,
    /// `scale` (default) or `pillow` (clip like PIL's `convert('RGB')` of a 16-bit PNG).
    pub sixteen_bit: SixteenBit,
}

impl Default for ImageSection {
    fn default() -> Self {
        Self {
            size: 224,
            sixteen_bit: SixteenBit::Scale,
        }
    }
}

impl ImageSection {
    pub fn processor(&self) -> ImageProcessor {
        ImageProcessor {
            size: self.size,
            sixteen_bit: self.sixteen_bit,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: DataSection,
    pub synthetic: SyntheticSection,
    pub tokenizer: TokenizerSection,
    pub image: ImageSection,
    pub sample: SampleConfig,
    pub loader: LoaderConfig,
}

/// Parse a `--set` value: a TOML value when it parses as one, else a bare string.
fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Apply one `a.b.c=value` override to a TOML table.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        bail!("override {spec:?} is not key=value");
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("override {spec:?} has an empty key part");
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("override {spec:?}: {p} is not a section"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), parse_value(raw.trim()));
    Ok(())
}

impl Config {
    /// Load `file` (or the embedded default when `None`) and apply overrides.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut table, origin) = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                let t: toml::Table = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?;
                (t, p.display().to_string())
            }
            None => (
                toml::Table::new(),
                "the embedded default config".to_string(),
            ),
        };
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        // Round-trip through text so that errors point at the offending key.
        let text = toml::to_string(&table)?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            let with = if overrides.is_empty() {
                String::new()
            } else {
                format!(" with --set {}", overrides.join(" --set "))
            };
            anyhow::anyhow!("{origin}{with}: {e}")
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.image.size == 0 {
            bail!("image.size must be positive");
        }
        if self.loader.batch_size == 0 {
            bail!("loader.batch_size must be positive");
        }
        Ok(())
    }

    /// The config as TOML (saved beside outputs so a run can be rebuilt).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_types_and_reject_unknown_keys() {
        let c = Config::load(
            None,
            &["loader.batch_size=3".into(), "data.prompt=random".into()],
        )
        .unwrap();
        assert_eq!(c.loader.batch_size, 3);
        assert_eq!(c.data.prompt, PromptMode::Random);
        let e = Config::load(None, &["loader.batchsize=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batchsize"), "{e}");
        let e = Config::load(None, &["nosuch.key=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn default_round_trips() {
        let c = Config::default();
        let back: Config = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
