//! PyTorch's zip checkpoint format (`torch.save` since 1.6): a zip archive holding
//! `<name>/data.pkl` (the pickled object, tensors as persistent storage references) and one
//! uncompressed entry `<name>/data/<key>` per storage. Used by HF `pytorch_model-*.bin` shards and
//! sat / DeepSpeed `mp_rank_00_model_states.pt`.
//!
//! Only the zip directory and `data.pkl` are read up front; a tensor's bytes are read (positioned
//! read, not a memory map, so they never count against resident memory twice) only when
//! [`TorchCheckpoint::tensor`] is called. A caller that copies tensors into a model one at a time
//! therefore holds at most one tensor beyond the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::pickle::{self, TensorRef, Value};

pub struct TorchCheckpoint {
    path: PathBuf,
    file: std::fs::File,
    /// entry name → (data offset, size)
    entries: HashMap<String, (usize, usize)>,
    prefix: String,
    pub root: Value,
}

impl TorchCheckpoint {
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut magic = [0u8; 2];
        file.read_exact_at(&mut magic, 0)
            .with_context(|| format!("{}: too short", path.display()))?;
        if magic[0] == 0x80 {
            bail!(
                "{}: a legacy (pre-1.6, non-zip) torch checkpoint; re-save it with a recent torch",
                path.display()
            );
        }
        let mut zip = zip::ZipArchive::new(file.try_clone()?)
            .with_context(|| format!("{}: not a torch zip checkpoint", path.display()))?;
        let mut entries = HashMap::new();
        let mut prefix = None;
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i)?;
            let name = f.name().to_string();
            if f.compression() != zip::CompressionMethod::Stored {
                bail!(
                    "{}: entry {name} is compressed; torch writes them stored",
                    path.display()
                );
            }
            if let Some(p) = name.strip_suffix("data.pkl") {
                prefix = Some(p.to_string());
            }
            entries.insert(name, (f.data_start() as usize, f.size() as usize));
        }
        let prefix =
            prefix.with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
        let read = |(o, n): (usize, usize)| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, o as u64)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(buf)
        };
        if let Some(&e) = entries.get(&format!("{prefix}byteorder")) {
            if read(e)? != b"little" {
                bail!(
                    "{}: big-endian checkpoints are not supported",
                    path.display()
                );
            }
        }
        let pkl = read(entries[&format!("{prefix}data.pkl")])?;
        let root =
            pickle::parse(&pkl).with_context(|| format!("{}: reading data.pkl", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
            prefix,
            root,
        })
    }

    /// The model's state dict: `module` for sat / DeepSpeed checkpoints, `state_dict` or
    /// `model` when present, else the top-level dict. Non-tensor entries are skipped.
    pub fn state_dict(&self) -> Result<Vec<(String, TensorRef)>> {
        let dict = ["module", "state_dict", "model"]
            .iter()
            .find_map(|k| self.root.get(k).filter(|v| matches!(v, Value::Dict(_))))
            .unwrap_or(&self.root);
        let Value::Dict(items) = dict else {
            bail!(
                "{}: the checkpoint is not a dict of tensors",
                self.path.display()
            );
        };
        Ok(items
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect())
    }

    /// Materialise one tensor (contiguous, on the CPU, in its stored dtype).
    pub fn tensor(&self, r: &TensorRef) -> Result<Tensor> {
        let entry = format!("{}data/{}", self.prefix, r.key);
        let &(o, n) = self
            .entries
            .get(&entry)
            .with_context(|| format!("{}: storage {} missing", self.path.display(), r.key))?;
        let es = r.dtype.size();
        let numel_storage = (n / es) as i64;
        let numel: i64 = r.size.iter().product();
        // Fast path: a contiguous view of a slice of the storage (one copy).
        let mut contiguous_stride = vec![0i64; r.size.len()];
        let mut acc = 1;
        for i in (0..r.size.len()).rev() {
            contiguous_stride[i] = acc;
            acc *= r.size[i];
        }
        let is_contiguous = r
            .size
            .iter()
            .zip(&r.stride)
            .zip(&contiguous_stride)
            .all(|((&s, &st), &c)| s == 1 || st == c);
        if is_contiguous {
            let start = r.offset as usize * es;
            let end = start + numel as usize * es;
            if end > n {
                bail!(
                    "{}: tensor reaches past its storage {}",
                    self.path.display(),
                    r.key
                );
            }
            return super::read_tensor_at(&self.file, (o + start) as u64, &r.size, r.dtype.kind())
                .with_context(|| format!("reading {}", self.path.display()));
        }
        let max_index: i64 = r.offset
            + r.size
                .iter()
                .zip(&r.stride)
                .map(|(&s, &st)| (s - 1).max(0) * st)
                .sum::<i64>();
        if max_index >= numel_storage {
            bail!(
                "{}: strided tensor reaches past its storage {}",
                self.path.display(),
                r.key
            );
        }
        let storage = super::read_tensor_at(&self.file, o as u64, &[numel_storage], r.dtype.kind())
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(storage
            .as_strided(&r.size, &r.stride, r.offset)
            .contiguous())
    }

    /// All tensors of the state dict, materialised lazily in file order.
    pub fn tensors(&self) -> Result<impl Iterator<Item = Result<(String, Tensor)>> + '_> {
        let sd = self.state_dict()?;
        Ok(sd
            .into_iter()
            .map(move |(k, r)| Ok((k.clone(), self.tensor(&r)?))))
    }
}
