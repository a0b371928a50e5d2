//! Report-generation metrics with the conventions of R2Gen-style papers: pycocoevalcap's corpus
//! BLEU-1..4 (closest reference length), ROUGE-L (β = 1.2) and CIDEr-D, on a defined tokenization.
//!
//! References: pycocoevalcap `bleu/bleu_scorer.py` (BleuScorer, option "closest", `tiny = 1e-15`,
//! `small = 1e-9`), `rouge/rouge.py` (LCS F-measure, β = 1.2, best precision and best recall over
//! the references), `cider/cider_scorer.py` (CIDEr-D: n = 1..4 tf-idf vectors with document
//! frequencies from the references, idf `log(N) − log(max(1, df))`, clipped hypothesis weights,
//! length penalty `exp(−δ²/2σ²)` with σ = 6 where δ is the difference of the *bigram* counts, × 10).
//! Parity fixtures: scripts/make_metric_fixtures.py (pycocoevalcap from PyPI).
//!
//! Tokenization (both the fixtures and xrayglm use it): for Chinese every CJK character is a
//! token, every run of ASCII letters / digits (with `.` inside numbers, e.g. `2.5`) is a token, and
//! every other non-space character (punctuation, full-width marks) is a token of its own; English
//! is lower-cased with the same rule (so words, numbers and punctuation marks).

use std::collections::HashMap;

/// Report language of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lang {
    #[default]
    Zh,
    En,
}

impl Lang {
    /// The report language of a `sample.language` setting.
    pub fn of(language: crate::data::sample::Language) -> Self {
        match language {
            crate::data::sample::Language::English => Lang::En,
            _ => Lang::Zh,
        }
    }

    /// `zh` or `en`, as files and flags write it.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }
}

