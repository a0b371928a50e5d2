//! What the server counts, and `GET /metrics` in the Prometheus text exposition format (0.0.4):
//! requests by status, prompt and reply tokens, queue depth, rows decoding, key/value cache
//! bytes, the rows of each decoding step, and time to first token / between tokens / whole
//! request, per served model where the model matters.
//!
//! The engine thread records tokens and times as it decodes (so a reply's numbers are the same
//! whichever endpoint asked for it); the API records each answer's status. Histograms keep
//! per-bucket counts and are written cumulatively, as the format wants.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::engine::Finish;

/// Bucket upper bounds for latencies, seconds.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Bucket upper bounds for the rows of a decoding step.
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A Prometheus histogram: counts per bucket (the last one is `+Inf`), their sum and count.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, x: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| x <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += x;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `name_bucket{labels,le=…}` lines (cumulative), `name_sum` and `name_count`.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
        }
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {acc}", braces(labels));
    }
}

/// One served model's numbers.
#[derive(Debug, Clone)]
struct PerModel {
    prompt_tokens: u64,
    generation_tokens: u64,
    finished: BTreeMap<&'static str, u64>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl Default for PerModel {
    fn default() -> Self {
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            finished: BTreeMap::new(),
            ttft: Histogram::new(SECONDS),
            itl: Histogram::new(SECONDS),
            e2e: Histogram::new(SECONDS),
        }
    }
}

#[derive(Debug)]
struct Inner {
    models: Vec<PerModel>,
    /// Answers of the API by (model, status); a request naming no served model counts under
    /// `None` (its name is the client's, not a label).
    requests: BTreeMap<(Option<usize>, u16), u64>,
    step_rows: Histogram,
}

/// The server's metrics (shared by the engine thread and the HTTP tasks).
#[derive(Debug)]
pub struct Metrics {
    names: Vec<String>,
    inner: Mutex<Inner>,
}

/// The engine's instantaneous numbers, read when `/metrics` is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub queued: usize,
    pub running: usize,
    pub cache_bytes: usize,
    pub steps: usize,
    pub prefill_chunks: usize,
    pub prompt_cache: CacheGauges,
    pub image_cache: CacheGauges,
}

