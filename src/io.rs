//! File writing that never leaves a half-written file: write to a temporary file in the same
//! folder, flush and sync it, rename it over the destination, then sync the folder (so the rename
//! itself survives a power loss or kernel crash).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Atomically replace `path` with `bytes`, creating parent folders.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync a folder, so that renames and new entries inside it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

/// fsync the folder holding `path` (after `path` was renamed into it).
pub fn sync_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => sync_dir(d),
        None => sync_dir(Path::new(".")),
    }
}

/// Atomically write a value as pretty JSON.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Remove the temporary files (`.<name>.<pid>.tmp`) and folders (`.<name>.partial-<pid>`) that
/// processes which are no longer running left in `dir` (killed in the middle of a write).
/// Returns how many were removed. Processes are looked up in `/proc`; without it nothing is removed.
pub fn remove_dead_leftovers(dir: &Path) -> usize {
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let mut removed = 0;
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let pid = if let Some(stem) = name.strip_suffix(".tmp") {
            stem.rsplit_once('.').map(|(_, p)| p)
        } else {
            name.rsplit_once(".partial-").map(|(_, p)| p)
        };
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let ok = if path.is_dir() {
            std::fs::remove_dir_all(&path).is_ok()
        } else {
            std::fs::remove_file(&path).is_ok()
        };
        removed += ok as usize;
    }
    removed
}

/// What a command reads, so that nothing it writes is ever one of its inputs: every file named by
/// a flag (records, rules, references, configs, hypotheses) and every file of an input folder
/// (a model folder: weights, configs, tokenizer; a run: its checkpoint and the base behind it).
/// Files are compared by canonical path and by device and inode, so symbolic and hard links to an
/// input are inputs too.
#[derive(Default, Debug)]
pub struct Inputs {
    files: Vec<InputFile>,
}

/// An input: where it lands (canonical path), its device and inode, and how errors name it.
type InputFile = (PathBuf, Option<(u64, u64)>, String);

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Where `path` leads once written: its canonical form when it exists, else its folder's canonical
/// form joined with its name (a missing folder: the path as given, made absolute).
fn landing(path: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(path) {
        return c;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

impl Inputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// An input file, `what` naming it in errors (e.g. `--against B.jsonl`). A path that does not
    /// exist is not recorded (the command itself says it is missing).
    pub fn file(&mut self, what: impl Into<String>, path: &Path) -> &mut Self {
        if path.is_file() {
            self.files.push((landing(path), file_id(path), what.into()));
        } else if path.is_dir() {
            self.folder(what, path);
        }
        self
    }

    /// The file a flag names, when given (`flag PATH` names it in errors).
    pub fn flag(&mut self, flag: &str, path: Option<&Path>) -> &mut Self {
        if let Some(p) = path {
            self.file(format!("{flag} {}", p.display()), p);
        }
        self
    }

    /// Every file directly inside `dir` (a model or checkpoint folder), named `what` in errors.
    pub fn folder(&mut self, what: impl Into<String>, dir: &Path) -> &mut Self {
        let what = what.into();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_file() {
                self.files.push((
                    landing(&p),
                    file_id(&p),
                    format!("{what} ({})", p.display()),
                ));
            }
        }
        self
    }

    /// Refuse `out` (given as `flag`) when it is one of the inputs.
    pub fn check(&self, flag: &str, out: &Path) -> Result<()> {
        let target = landing(out);
        let id = file_id(out);
        if let Some((_, _, what)) = self
            .files
            .iter()
            .find(|(p, i, _)| *p == target || (id.is_some() && *i == id))
        {
            anyhow::bail!(
                "{flag} {} is an input of this command ({what}): refusing to write over it; choose another output",
                out.display()
            );
        }
        Ok(())
    }

    /// [`Inputs::check`] for each file a command will write into the folder `dir`.
    pub fn check_in(&self, flag: &str, dir: &Path, names: &[&str]) -> Result<()> {
        if dir.is_file() {
            self.check(flag, dir)?;
            anyhow::bail!("{flag} {}: is a file; give a folder", dir.display());
        }
        for n in names {
            self.check(flag, &dir.join(n))?;
        }
        Ok(())
    }
}

/// The largest config, adapter config, rules or JSON sidecar file read (64 MiB).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// The largest image file read (256 MiB; a 16-bit 8k × 8k PNG is ~128 MiB uncompressed).
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;
/// The largest records, conversation or hypotheses file read (4 GiB).
pub const MAX_DATA_BYTES: u64 = 4 << 30;

/// Check that `path` is a regular file (not a folder, device, pipe or socket; a link is followed)
/// of at most `cap` bytes, and return its size. Reading `/dev/zero` or a FIFO would never end.
pub fn check_regular(path: &Path, cap: u64) -> Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !m.is_file() {
        anyhow::bail!(
            "{}: not a regular file ({})",
            path.display(),
            if m.is_dir() {
                "a folder"
            } else {
                "a device, pipe or socket"
            }
        );
    }
    if m.len() > cap {
        anyhow::bail!(
            "{}: {} bytes, more than the {} MiB this input may have",
            path.display(),
            m.len(),
            cap >> 20
        );
    }
    Ok(m.len())
}

/// Read a regular file of at most `cap` bytes (checked before reading, and again while reading in
/// case it grows).
pub fn read_bytes_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let size = check_regular(path, cap)?;
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = Vec::with_capacity(size as usize);
    f.take(cap + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > cap {
        anyhow::bail!(
            "{}: grew past the {} MiB this input may have while being read",
            path.display(),
            cap >> 20
        );
    }
    Ok(buf)
}

/// [`read_bytes_capped`] as UTF-8 text.
pub fn read_capped(path: &Path, cap: u64) -> Result<String> {
    String::from_utf8(read_bytes_capped(path, cap)?)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

/// Text without a leading UTF-8 byte order mark (which editors on Windows write).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}