/// Split a report into metric tokens (see the module documentation).
pub fn tokenize(text: &str, lang: Lang) -> Vec<String> {
    let text = match lang {
        Lang::En => text.to_lowercase(),
        Lang::Zh => text.to_string(),
    };
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || (chars[i] == '.'
                        && chars[i - 1].is_ascii_digit()
                        && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())))
            {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

type Ngram<'a> = &'a [String];

/// Counts of every n-gram of orders 1..=n.
fn ngram_counts<T: Eq + std::hash::Hash>(words: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut counts = HashMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU-1..4 as pycocoevalcap's `Bleu(4)`: clipped n-gram matches and guesses summed over
/// the corpus, BLEU-k the geometric mean of the first k precisions, one brevity penalty from the
/// summed hypothesis length and the summed closest reference lengths (ties → the shorter).
pub fn bleu(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> [f64; 4] {
    const N: usize = 4;
    let (tiny, small) = (1e-15, 1e-9);
    let (mut testlen, mut reflen) = (0usize, 0usize);
    let mut guess = [0usize; N];
    let mut correct = [0usize; N];
    for (h, rs) in hyps.iter().zip(refs) {
        let mut maxcounts: HashMap<Ngram<'_>, usize> = HashMap::new();
        for r in rs {
            for (g, c) in ngram_counts(r, N) {
                let e = maxcounts.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let tl = h.len();
        testlen += tl;
        reflen += rs
            .iter()
            .map(|r| r.len())
            .min_by_key(|&l| (l.abs_diff(tl), l))
            .unwrap_or(0);
        for (k, g) in guess.iter_mut().enumerate() {
            *g += (tl + 1).saturating_sub(k + 1);
        }
        for (g, c) in ngram_counts(h, N) {
            correct[g.len() - 1] += c.min(maxcounts.get(g).copied().unwrap_or(0));
        }
    }
    let mut out = [0.0; N];
    let mut prod = 1.0;
    for k in 0..N {
        prod *= (correct[k] as f64 + tiny) / (guess[k] as f64 + small);
        out[k] = prod.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (testlen as f64 + tiny) / (reflen as f64 + small);
    if ratio < 1.0 {
        for v in &mut out {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// pycocoevalcap splits on single spaces, so an empty report is one empty token.
fn coco_words(t: &[String]) -> Vec<String> {
    if t.is_empty() {
        vec![String::new()]
    } else {
        t.to_vec()
    }
}

/// Mean ROUGE-L over the pairs (pycocoevalcap `Rouge`, β = 1.2).
pub fn rouge_l(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    const BETA: f64 = 1.2;
    let scores: Vec<f64> = hyps
        .iter()
        .zip(refs)
        .map(|(h, rs)| {
            let h = coco_words(h);
            let (mut p, mut r) = (0f64, 0f64);
            for rf in rs {
                let rf = coco_words(rf);
                let l = lcs(&rf, &h) as f64;
                p = p.max(l / h.len() as f64);
                r = r.max(l / rf.len() as f64);
            }
            if p != 0.0 && r != 0.0 {
                (1.0 + BETA * BETA) * p * r / (r + BETA * BETA * p)
            } else {
                0.0
            }
        })
        .collect();
    mean(&scores)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// tf-idf vectors per n-gram order, their norms, and the bigram count (pycocoevalcap's "length").
/// Ordered maps: the float sums run in one fixed order, so a score is the same bits in every
/// process (a `HashMap`'s order changes from run to run).
struct CiderVecs<'a> {
    w: [std::collections::BTreeMap<Ngram<'a>, f64>; 4],
    norm: [f64; 4],
    length: f64,
}

impl<'a> CiderVecs<'a> {
    fn new(words: &'a [String], df: &dyn Fn(Ngram<'_>) -> f64, ref_len: f64) -> Self {
        let mut v = Self {
            w: Default::default(),
            norm: [0.0; 4],
            length: 0.0,
        };
        let mut counts: Vec<(Ngram<'a>, usize)> = ngram_counts(words, 4).into_iter().collect();
        counts.sort_unstable();
        for (g, tf) in counts {
            let d = df(g).max(1.0).ln();
            let n = g.len() - 1;
            let x = tf as f64 * (ref_len - d);
            v.norm[n] += x * x;
            v.w[n].insert(g, x);
            if n == 1 {
                v.length += tf as f64;
            }
        }
        for x in &mut v.norm {
            *x = x.sqrt();
        }
        v
    }
}

/// Corpus CIDEr-D (pycocoevalcap `Cider`).
pub fn cider_d(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> f64 {
    let mut df: HashMap<Ngram<'_>, f64> = HashMap::new();
    for rs in refs {
        for g in distinct_ngrams(rs) {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (refs.len() as f64).ln();
    let lookup = |g: Ngram<'_>| df.get(g).copied().unwrap_or(0.0);
    let scores: Vec<f64> = hyps
        .iter()
        .zip(refs)
        .map(|(h, rs)| cider_one(h, rs, &lookup, ref_len))
        .collect();
    mean(&scores)
}

/// The n-grams (orders 1..=4) of one item's references, each once.
fn distinct_ngrams(rs: &[Vec<String>]) -> Vec<Ngram<'_>> {
    let mut seen: Vec<Ngram<'_>> = rs
        .iter()
        .flat_map(|r| ngram_counts(r, 4).into_keys())
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// CIDEr-D of one hypothesis against its references, with document frequencies `df` over a
/// corpus of `exp(ref_len)` items.
fn cider_one(h: &[String], rs: &[Vec<String>], df: &dyn Fn(Ngram<'_>) -> f64, ref_len: f64) -> f64 {
    const N: usize = 4;
    const SIGMA: f64 = 6.0;
    let vh = CiderVecs::new(h, df, ref_len);
    let mut score = [0.0; N];
    for r in rs {
        let vr = CiderVecs::new(r, df, ref_len);
        let delta = vh.length - vr.length;
        for (n, sn) in score.iter_mut().enumerate() {
            let mut val = 0.0;
            for (g, &x) in &vh.w[n] {
                let y = vr.w[n].get(g).copied().unwrap_or(0.0);
                val += x.min(y) * y;
            }
            if vh.norm[n] != 0.0 && vr.norm[n] != 0.0 {
                val /= vh.norm[n] * vr.norm[n];
            }
            *sn += val * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
        }
    }
    mean(&score) / rs.len() as f64 * 10.0
}

/// CIDEr-D's document frequencies fixed on a reference corpus (a training set's reports), so
/// that single reports can be scored: [`cider_d`] of a corpus takes them from its own references.
pub struct CiderDf {
    df: HashMap<Vec<String>, f64>,
    ref_len: f64,
}

impl CiderDf {
    /// `refs`: each item's references (tokenized).
    pub fn new(refs: &[Vec<Vec<String>>]) -> Self {
        let mut df: HashMap<Vec<String>, f64> = HashMap::new();
        for rs in refs {
            for g in distinct_ngrams(rs) {
                *df.entry(g.to_vec()).or_insert(0.0) += 1.0;
            }
        }
        Self {
            df,
            ref_len: (refs.len().max(1) as f64).ln(),
        }
    }

    /// CIDEr-D of one hypothesis against its references.
    pub fn score(&self, h: &[String], rs: &[Vec<String>]) -> f64 {
        let lookup = |g: Ngram<'_>| self.df.get(g).copied().unwrap_or(0.0);
        cider_one(h, rs, &lookup, self.ref_len)
    }
}

/// Python's `round(x, digits)`: correctly rounded from the exact binary value, ties to even
/// (as Rust's fixed-precision formatting does).
pub fn py_round(x: f64, digits: usize) -> f64 {
    format!("{x:.digits$}").parse().unwrap_or(x)
}

/// NLTK `sentence_bleu([list(reference)], list(hypothesis), smoothing_function=method3)`: BLEU-4
/// over characters (spaces and punctuation included, as ChatGLM's and LLaMA-Factory's evaluation
/// pass `list(str)`), uniform weights, NIST geometric smoothing of zero precisions
/// (`1 / (2^k · count)`, k = 1, 2, … over the orders without a match), 0 without any matching
/// character, brevity penalty `exp(1 − r/c)` when the hypothesis is not longer. In [0, 1].
pub fn nltk_char_bleu4(hypothesis: &str, reference: &str) -> f64 {
    let h: Vec<char> = hypothesis.chars().collect();
    let r: Vec<char> = reference.chars().collect();
    let mut logs = 0.0;
    let mut k = 1;
    let (hc, rc) = (ngram_counts(&h, 4), ngram_counts(&r, 4));
    for n in 1..=4usize {
        let of_order = hc.iter().filter(|(g, _)| g.len() == n);
        let num: usize = of_order
            .clone()
            .map(|(g, &c)| c.min(rc.get(g).copied().unwrap_or(0)))
            .sum();
        let den = of_order.map(|(_, &c)| c).sum::<usize>().max(1);
        if n == 1 && num == 0 {
            return 0.0;
        }
        let p = if num == 0 {
            let v = 1.0 / (2f64.powi(k) * den as f64);
            k += 1;
            v
        } else {
            num as f64 / den as f64
        };
        logs += 0.25 * p.ln();
    }
    let (c, rl) = (h.len() as f64, r.len() as f64);
    let bp = if c > rl {
        1.0
    } else if c == 0.0 {
        0.0
    } else {
        (1.0 - rl / c).exp()
    };
    bp * logs.exp()
}

/// ChatGLM / LLaMA-Factory "bleu-4": the mean over samples of `round(100 · nltk_char_bleu4, 4)`.
pub fn chatglm_bleu4(pairs: &[(String, String)]) -> f64 {
    let v: Vec<f64> = pairs
        .iter()
        .map(|(h, r)| py_round(100.0 * nltk_char_bleu4(h, r), 4))
        .collect();
    mean(&v)
}

/// Words as Python jieba 0.42's `jieba.cut(text)` (default mode, HMM on) gives them: jieba-rs,
/// with its one difference undone. A run of ASCII letters, digits and `.%+#&_-` is cut by
/// Python's HMM step with `([a-zA-Z0-9]+(?:\.\d+)?%?)` (matches and what lies between them are
/// the words: `2nd-3rd` → `2nd` `-` `3rd`, `andVpumona.7` and `12.5%` whole, `3.5cm` → `3.5`
/// `cm`); jieba-rs's copy of that pattern lacks the backslash before the dot, so it keeps `3-5`
/// and `2nd-3` together. Such runs are cut again here the Python way (equal on all 6,423
/// OpenI-zh and OpenI-en reports and the fixtures' edge cases); dictionary words stay whole.
pub fn jieba_words(text: &str) -> Vec<String> {
    static JIEBA: std::sync::OnceLock<jieba_rs::Jieba> = std::sync::OnceLock::new();
    static SKIP: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let j = JIEBA.get_or_init(jieba_rs::Jieba::new);
    let skip = SKIP
        .get_or_init(|| regex::Regex::new(r"[a-zA-Z0-9]+(?:\.\d+)?%?").expect("a valid pattern"));
    let ascii_run = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".%+#&_-".contains(c))
    };
    let mut out = Vec::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut Vec<String>| {
        let mut at = 0;
        for m in skip.find_iter(run) {
            if m.start() > at {
                out.push(run[at..m.start()].to_string());
            }
            out.push(m.as_str().to_string());
            at = m.end();
        }
        if at < run.len() {
            out.push(run[at..].to_string());
        }
        run.clear();
    };
    for t in j.cut(text, true) {
        // A dictionary word ("AT&T", "c++") is the DAG's choice in both implementations.
        if ascii_run(t) && !(t.len() > 1 && j.has_word(t)) {
            run.push_str(t);
        } else {
            flush(&mut run, &mut out);
            out.push(t.to_string());
        }
    }
    flush(&mut run, &mut out);
    out
}

/// rouge-chinese 1.0.3 `Rouge.cut_sent`: sentence breaks after 。！？? (not before a closing
/// quote), six dots, two ellipses, and a closing quote after an end mark; then right-stripped and
/// split on newlines.
fn cut_sent(para: &str) -> Vec<String> {
    use regex::Regex;
    static RES: std::sync::OnceLock<[Regex; 4]> = std::sync::OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            Regex::new(r"([。！？\?])([^”’])").unwrap(),
            Regex::new(r"(\.{6})([^”’])").unwrap(),
            Regex::new(r"(…{2})([^”’])").unwrap(),
            Regex::new(r"([。！？\?][”’])([^，。！？\?])").unwrap(),
        ]
    });
    let mut p = para.to_string();
    for re in res {
        p = re.replace_all(&p, "${1}\n${2}").into_owned();
    }
    p.trim_end().split('\n').map(str::to_string).collect()
}

/// rouge-chinese's words of a space-joined text: sentences (non-empty), each re-joined on single
/// spaces, split on " ".
fn rouge_words(joined: &str) -> Vec<String> {
    cut_sent(joined)
        .into_iter()
        .filter(|s| !s.is_empty())
        .flat_map(|s| {
            s.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .split(' ')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn f1(overlap: f64, hyp: f64, reference: f64) -> f64 {
    let p = if hyp == 0.0 { 0.0 } else { overlap / hyp };
    let r = if reference == 0.0 {
        0.0
    } else {
        overlap / reference
    };
    2.0 * ((p * r) / (p + r + 1e-8))
}

/// LLaMA-Factory's ROUGE-1/2/L F of one pair (in [0, 1]): jieba words joined by spaces, rouge-chinese
/// `Rouge().get_scores` (ROUGE-N over *distinct* n-grams, ROUGE-L the LCS of the word sequences);
/// 0 for all three when either side has no words.
pub fn rouge_chinese(hypothesis: &str, reference: &str) -> [f64; 3] {
    let (h, r) = (
        jieba_words(hypothesis).join(" "),
        jieba_words(reference).join(" "),
    );
    if h.split_whitespace().next().is_none() || r.split_whitespace().next().is_none() {
        return [0.0; 3];
    }
    let (hw, rw) = (rouge_words(&h), rouge_words(&r));
    let distinct = |w: &[String], n: usize| -> std::collections::HashSet<Vec<String>> {
        w.windows(n).map(|g| g.to_vec()).collect()
    };
    let mut out = [0.0; 3];
    for n in 1..=2 {
        let (a, b) = (distinct(&hw, n), distinct(&rw, n));
        let overlap = a.intersection(&b).count();
        out[n - 1] = f1(overlap as f64, a.len() as f64, b.len() as f64);
    }
    out[2] = f1(lcs(&rw, &hw) as f64, hw.len() as f64, rw.len() as f64);
    out
}

/// ChatGLM / LLaMA-Factory `rouge-1`, `rouge-2`, `rouge-l`: means of `round(100 · F, 4)`.
pub fn chatglm_rouge(pairs: &[(String, String)]) -> [f64; 3] {
    let mut sums = [Vec::new(), Vec::new(), Vec::new()];
    for (h, r) in pairs {
        for (k, v) in rouge_chinese(h, r).into_iter().enumerate() {
            sums[k].push(py_round(100.0 * v, 4));
        }
    }
    [mean(&sums[0]), mean(&sums[1]), mean(&sums[2])]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizes_characters_words_numbers_and_marks() {
        assert_eq!(
            tokenize("心影不大，T12椎体 2.5cm。", Lang::Zh),
            ["心", "影", "不", "大", "，", "T12", "椎", "体", "2.5cm", "。"]
        );
        assert_eq!(
            tokenize("No acute disease. Heart size 2.5.", Lang::En),
            ["no", "acute", "disease", ".", "heart", "size", "2.5", "."]
        );
    }

    #[test]
    fn identical_reports_score_one() {
        let t = tokenize("双肺纹理清晰，心影大小正常，未见胸腔积液。", Lang::Zh);
        let b = bleu(std::slice::from_ref(&t), &[vec![t.clone()]]);
        assert!(b.iter().all(|v| (v - 1.0).abs() < 1e-9), "{b:?}");
        assert!((rouge_l(std::slice::from_ref(&t), &[vec![t.clone()]]) - 1.0).abs() < 1e-12);
    }
}
