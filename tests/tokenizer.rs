//! ChatGLM-6B tokenizer parity with Python sentencepiece (fixtures from
//! scripts/make_tokenizer_fixtures.py) and with the reference examples in ../shared.

mod common;

use serde_json::Value;
use xrayglm::tokenizer::{ids, ChatGlmTokenizer};

#[test]
fn reference_examples_encode_and_decode_exactly() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let ex = common::read_json(&shared.join("reference/tokenizer/tokenization_examples.json"));
    let examples = ex["examples"].as_array().unwrap();
    assert!(examples.len() >= 9);
    for e in examples {
        let text = e["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            common::ints(&e["ids"]),
            "ids of {text:?}"
        );
        let pieces: Vec<String> = e["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tok.pieces(text).unwrap(), pieces, "pieces of {text:?}");
        assert_eq!(
            tok.decode(&common::ints(&e["ids"])).unwrap(),
            e["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    for (name, id) in ex["special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(name), Some(id.as_i64().unwrap()), "{name}");
    }
    assert_eq!(tok.vocab_size(), 130344);
    assert_eq!(tok.token_to_id("[gMASK]"), Some(ids::GMASK));
    assert_eq!(tok.token_to_id("<sop>"), Some(ids::SOP));
    assert_eq!(tok.token_to_id("<eop>"), Some(ids::EOP));
}

fn check_reports(tok: &ChatGlmTokenizer, shared: &std::path::Path, fx: &Value, key: &str) -> usize {
    let part = &fx[key];
    let file = shared.join(part["file"].as_str().unwrap());
    let anns = common::read_json(&file);
    let anns = anns["annotations"].as_array().unwrap();
    let expected = part["ids"].as_array().unwrap();
    assert_eq!(anns.len(), expected.len(), "{key}: record count");
    let mut mismatches = Vec::new();
    for (i, (a, want)) in anns.iter().zip(expected).enumerate() {
        assert_eq!(a["image_id"], part["image_ids"][i], "{key}: record order");
        let got = tok.encode(a["caption"].as_str().unwrap()).unwrap();
        if got != common::ints(want) {
            mismatches.push(i);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{key}: {} of {} reports differ, first {:?}",
        mismatches.len(),
        anns.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    anns.len()
}

#[test]
fn every_openi_report_matches_python_sentencepiece() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let fx: Value = serde_json::from_slice(&common::read_gz(&common::fixture(
        "tokenizer_reports.json.gz",
    )))
    .unwrap();
    assert_eq!(check_reports(&tok, &shared, &fx, "zh"), 6423);
    assert_eq!(check_reports(&tok, &shared, &fx, "en"), 6423);
}

#[test]
fn tricky_strings_match_python_sentencepiece() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let fx: Value = serde_json::from_slice(&common::read_gz(&common::fixture(
        "tokenizer_reports.json.gz",
    )))
    .unwrap();
    let mut bad = Vec::new();
    for e in fx["extra"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let want = common::ints(&e["ids"]);
        let got = tok.encode(text).unwrap();
        if got != want {
            bad.push(format!("encode {text:?}: got {got:?} want {want:?}"));
        }
        let dec = tok.decode(&want).unwrap();
        if dec != e["decoded"].as_str().unwrap() {
            bad.push(format!(
                "decode {text:?}: got {dec:?} want {:?}",
                e["decoded"]
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn saved_tokenizer_json_encodes_the_same() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = ChatGlmTokenizer::from_path(&path).unwrap();
    let fx: Value = serde_json::from_slice(&common::read_gz(&common::fixture(
        "tokenizer_reports.json.gz",
    )))
    .unwrap();
    for e in fx["extra"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        assert_eq!(
            back.encode(text).unwrap(),
            tok.encode(text).unwrap(),
            "{text:?}"
        );
        assert_eq!(
            back.decode(&common::ints(&e["ids"])).unwrap(),
            tok.decode(&common::ints(&e["ids"])).unwrap()
        );
    }
    let zh = common::read_json(&shared.join("data/Xray/openi-zh.json"));
    for a in zh["annotations"].as_array().unwrap().iter().take(500) {
        let c = a["caption"].as_str().unwrap();
        assert_eq!(back.encode(c).unwrap(), tok.encode(c).unwrap());
    }
}
