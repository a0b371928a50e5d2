//! Several films per study: OpenI's `<report>_<k>` image ids grouped into one record per report
//! (`data.group_views`), and the studies of a file counted by views.

use std::collections::HashMap;

use serde::Serialize;

use super::Record;

/// Studies by their number of views (`data.group_views`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StudyCounts {
    pub studies: usize,
    pub one_view: usize,
    pub two_views: usize,
    pub three_or_more: usize,
    /// Studies whose films carry different captions (OpenI-zh translated each film's copy of the
    /// report on its own); the first view's caption is the target.
    pub differing_captions: usize,
}

/// The most films one study may have when `data.group_views` groups them; more means the ids
/// are not per study (e.g. `synth_00001 … synth_00512`).
pub const MAX_VIEWS_PER_STUDY: usize = 16;

/// `<report>_<k>` → (report, k) for OpenI-style image ids (`k` a view number: digits without a
/// leading zero, so a zero-padded running number like `synth_00001` is not a view).
pub fn study_of(image_id: &str) -> Option<(&str, u64)> {
    let (report, k) = image_id.rsplit_once('_')?;
    if report.is_empty()
        || k.is_empty()
        || !k.bytes().all(|b| b.is_ascii_digit())
        || (k.len() > 1 && k.starts_with('0'))
    {
        return None;
    }
    Some((report, k.parse().ok()?))
}

/// Merge per-film annotation records into one record per study, the views in `k` order, the study
/// where the first of its films is in the file. A film whose id is not `<report>_<k>` comes back as an error.
pub fn group_study_views(
    records: Vec<Record>,
) -> (Vec<Record>, StudyCounts, Vec<(Record, String)>) {
    let mut order: Vec<String> = Vec::new();
    let mut by_study: HashMap<String, Vec<(u64, Record)>> = HashMap::new();
    let mut bad = Vec::new();
    for r in records {
        match study_of(&r.id) {
            Some((report, k)) => {
                let report = report.to_string();
                if !by_study.contains_key(&report) {
                    order.push(report.clone());
                }
                by_study.entry(report).or_default().push((k, r));
            }
            None => {
                let why = format!(
                    "image_id {:?} is not <report>_<k>: cannot group it into a study \
                     (data.group_views)",
                    r.id
                );
                bad.push((r, why));
            }
        }
    }
    let mut counts = StudyCounts::default();
    let mut out = Vec::with_capacity(order.len());
    for report in order {
        let mut views = by_study.remove(&report).unwrap_or_default();
        if views.len() > MAX_VIEWS_PER_STUDY {
            let n = views.len();
            for (_, r) in views {
                let why = format!(
                    "study {report:?} would have {n} films (at most {MAX_VIEWS_PER_STUDY}): the \
                     image ids are not per study (<report>_<k>, k the view number), so \
                     data.group_views cannot group them"
                );
                bad.push((r, why));
            }
            continue;
        }
        views.sort_by_key(|(k, _)| *k);
        counts.studies += 1;
        match views.len() {
            1 => counts.one_view += 1,
            2 => counts.two_views += 1,
            _ => counts.three_or_more += 1,
        }
        if views.iter().any(|(_, r)| r.label != views[0].1.label) {
            counts.differing_captions += 1;
        }
        let mut first = views[0].1.clone();
        first.index = views
            .iter()
            .map(|(_, r)| r.index)
            .min()
            .unwrap_or(first.index);
        first.id = report;
        first.img = views.iter().flat_map(|(_, r)| r.img.clone()).collect();
        first.images = views.iter().flat_map(|(_, r)| r.images.clone()).collect();
        out.push(first);
    }
    out.sort_by_key(|r| r.index);
    (out, counts, bad)
}
