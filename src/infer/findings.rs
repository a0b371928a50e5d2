//! The findings a synthetic-demo report states (heart size, pleural effusion), read back from its
//! text: how the demo's quality check and `xrayglm eval` tell whether a generated report says the
//! right thing, not just similar words.

/// What a report says, where it says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stated {
    /// Some(true): enlarged heart; Some(false): normal size; None: not stated.
    pub cardiomegaly: Option<bool>,
    /// "none", "left", "right", "both", or None when not stated.
    pub effusion: Option<&'static str>,
}

/// Read the findings from a Chinese report in the synthetic set's wording.
pub fn stated(report: &str) -> Stated {
    let cardiomegaly = if report.contains("心脏明显增大") || report.contains("心脏增大") {
        Some(true)
    } else if report.contains("心脏大小正常") {
        Some(false)
    } else {
        None
    };
    let effusion = if report.contains("双侧胸腔积液") {
        Some("both")
    } else if report.contains("左侧胸腔积液") {
        Some("left")
    } else if report.contains("右侧胸腔积液") {
        Some("right")
    } else if report.contains("未见胸腔积液") {
        Some("none")
    } else {
        None
    };
    Stated {
        cardiomegaly,
        effusion,
    }
}

/// Whether `hypothesis` states every finding of `reference`, and nothing else about them.
pub fn agrees(hypothesis: &str, reference: &str) -> bool {
    let (h, r) = (stated(hypothesis), stated(reference));
    r.cardiomegaly.is_some() && r.effusion.is_some() && h == r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_synthetic_wording() {
        let r = "心脏明显增大，心胸比例增大。双肺野清晰，未见局灶性实变或气胸。左侧胸腔积液，左侧肋膈角变钝。印象：心脏增大，左侧胸腔积液。";
        assert_eq!(
            stated(r),
            Stated {
                cardiomegaly: Some(true),
                effusion: Some("left")
            }
        );
        let n = "心脏大小正常。双肺野清晰，未见局灶性实变或气胸。未见胸腔积液。印象：心肺未见明显异常。";
        assert!(agrees(n, n));
        assert!(!agrees(n, r));
        assert!(!agrees("双肺野清晰。", n), "unstated findings are wrong");
    }
}
