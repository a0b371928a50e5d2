//! safetensors files: reading one tensor at a time (positioned reads of the header-listed byte
//! ranges), and a streaming atomic writer.
//!
//! Format (huggingface/safetensors): u64 little-endian header length, a JSON header mapping each
//! name to `{dtype, shape, data_offsets: [begin, end]}` (plus optional `__metadata__`), padded
//! with spaces to 8 bytes, then the raw little-endian data.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

pub struct SafeTensorsFile {
    path: PathBuf,
    file: std::fs::File,
    /// name → (kind, shape, absolute byte range)
    tensors: std::collections::BTreeMap<String, (Kind, Vec<i64>, u64, u64)>,
    /// The header's `__metadata__` strings.
    pub metadata: std::collections::BTreeMap<String, String>,
}

fn kind_of(d: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match d {
        D::F64 => Kind::Double,
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

fn dtype_name(k: Kind) -> Result<(&'static str, usize)> {
    Ok(match k {
        Kind::Double => ("F64", 8),
        Kind::Float => ("F32", 4),
        Kind::Half => ("F16", 2),
        Kind::BFloat16 => ("BF16", 2),
        Kind::Int64 => ("I64", 8),
        Kind::Int => ("I32", 4),
        Kind::Int16 => ("I16", 2),
        Kind::Int8 => ("I8", 1),
        Kind::Uint8 => ("U8", 1),
        Kind::Bool => ("BOOL", 1),
        other => bail!("cannot write {other:?} to safetensors"),
    })
}

impl SafeTensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > size {
            bail!(
                "{}: not a safetensors file (header length {n})",
                path.display()
            );
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| anyhow::anyhow!("{}: bad safetensors header: {e}", path.display()))?;
        let mut tensors = std::collections::BTreeMap::new();
        let mut metadata = std::collections::BTreeMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                if let serde_json::Value::Object(m) = info {
                    for (k, v) in m {
                        if let serde_json::Value::String(s) = v {
                            metadata.insert(k, s);
                        }
                    }
                }
                continue;
            }
            let bad = || anyhow::anyhow!("{}: bad header entry for {name}", path.display());
            let dtype: safetensors::Dtype =
                serde_json::from_value(info.get("dtype").cloned().ok_or_else(bad)?)
                    .map_err(|_| bad())?;
            let shape: Vec<i64> =
                serde_json::from_value(info.get("shape").cloned().ok_or_else(bad)?)
                    .map_err(|_| bad())?;
            let offs: [u64; 2] =
                serde_json::from_value(info.get("data_offsets").cloned().ok_or_else(bad)?)
                    .map_err(|_| bad())?;
            let kind = kind_of(dtype).with_context(|| format!("{}: {name}", path.display()))?;
            if shape.iter().any(|&d| d < 0) {
                bail!(
                    "{}: {name}: negative size in shape {shape:?}",
                    path.display()
                );
            }
            let (begin, end) = (
                (8 + n).saturating_add(offs[0]),
                (8 + n).saturating_add(offs[1]),
            );
            let want = shape
                .iter()
                .try_fold(dtype_name(kind)?.1 as u64, |acc, &d| {
                    acc.checked_mul(d as u64)
                });
            if end < begin || end > size || Some(end - begin) != want {
                bail!(
                    "{}: {name}: byte range does not match its shape",
                    path.display()
                );
            }
            tensors.insert(name, (kind, shape, begin, end));
        }
        // No two tensors may share bytes (a crafted header could make one tensor alias another).
        let mut ranges: Vec<(u64, u64, &String)> = tensors
            .iter()
            .filter(|(_, t)| t.3 > t.2)
            .map(|(n, t)| (t.2, t.3, n))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                bail!(
                    "{}: the byte ranges of {} and {} overlap (data_offsets)",
                    path.display(),
                    w[0].2,
                    w[1].2
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
            metadata,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (kind, shape, begin, _) = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        super::read_tensor_at(&self.file, *begin, shape, *kind)
            .with_context(|| format!("reading {}", self.path.display()))
    }

    /// All tensors, read lazily one at a time.
    pub fn tensors(&self) -> impl Iterator<Item = Result<(String, Tensor)>> + '_ {
        self.tensors
            .keys()
            .map(move |n| Ok((n.clone(), self.tensor(n)?)))
    }
}

/// Write tensors to `path` atomically (temporary file, then rename), one tensor in memory at a time.
pub fn write(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: &[(&str, String)],
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dtype, es) = dtype_name(t.kind())?;
        let n = t.numel() * es;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.size(), "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    let result = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for (_, t) in tensors {
            let c = t.to_device(tch::Device::Cpu).contiguous();
            let (_, es) = dtype_name(c.kind())?;
            let mut buf = vec![0u8; c.numel() * es];
            c.copy_data_u8(&mut buf, c.numel());
            f.write_all(&buf)?;
        }
        let f = f.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::io::sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
