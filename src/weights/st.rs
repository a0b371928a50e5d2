//! safetensors files: memory-mapped reading one tensor at a time, and a streaming atomic writer.
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
    mmap: memmap2::Mmap,
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
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only map of a file that is not modified while open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
        })
    }

    pub fn names(&self) -> Vec<String> {
        let st = safetensors::SafeTensors::deserialize(&self.mmap).expect("validated at open");
        let mut n: Vec<String> = st.names().into_iter().cloned().collect();
        n.sort();
        n
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = safetensors::SafeTensors::deserialize(&self.mmap).expect("validated at open");
        let v = st
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: {name}: {e:?}", self.path.display()))?;
        let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::from_data_size(
            v.data(),
            &shape,
            kind_of(v.dtype())?,
        ))
    }

    /// All tensors, read lazily one at a time.
    pub fn tensors(&self) -> impl Iterator<Item = Result<(String, Tensor)>> + '_ {
        self.names()
            .into_iter()
            .map(move |n| Ok((n.clone(), self.tensor(&n)?)))
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
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