/// A cache's size and how often it answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheGauges {
    pub bytes: usize,
    pub hits: usize,
    pub misses: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Metrics {
    /// Metrics for the served models, named as `/v1/models` names them.
    pub fn new(names: Vec<String>) -> Self {
        let inner = Inner {
            models: vec![PerModel::default(); names.len()],
            requests: BTreeMap::new(),
            step_rows: Histogram::new(ROWS),
        };
        Self {
            names,
            inner: Mutex::new(inner),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn with_model(&self, m: usize, f: impl FnOnce(&mut PerModel)) {
        self.with(|i| {
            if let Some(p) = i.models.get_mut(m) {
                f(p)
            }
        })
    }

    /// An API answer with its HTTP status (for model `m` when the request named a served one).
    pub fn request(&self, m: Option<usize>, status: u16) {
        let m = m.filter(|&m| m < self.names.len());
        self.with(|i| *i.requests.entry((m, status)).or_default() += 1);
    }

    /// A reply's first token, `secs` after the request arrived.
    pub fn first_token(&self, m: usize, secs: f64) {
        self.with_model(m, |p| p.ttft.observe(secs));
    }

    /// A reply's next token, `secs` after its previous one.
    pub fn next_token(&self, m: usize, secs: f64) {
        self.with_model(m, |p| p.itl.observe(secs));
    }

    /// A reply finished: its tokens and its time from arrival to the end.
    pub fn finished(&self, m: usize, prompt: usize, completion: usize, secs: f64, f: Finish) {
        self.with_model(m, |p| {
            p.prompt_tokens += prompt as u64;
            p.generation_tokens += completion as u64;
            *p.finished.entry(f.as_str()).or_default() += 1;
            p.e2e.observe(secs);
        });
    }

    /// A decoding step over `rows` rows.
    pub fn step(&self, rows: usize) {
        self.with(|i| i.step_rows.observe(rows as f64));
    }

    /// The exposition: `# HELP`, `# TYPE` and the samples of every metric.
    pub fn render(&self, g: Gauges) -> String {
        let inner = self.with(|i| (i.models.clone(), i.requests.clone(), i.step_rows.clone()));
        let (models, requests, step_rows) = inner;
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        let model = |m: usize| format!("model=\"{}\"", escape(&self.names[m]));

        head(&mut out, "xrayglm_requests_total", "counter",
             "Chat completion requests answered, by served model and HTTP status (model \"\": none of the served models).");
        for ((m, status), n) in &requests {
            let name = m.map(|m| escape(&self.names[m])).unwrap_or_default();
            let _ = writeln!(
                out,
                "xrayglm_requests_total{{model=\"{name}\",status=\"{status}\"}} {n}"
            );
        }
        for (name, help, count) in [
            (
                "xrayglm_prompt_tokens_total",
                "Prompt positions of finished replies (image slots included).",
                (|p: &PerModel| p.prompt_tokens) as fn(&PerModel) -> u64,
            ),
            (
                "xrayglm_generation_tokens_total",
                "Reply tokens of finished replies.",
                |p: &PerModel| p.generation_tokens,
            ),
        ] {
            head(&mut out, name, "counter", help);
            for (m, p) in models.iter().enumerate() {
                let _ = writeln!(out, "{name}{{{}}} {}", model(m), count(p));
            }
        }
        head(
            &mut out,
            "xrayglm_replies_finished_total",
            "counter",
            "Replies that ended, by why (stop: end token or a stop string; length: a limit).",
        );
        for (m, p) in models.iter().enumerate() {
            for reason in [Finish::Stop.as_str(), Finish::Length.as_str()] {
                let n = p.finished.get(reason).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "xrayglm_replies_finished_total{{{},reason=\"{reason}\"}} {n}",
                    model(m)
                );
            }
        }
        for (name, help, pick) in [
            (
                "xrayglm_time_to_first_token_seconds",
                "From the request's arrival at the server to its first reply token.",
                (|p: &PerModel| &p.ttft) as fn(&PerModel) -> &Histogram,
            ),
            (
                "xrayglm_inter_token_latency_seconds",
                "Between consecutive reply tokens of one reply.",
                |p: &PerModel| &p.itl,
            ),
            (
                "xrayglm_e2e_request_latency_seconds",
                "From the request's arrival at the server to its reply's end.",
                |p: &PerModel| &p.e2e,
            ),
        ] {
            head(&mut out, name, "histogram", help);
            for (m, p) in models.iter().enumerate() {
                pick(p).write(&mut out, name, &model(m));
            }
        }
        head(
            &mut out,
            "xrayglm_batch_rows",
            "histogram",
            "Rows decoded together in one decoding step.",
        );
        step_rows.write(&mut out, "xrayglm_batch_rows", "");
        for (name, help, v) in [
            (
                "xrayglm_queue_depth",
                "Requests waiting to be admitted.",
                g.queued,
            ),
            ("xrayglm_running_rows", "Replies being decoded.", g.running),
            (
                "xrayglm_kv_cache_bytes",
                "Bytes held by the key/value caches of the rows decoding.",
                g.cache_bytes,
            ),
        ] {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        head(
            &mut out,
            "xrayglm_decode_steps_total",
            "counter",
            "Decoding steps run.",
        );
        let _ = writeln!(out, "xrayglm_decode_steps_total {}", g.steps);
        head(
            &mut out,
            "xrayglm_prefill_chunks_total",
            "counter",
            "Prefill passes run: a prefill split over steps (beyond the step's token budget) counts each part.",
        );
        let _ = writeln!(out, "xrayglm_prefill_chunks_total {}", g.prefill_chunks);
        for (cache, what, c) in [
            (
                "prompt",
                "whole prompts' keys, values and first logits (a prompt asked again skips its prefill)",
                g.prompt_cache,
            ),
            (
                "image",
                "film embeddings by content (a film sent again is not encoded again)",
                g.image_cache,
            ),
        ] {
            let name = format!("xrayglm_{cache}_cache_bytes");
            head(&mut out, &name, "gauge", &format!("Bytes held by the cache of {what}."));
            let _ = writeln!(out, "{name} {}", c.bytes);
            for (kind, n, found) in [("hits", c.hits, "found"), ("misses", c.misses, "missed")] {
                let name = format!("xrayglm_{cache}_cache_{kind}_total");
                let help = format!("Lookups in the {cache} cache that {found} their entry.");
                head(&mut out, &name, "counter", &help);
                let _ = writeln!(out, "{name} {n}");
            }
        }
        out
    }
}

/// A label value as the format wants it: backslash, double quote and line feed escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::new(vec!["base".into(), "a\"b\\c\nd".into()]);
        for x in [0.001, 0.02, 0.02, 7.0, 1e6] {
            m.first_token(1, x);
        }
        m.finished(0, 40, 12, 0.3, Finish::Stop);
        m.request(Some(0), 200);
        m.request(Some(9), 404);
        m.step(3);
        let text = m.render(Gauges {
            queued: 2,
            running: 1,
            cache_bytes: 1024,
            steps: 5,
            prefill_chunks: 6,
            prompt_cache: CacheGauges {
                bytes: 77,
                hits: 2,
                misses: 3,
            },
            image_cache: CacheGauges::default(),
        });
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let q = "model=\"a\\\"b\\\\c\\nd\"";
        assert_eq!(
            line(&format!(
                "xrayglm_time_to_first_token_seconds_bucket{{{q},le=\"0.005\"}}"
            )),
            "1"
        );
        assert_eq!(
            line(&format!(
                "xrayglm_time_to_first_token_seconds_bucket{{{q},le=\"0.025\"}}"
            )),
            "3"
        );
        assert_eq!(
            line(&format!(
                "xrayglm_time_to_first_token_seconds_bucket{{{q},le=\"10\"}}"
            )),
            "4"
        );
        assert_eq!(
            line(&format!(
                "xrayglm_time_to_first_token_seconds_bucket{{{q},le=\"+Inf\"}}"
            )),
            "5"
        );
        assert_eq!(
            line(&format!("xrayglm_time_to_first_token_seconds_count{{{q}}}")),
            "5"
        );
        assert_eq!(line("xrayglm_prompt_tokens_total{model=\"base\"}"), "40");
        assert_eq!(
            line("xrayglm_generation_tokens_total{model=\"base\"}"),
            "12"
        );
        assert_eq!(
            line("xrayglm_replies_finished_total{model=\"base\",reason=\"stop\"}"),
            "1"
        );
        assert_eq!(
            line("xrayglm_requests_total{model=\"base\",status=\"200\"}"),
            "1"
        );
        assert_eq!(
            line("xrayglm_requests_total{model=\"\",status=\"404\"}"),
            "1"
        );
        assert_eq!(line("xrayglm_batch_rows_bucket{le=\"2\"}"), "0");
        assert_eq!(line("xrayglm_batch_rows_bucket{le=\"4\"}"), "1");
        assert_eq!(line("xrayglm_batch_rows_count"), "1");
        assert_eq!(line("xrayglm_queue_depth"), "2");
        assert_eq!(line("xrayglm_kv_cache_bytes"), "1024");
        assert_eq!(line("xrayglm_prefill_chunks_total"), "6");
        assert_eq!(line("xrayglm_prompt_cache_bytes"), "77");
        assert_eq!(line("xrayglm_prompt_cache_hits_total"), "2");
        assert_eq!(line("xrayglm_prompt_cache_misses_total"), "3");
        assert_eq!(line("xrayglm_image_cache_hits_total"), "0");
    }
}
