//! Training logs: a JSONL file (one object per logged step) and TensorBoard event files.
//!
//! TensorBoard format: TFRecord records (`u64` length, masked CRC-32C of the length, the payload,
//! masked CRC-32C of the payload) whose payloads are `tensorflow.Event` protobufs: field 1
//! `wall_time` (double), 2 `step` (int64), 3 `file_version` (string, first record
//! `"brain.Event:2"`), 5 `summary` → `Summary.value` (1) → `{tag (1): string, simple_value (2): float}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn event(wall: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    varint((1 << 3) | 1, &mut e);
    e.extend_from_slice(&wall.to_le_bytes());
    varint(2 << 3, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

/// Writes scalars to `events.out.tfevents.<time>.<host>[.<n>]` in a log folder.
pub struct TensorBoard {
    file: std::io::BufWriter<std::fs::File>,
    pub path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl TensorBoard {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "xrayglm".into());
        // A run resumed within the same second must not truncate the earlier file: take the
        // first free name (TensorBoard reads any `*tfevents*` file in the folder).
        let stem = format!("events.out.tfevents.{}.{host}", now() as u64);
        let mut n = 0;
        let (path, file) = loop {
            let path = dir.join(if n == 0 {
                stem.clone()
            } else {
                format!("{stem}.{n}")
            });
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut tb = Self {
            file: std::io::BufWriter::new(file),
            path,
        };
        let first = event(now(), 0, |e| field_bytes(3, b"brain.Event:2", e));
        tb.record(&first)?;
        Ok(tb)
    }

    fn record(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(payload)?;
        self.file.write_all(&masked_crc(payload).to_le_bytes())?;
        Ok(())
    }

    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(1, tag.as_bytes(), &mut value);
            varint((2 << 3) | 5, &mut value);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(1, &value, &mut summary);
        }
        let e = event(now(), step, |e| field_bytes(5, &summary, e));
        self.record(&e)?;
        self.file.flush()?;
        Ok(())
    }
}

/// An independent reader of TensorBoard scalar event files (used by tests): verifies every CRC and
/// returns `(step, tag, value)`.
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut pos = 0;
    let mut first = true;
    while pos < data.len() {
        anyhow::ensure!(pos + 12 <= data.len(), "truncated record header");
        let len_bytes = &data[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let crc = u32::from_le_bytes(data[pos + 8..pos + 12].try_into()?);
        anyhow::ensure!(crc == masked_crc(len_bytes), "bad length crc");
        let payload = &data[pos + 12..pos + 12 + len];
        let crc = u32::from_le_bytes(data[pos + 12 + len..pos + 16 + len].try_into()?);
        anyhow::ensure!(crc == masked_crc(payload), "bad payload crc");
        pos += 16 + len;
        let fields = parse_fields(payload)?;
        let step = fields
            .iter()
            .find(|f| f.0 == 2)
            .map(|f| f.1 as i64)
            .unwrap_or(0);
        if first {
            anyhow::ensure!(
                fields.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"),
                "first event lacks file_version"
            );
            first = false;
        }
        for (_, _, summary) in fields.iter().filter(|f| f.0 == 5) {
            for (_, _, value) in parse_fields(summary)?.iter().filter(|f| f.0 == 1) {
                let vf = parse_fields(value)?;
                let tag = vf
                    .iter()
                    .find(|f| f.0 == 1)
                    .map(|f| String::from_utf8_lossy(&f.2).into_owned())
                    .unwrap_or_default();
                let v = vf
                    .iter()
                    .find(|f| f.0 == 2)
                    .map(|f| f32::from_bits(f.1 as u32))
                    .unwrap_or(f32::NAN);
                out.push((step, tag, v));
            }
        }
    }
    Ok(out)
}

/// (field number, scalar value, bytes) of a protobuf message.
fn parse_fields(mut b: &[u8]) -> Result<Vec<(u32, u64, Vec<u8>)>> {
    fn var(b: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&x, rest) = b.split_first().context("truncated varint")?;
            *b = rest;
            v |= ((x & 0x7f) as u64) << shift;
            if x & 0x80 == 0 {
                return Ok(v);
            }
        }
        anyhow::bail!("varint too long")
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = var(&mut b)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => out.push((field, var(&mut b)?, Vec::new())),
            1 => {
                anyhow::ensure!(b.len() >= 8, "truncated fixed64");
                out.push((field, u64::from_le_bytes(b[..8].try_into()?), Vec::new()));
                b = &b[8..];
            }
            5 => {
                anyhow::ensure!(b.len() >= 4, "truncated fixed32");
                out.push((
                    field,
                    u32::from_le_bytes(b[..4].try_into()?) as u64,
                    Vec::new(),
                ));
                b = &b[4..];
            }
            2 => {
                let n = var(&mut b)? as usize;
                anyhow::ensure!(b.len() >= n, "truncated bytes");
                out.push((field, 0, b[..n].to_vec()));
                b = &b[n..];
            }
            w => anyhow::bail!("unsupported wire type {w}"),
        }
    }
    Ok(out)
}

/// Appends one JSON object per line.
pub struct JsonLog {
    file: std::fs::File,
}

impl JsonLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Resident memory of this process in MiB (Linux), for the logs.
pub fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

/// The largest resident set of this process so far.
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 test vector: 32 bytes of zeros → 0x8A9136AA.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn event_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::create(dir.path()).unwrap();
        tb.scalars(3, &[("train/loss", 2.5), ("train/lr", 1e-4)])
            .unwrap();
        tb.scalars(4, &[("train/loss", 2.25)]).unwrap();
        let path = tb.path.clone();
        drop(tb);
        let s = read_scalars(&path).unwrap();
        assert_eq!(s[0], (3, "train/loss".to_string(), 2.5));
        assert_eq!(s[1].1, "train/lr");
        assert_eq!(s[2], (4, "train/loss".to_string(), 2.25));
    }

    #[test]
    fn a_second_writer_in_the_same_second_keeps_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = TensorBoard::create(dir.path()).unwrap();
        a.scalars(1, &[("train/loss", 1.0)]).unwrap();
        drop(a);
        let mut paths = Vec::new();
        for _ in 0..3 {
            let b = TensorBoard::create(dir.path()).unwrap();
            paths.push(b.path.clone());
        }
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 3);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 4);
        let first = files
            .iter()
            .map(|e| e.as_ref().unwrap().path())
            .flat_map(|p| read_scalars(&p).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(first, vec![(1, "train/loss".to_string(), 1.0)]);
    }
}
