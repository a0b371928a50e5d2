//! The films of records, checked before training: present, not empty, decodable within the
//! memory limit.

use std::path::Path;

use super::super::image::{decode_rgb, SixteenBit};
use super::{id_label, BadKind, BadRecord, ImageCheck, LoadOptions, Record, Schema};

/// Check one image file.
pub fn check_image(path: &Path, check: ImageCheck) -> Result<(), (BadKind, String)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            BadKind::MissingImage,
            format!("image {} not found: {e}", path.display()),
        )
    })?;
    if !meta.is_file() {
        return Err((
            BadKind::MissingImage,
            format!("image {} is not a file", path.display()),
        ));
    }
    if meta.len() == 0 {
        return Err((
            BadKind::EmptyImage,
            format!("image {} is empty (0 bytes)", path.display()),
        ));
    }
    if check == ImageCheck::Decode {
        let bytes =
            crate::io::read_bytes_capped(path, crate::io::MAX_IMAGE_BYTES).map_err(|e| {
                (
                    BadKind::MissingImage,
                    format!("image {} cannot be read: {e}", path.display()),
                )
            })?;
        decode_rgb(&bytes, SixteenBit::Scale).map_err(|e| {
            if e.is::<crate::data::image::ImageTooLarge>() {
                (
                    BadKind::TooLarge,
                    format!("image {} is too large to decode: {e:#}", path.display()),
                )
            } else {
                (
                    BadKind::CorruptImage,
                    format!("image {} is corrupt: {e:#}", path.display()),
                )
            }
        })?;
    }
    Ok(())
}

pub(super) fn check_images(
    records: &[Record],
    opts: &LoadOptions,
    file: &str,
    schema: Schema,
) -> Vec<BadRecord> {
    let threads = crate::data::worker_threads(opts.threads).min(records.len().max(1));
    let chunk = records.len().div_ceil(threads).max(1);
    let mut out: Vec<BadRecord> = std::thread::scope(|s| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter_map(|r| {
                            r.images
                                .iter()
                                .find_map(|p| check_image(p, opts.check_images).err())
                                .map(|(kind, what)| BadRecord {
                                    index: r.index,
                                    id: Some(r.id.clone()),
                                    kind,
                                    message: format!(
                                        "{file}: record {} ({}{}): {what}",
                                        r.index,
                                        id_label(schema),
                                        if schema == Schema::Annotations {
                                            r.id.clone()
                                        } else {
                                            r.img.join(" + ")
                                        }
                                    ),
                                })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("image check thread panicked"))
            .collect()
    });
    out.sort_by_key(|b| b.index);
    out
}
