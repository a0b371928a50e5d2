//! Report metrics against pycocoevalcap (fixtures from scripts/make_metric_fixtures.py): corpus
//! BLEU-1..4, ROUGE-L and CIDEr-D equal to 1e-6 on Chinese and English corpora with identical,
//! empty, unrelated, truncated and shuffled hypotheses; NLTK's character BLEU-4 with smoothing
//! method3 per pair and ChatGLM's rounded ×100 mean; the tokenization equals the script's.

use xrayglm::eval::metrics::{
    bleu, chatglm_bleu4, cider_d, nltk_char_bleu4, rouge_l, tokenize, Lang,
};

#[test]
fn coco_metrics_equal_pycocoevalcap() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/coco.json"
    );
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let lang = if c["lang"] == "en" {
            Lang::En
        } else {
            Lang::Zh
        };
        let hyps: Vec<Vec<String>> = strs(&c["hyps"]).iter().map(|h| tokenize(h, lang)).collect();
        let refs: Vec<Vec<Vec<String>>> = c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rs| strs(rs).iter().map(|r| tokenize(r, lang)).collect())
            .collect();
        assert_eq!(hyps[0], strs(&c["tokens_first_hyp"]), "{name}: tokens");
        let close = |got: f64, want: &serde_json::Value, what: &str| {
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6,
                "{name} {what}: {got} vs pycocoevalcap {want}"
            );
        };
        let b = bleu(&hyps, &refs);
        for k in 0..4 {
            close(b[k], &c["bleu"][k], &format!("BLEU-{}", k + 1));
        }
        close(rouge_l(&hyps, &refs), &c["rouge_l"], "ROUGE-L");
        close(cider_d(&hyps, &refs), &c["cider"], "CIDEr-D");
        // ChatGLM-style: characters, first reference, per sample.
        let pairs: Vec<(String, String)> = strs(&c["hyps"])
            .into_iter()
            .zip(c["refs"].as_array().unwrap())
            .map(|(h, rs)| (h, rs[0].as_str().unwrap().to_string()))
            .collect();
        for (i, (h, r)) in pairs.iter().enumerate() {
            close(
                nltk_char_bleu4(h, r),
                &c["nltk_char_bleu4"][i],
                &format!("nltk BLEU-4 of pair {i}"),
            );
        }
        close(chatglm_bleu4(&pairs), &c["chatglm_bleu4"], "ChatGLM bleu-4");
    }
}
