//! Records, samples, batches and the synthetic set.

mod common;

use std::path::Path;
use std::sync::Arc;

use xrayglm::data::batch::{
    epoch_order, length_grouped_order, shard_batches, Dataset, Loader, LoaderConfig, LoaderState,
    Padding, Sampler, Shard,
};
use xrayglm::data::image::ImageProcessor;
use xrayglm::data::records::{
    load_records, ImageCheck, LoadOptions, PromptPolicy, Record, Schema, FIXED_PROMPT,
    RANDOM_PROMPTS,
};
use xrayglm::data::rng::PyRandom;
use xrayglm::data::sample::{SampleBuilder, SampleConfig, IGNORE};
use xrayglm::data::synthetic;
use xrayglm::tokenizer::ChatGlmTokenizer;

#[test]
fn training_sample_equals_reference() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let ex = common::read_json(&shared.join("reference/tokenizer/tokenization_examples.json"));
    let t = &ex["training_sample_fixed_prompt"];
    let builder = SampleBuilder::new(tok, SampleConfig::default()).unwrap();
    let s = builder
        .build(t["prompt"].as_str().unwrap(), t["label"].as_str().unwrap())
        .unwrap();
    let len = t["seq_len"].as_u64().unwrap() as usize;
    assert_eq!(len, builder.config().max_seq_len());
    let (input_ids, labels) = s.padded(len, true);
    assert_eq!(input_ids, common::ints(&t["input_ids"]));
    assert_eq!(labels, common::ints(&t["labels"]));
    let (pos, block) = s.position_ids(len);
    assert_eq!(pos, common::ints(&t["position_ids"]));
    assert_eq!(block, common::ints(&t["block_position_ids"]));
    assert_eq!(
        s.image_starts,
        vec![t["pre_image"].as_u64().unwrap() as usize]
    );
    assert_eq!(s.image_starts[0] as u64, t["pre_image"].as_u64().unwrap());
    assert_eq!(
        common::ints(&t["image_slots"]),
        vec![
            s.image_starts[0] as i64,
            (s.image_starts[0] + s.image_length) as i64
        ]
    );
    assert_eq!(
        s.context_length as u64,
        t["context_length"].as_u64().unwrap()
    );
    assert_eq!(s.mask_position as u64, t["mask_position"].as_u64().unwrap());
    assert_eq!(
        s.context_length - 1,
        t["len_a_ids"].as_u64().unwrap() as usize
    );
    assert_eq!(
        s.len() - s.context_length - 2,
        t["len_b_ids"].as_u64().unwrap() as usize
    );
    assert!(!s.truncated);
}

#[test]
fn truncation_follows_reference_limits() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let cfg = SampleConfig {
        max_source_length: 40,
        max_target_length: 12,
        ..Default::default()
    };
    let b = SampleBuilder::new(tok, cfg).unwrap();
    let s = b.build(FIXED_PROMPT, &"心脏大小正常。".repeat(20)).unwrap();
    assert!(s.truncated);
    assert_eq!(s.context_length, 40); // a_ids cut to max_source_length − 1 = 39, then gMASK
    assert_eq!(s.len(), 40 + 1 + 10 + 1); // <sop> + b cut to 10 + <eop>
    assert_eq!(s.labels.iter().filter(|&&l| l != IGNORE).count(), 12);
}

#[test]
fn annotations_convert_with_fixed_and_seeded_random_prompts() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = common::five_xrays(&shared, dir.path());
    let root = shared.join("data/Xray");
    let opts = LoadOptions {
        image_root: Some(root.clone()),
        ..Default::default()
    };
    let fixed = load_records(&file, &opts).unwrap();
    assert_eq!(fixed.schema, Schema::Annotations);
    assert_eq!(fixed.records.len(), 5);
    assert!(fixed.records.iter().all(|r| r.prompt == FIXED_PROMPT));
    assert_eq!(
        fixed.records[0].images[0],
        root.join(format!("{}.png", fixed.records[0].id))
    );

    let opts = LoadOptions {
        prompt: PromptPolicy::Random { seed: 42 },
        ..opts
    };
    let random = load_records(&file, &opts).unwrap();
    let mut py = PyRandom::new(42);
    for r in &random.records {
        assert_eq!(r.prompt, *py.choice(&RANDOM_PROMPTS));
    }

    // The training list round-trips through the list schema. The films are outside its folder,
    // so the list holds absolute paths, which load only when allowed.
    let out = dir.path().join("sub/train.json");
    xrayglm::data::records::write_training_list(&out, &random.records).unwrap();
    let e = format!(
        "{:#}",
        load_records(&out, &LoadOptions::default()).unwrap_err()
    );
    assert!(e.contains("is absolute"), "{e}");
    let allowed = LoadOptions {
        allow_outside_root: true,
        ..Default::default()
    };
    let back = load_records(&out, &allowed).unwrap();
    assert_eq!(back.schema, Schema::TrainingList);
    assert_eq!(back.records.len(), 5);
    for (a, b) in random.records.iter().zip(&back.records) {
        assert_eq!((&a.prompt, &a.label), (&b.prompt, &b.label));
        assert_eq!(
            std::fs::canonicalize(&a.images[0]).unwrap(),
            std::fs::canonicalize(&b.images[0]).unwrap()
        );
    }
}

#[test]
fn full_openi_zh_without_images_names_the_first_missing_record() {
    let Some(shared) = common::shared() else {
        return;
    };
    let file = shared.join("data/Xray/openi-zh.json");
    let opts = LoadOptions {
        check_images: ImageCheck::Exists,
        ..Default::default()
    };
    let err = load_records(&file, &opts).unwrap_err().to_string();
    assert!(
        err.contains("openi-zh.json: record 0 (image_id 162_1): image"),
        "{err}"
    );
    assert!(err.contains("6417 more bad records"), "{err}");
    // With skip_bad the 5 images that are there survive.
    let loaded = load_records(
        &file,
        &LoadOptions {
            skip_bad: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(loaded.total, 6423);
    assert_eq!(loaded.records.len(), 5);
    assert_eq!(loaded.bad.len(), 6418);
}

// ---- bad input: every failure names the file and the record ----

struct Bad {
    dir: tempfile::TempDir,
}

impl Bad {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let png = synthetic_png();
        std::fs::write(dir.path().join("ok.png"), &png).unwrap();
        std::fs::write(dir.path().join("ok2.png"), &png).unwrap();
        std::fs::write(dir.path().join("empty.png"), b"").unwrap();
        std::fs::write(
            dir.path().join("corrupt.png"),
            b"\x89PNG\r\n\x1a\n garbage garbage",
        )
        .unwrap();
        Self { dir }
    }

    fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err(&self, name: &str, text: &str) -> String {
        format!(
            "{:#}",
            load_records(&self.file(name, text), &LoadOptions::default()).unwrap_err()
        )
    }
}

fn synthetic_png() -> Vec<u8> {
    common::film_png(false, 1)
}

#[test]
fn malformed_json_names_line_and_column() {
    let b = Bad::new();
    let e = b.err(
        "broken.json",
        "[\n {\"img\": \"ok.png\",\n  \"prompt\": \"p\" \"label\": \"x\"}\n]",
    );
    assert!(
        e.contains("broken.json: malformed JSON at line 3, column"),
        "{e}"
    );
}

#[test]
fn wrong_schema_is_rejected() {
    let b = Bad::new();
    let e = b.err("obj.json", r#"{"records": []}"#);
    assert!(e.contains("obj.json: wrong schema"), "{e}");
    let e = b.err("num.json", "42");
    assert!(
        e.contains("num.json: wrong schema") && e.contains("a number"),
        "{e}"
    );
    let e = b.err("ann.json", r#"{"annotations": {"image_id": "ok"}}"#);
    assert!(
        e.contains("ann.json: wrong schema: \"annotations\" is an object"),
        "{e}"
    );
    let e = b.err("items.json", r#"[["ok.png", "p", "l"]]"#);
    assert!(
        e.contains("items.json: record 0: expected an object, found a list"),
        "{e}"
    );
}

#[test]
fn missing_zero_byte_and_corrupt_images_name_the_record() {
    let b = Bad::new();
    let e = b.err("m.json", r#"[{"img":"ok.png","prompt":"p","label":"l"},{"img":"nope.png","prompt":"p","label":"l"}]"#);
    assert!(
        e.contains("m.json: record 1 (img nope.png): image") && e.contains("not found"),
        "{e}"
    );
    let e = b.err(
        "z.json",
        r#"{"annotations":[{"image_id":"empty","caption":"c"}]}"#,
    );
    assert!(
        e.contains("z.json: record 0 (image_id empty): image") && e.contains("0 bytes"),
        "{e}"
    );
    let e = b.err(
        "c.json",
        r#"{"annotations":[{"image_id":"ok","caption":"c"},{"image_id":"corrupt","caption":"c"}]}"#,
    );
    assert!(
        e.contains("c.json: record 1 (image_id corrupt): image") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn empty_or_non_string_labels_and_missing_fields_are_rejected() {
    let b = Bad::new();
    let e = b.err("e.json", r#"[{"img":"ok.png","prompt":"p","label":"  "}]"#);
    assert!(
        e.contains("e.json: record 0 (img ok.png): empty label"),
        "{e}"
    );
    let e = b.err("n.json", r#"[{"img":"ok.png","prompt":"p","label":7}]"#);
    assert!(
        e.contains("n.json: record 0 (img ok.png): field \"label\" is a number"),
        "{e}"
    );
    let e = b.err("f.json", r#"[{"img":"ok.png","prompt":"p"}]"#);
    assert!(
        e.contains("f.json: record 0 (img ok.png): missing field \"label\""),
        "{e}"
    );
    let e = b.err(
        "c.json",
        r#"{"annotations":[{"image_id":"ok","caption":""}]}"#,
    );
    assert!(
        e.contains("c.json: record 0 (image_id ok): empty caption"),
        "{e}"
    );
}

/// Each format is a declared struct: a field of the wrong type is named by its path, with what it
/// is and what was expected, and its kind says which (string, list, object).
#[test]
fn a_bad_field_is_named_by_its_path_and_kind() {
    let b = Bad::new();
    let kind_of = |name: &str, text: &str| {
        let loaded = load_records(
            &b.file(name, text),
            &LoadOptions {
                skip_bad: true,
                ..Default::default()
            },
        );
        let e = b.err(name, text);
        let kind = match loaded {
            Ok(l) => format!("{:?}", l.bad[0].kind),
            Err(_) => String::new(),
        };
        (kind, e)
    };
    let good = r#"{"img":"ok2.png","prompt":"p","label":"l"}"#;
    let (k, e) = kind_of(
        "img.json",
        &format!(r#"[{{"img":5,"prompt":"p","label":"l"}},{good}]"#),
    );
    assert_eq!(k, "NotAString");
    assert!(
        e.contains("record 0: field \"img\" is a number, expected a path or a list of paths"),
        "{e}"
    );
    let (k, e) = kind_of(
        "h.json",
        &format!(r#"[{{"img":"ok.png","prompt":"p","label":"l","history":[["q"]]}},{good}]"#),
    );
    assert_eq!(k, "NotAList");
    assert!(e.contains("field \"history[0]\""), "{e}");
    assert!(e.contains("expected a [question, answer] pair"), "{e}");
    let turn = |v: &str| format!(r#"{{"from":"gpt","value":{v}}}"#);
    let conv = |turns: &str| {
        format!(
            r#"[{{"id":"c","image":"ok.png","conversations":{turns}}},{{"id":7,"image":"ok2.png","conversations":[{{"from":"human","value":"q"}},{}]}}]"#,
            turn("\"a\"")
        )
    };
    let (k, e) = kind_of(
        "v.json",
        &conv(&format!(
            r#"[{{"from":"human","value":"q"}},{}]"#,
            turn("3")
        )),
    );
    assert_eq!(k, "NotAString");
    assert!(
        e.contains(
            "record 0 (id c): field \"conversations[1].value\" is a number, expected a string"
        ),
        "{e}"
    );
    let (k, e) = kind_of("l.json", &conv(r#""hello""#));
    assert_eq!(k, "NotAList");
    assert!(
        e.contains("field \"conversations\" is a string, expected a list"),
        "{e}"
    );
    let (k, e) = kind_of("t.json", &conv(r#"["hello"]"#));
    assert_eq!(k, "NotAnObject");
    assert!(e.contains("field \"conversations[0]\" is a string"), "{e}");
    let (k, e) = kind_of("m.json", &conv(r#"[{"value":"q"}]"#));
    assert_eq!(k, "MissingField");
    assert!(e.contains("missing field \"conversations[0].from\""), "{e}");
    // A numeric conversation id is an id.
    let loaded = load_records(
        &b.file("n.json", &conv(r#""x""#)),
        &LoadOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.records[0].id, "7");
}

#[test]
fn duplicate_ids_are_rejected() {
    let b = Bad::new();
    let e = b.err("d.json", r#"{"annotations":[{"image_id":"ok","caption":"a"},{"image_id":"ok2","caption":"b"},{"image_id":"ok","caption":"c"}]}"#);
    assert!(
        e.contains("d.json: record 2 (image_id ok): duplicate image_id, first seen at record 0"),
        "{e}"
    );
    let e = b.err(
        "l.json",
        r#"[{"img":"ok.png","prompt":"p","label":"l"},{"img":"ok.png","prompt":"p","label":"l"}]"#,
    );
    assert!(
        e.contains("l.json: record 1 (img ok.png): duplicate of record 0"),
        "{e}"
    );
}

#[test]
fn skip_bad_skips_and_counts_every_kind() {
    let b = Bad::new();
    let p = b.file(
        "mixed.json",
        r#"[{"img":"ok.png","prompt":"p","label":"good"},
            {"img":"nope.png","prompt":"p","label":"l"},
            {"img":"empty.png","prompt":"p","label":"l"},
            {"img":"corrupt.png","prompt":"p","label":"l"},
            {"img":"ok2.png","prompt":"p","label":""},
            {"img":"ok2.png","prompt":"p","label":3},
            {"img":"ok.png","prompt":"p","label":"good"},
            5,
            {"img":"ok2.png","prompt":"q","label":"also good"}]"#,
    );
    let loaded = load_records(
        &p,
        &LoadOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.total, 9);
    assert_eq!(
        loaded.records.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 8]
    );
    let kinds: Vec<String> = loaded.bad.iter().map(|b| format!("{:?}", b.kind)).collect();
    assert_eq!(
        kinds,
        [
            "MissingImage",
            "EmptyImage",
            "CorruptImage",
            "EmptyLabel",
            "NotAString",
            "DuplicateId",
            "NotAnObject"
        ]
    );
    assert!(loaded
        .bad
        .iter()
        .all(|b| b.message.starts_with(&p.display().to_string())));
    // Without skip_bad nothing is returned.
    assert!(load_records(&p, &LoadOptions::default()).is_err());
}

// ---- batches ----

fn order_padded(order: &[usize], global: usize) -> Vec<usize> {
    let mut o = order.to_vec();
    let mut i = 0;
    while !o.len().is_multiple_of(global) {
        o.push(order[i % order.len()]);
        i += 1;
    }
    o
}

#[test]
fn sharding_covers_every_sample_once_per_epoch_with_equal_steps() {
    for (n, w, bs) in [
        (23usize, 2usize, 4usize),
        (24, 4, 3),
        (7, 3, 8),
        (100, 4, 8),
    ] {
        let order = epoch_order(n, 9, 0, true);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        let per_rank: Vec<Vec<Vec<usize>>> = (0..w)
            .map(|r| {
                shard_batches(
                    &order,
                    Shard {
                        rank: r,
                        world_size: w,
                        accum: 1,
                    },
                    bs,
                    false,
                )
            })
            .collect();
        let steps = per_rank[0].len();
        assert!(
            per_rank.iter().all(|b| b.len() == steps),
            "n={n} w={w}: unequal steps"
        );
        assert!(
            per_rank.iter().flatten().all(|b| b.len() == bs),
            "n={n} w={w}: full batches only"
        );
        let mut seen: Vec<usize> = per_rank.iter().flatten().flatten().copied().collect();
        assert_eq!(seen.len(), n.div_ceil(w * bs) * w * bs);
        // Step k of rank r is the r-th slice of the k-th global batch.
        for (k, b) in per_rank[1].iter().enumerate() {
            assert_eq!(
                b,
                &order_padded(&order, w * bs)[k * w * bs + bs..k * w * bs + 2 * bs].to_vec()
            );
        }
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            (0..n).collect::<Vec<_>>(),
            "n={n} w={w}: not every sample seen"
        );
        // drop_last keeps only whole global batches, all distinct.
        let dl: Vec<usize> = (0..w)
            .flat_map(|r| {
                shard_batches(
                    &order,
                    Shard {
                        rank: r,
                        world_size: w,
                        accum: 1,
                    },
                    bs,
                    true,
                )
            })
            .flatten()
            .collect();
        assert_eq!(dl.len(), n / (w * bs) * w * bs);
    }
    assert_ne!(epoch_order(50, 1, 0, true), epoch_order(50, 1, 1, true));
    assert_eq!(epoch_order(50, 1, 3, true), epoch_order(50, 1, 3, true));
    assert_eq!(epoch_order(5, 1, 0, false), vec![0, 1, 2, 3, 4]);
}

/// A step's global batch is the same samples, cut into the same micro-batches, for every split
/// of it over ranks and accumulation — what lets a run resume on another number of ranks.
#[test]
fn every_world_size_sees_the_same_global_batches() {
    for (n, bs, global) in [
        (23usize, 2usize, 8usize),
        (50, 3, 12),
        (7, 1, 4),
        (64, 4, 16),
    ] {
        let order = epoch_order(n, 5, 0, true);
        // Micro-batch j of step k, as the ranks of a split see them.
        let steps_of = |w: usize| -> Vec<Vec<Vec<usize>>> {
            let accum = global / (w * bs);
            let per_rank: Vec<Vec<Vec<usize>>> = (0..w)
                .map(|r| {
                    let shard = Shard {
                        rank: r,
                        world_size: w,
                        accum,
                    };
                    shard_batches(&order, shard, bs, false)
                })
                .collect();
            let steps = per_rank[0].len() / accum;
            assert!(per_rank.iter().all(|b| b.len() == steps * accum));
            (0..steps)
                .map(|k| {
                    (0..w * accum)
                        .map(|j| per_rank[j % w][k * accum + j / w].clone())
                        .collect()
                })
                .collect()
        };
        let one = steps_of(1);
        assert_eq!(one.len(), n.div_ceil(global), "n={n}: whole global batches");
        assert!(one.iter().flatten().all(|m| m.len() == bs));
        for w in (2..=global / bs).filter(|w| (global / bs).is_multiple_of(*w)) {
            assert_eq!(
                steps_of(w),
                one,
                "n={n} B={bs} G={global}: {w} ranks differ"
            );
        }
    }
}

fn synthetic_dataset(dir: &Path, n: usize, shared: &Path) -> Arc<Dataset> {
    let file = synthetic::generate(dir, n, 48, 5).unwrap();
    let loaded = load_records(&file, &LoadOptions::default()).unwrap();
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(shared)).unwrap();
    let builder = SampleBuilder::new(tok, SampleConfig::default()).unwrap();
    let proc = ImageProcessor {
        size: 32,
        ..Default::default()
    };
    Arc::new(Dataset::new(loaded.records, &builder, proc, "synthetic").unwrap())
}

#[test]
fn loader_batches_pad_shard_and_resume_exactly() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic_dataset(dir.path(), 21, &shared);
    let cfg = LoaderConfig {
        batch_size: 4,
        workers: 2,
        prefetch: 3,
        seed: 3,
        ..Default::default()
    };
    let shard = Shard {
        rank: 1,
        world_size: 2,
        accum: 1,
    };
    let loader = Loader::new(Arc::clone(&ds), cfg.clone(), shard, LoaderState::default()).unwrap();
    let per_epoch = loader.batches_per_epoch();
    assert_eq!(per_epoch, 3); // 21 padded to 24 = 3 global batches of 2 × 4
    let first: Vec<_> = loader.take(7).map(|b| b.unwrap()).collect();
    assert_eq!(first[2].batch_size, 4);
    assert_eq!(
        first[2].state_after,
        LoaderState {
            epoch: 1,
            offset: 0
        }
    );
    assert_eq!(
        first[4].state_after,
        LoaderState {
            epoch: 1,
            offset: 2
        }
    );
    for b in &first {
        let longest = b
            .indices
            .iter()
            .map(|&i| ds.samples[i].len())
            .max()
            .unwrap();
        assert_eq!(b.seq_len, longest, "dynamic padding");
        assert_eq!(b.input_ids.len(), b.batch_size * b.seq_len);
        assert_eq!(b.position_ids.len(), b.batch_size * 2 * b.seq_len);
        assert_eq!(b.images.len(), b.batch_size * 3 * 32 * 32);
        for (k, &i) in b.indices.iter().enumerate() {
            let s = &ds.samples[i];
            let row = &b.input_ids[k * b.seq_len..(k + 1) * b.seq_len];
            assert_eq!(&row[..s.len()], &s.input_ids[..]);
            assert!(row[s.len()..].iter().all(|&t| t == 3));
            let labels = &b.labels[k * b.seq_len..(k + 1) * b.seq_len];
            assert!(labels[s.len()..].iter().all(|&t| t == IGNORE));
            assert_eq!(b.context_lengths[k], s.context_length as i64);
            let want = ds.processor.process_file(&ds.records[i].images[0]).unwrap();
            assert_eq!(&b.images[k * 3 * 32 * 32..(k + 1) * 3 * 32 * 32], &want[..]);
        }
    }
    // Resume from the state after batch 4: the same batches follow.
    let resumed = Loader::new(Arc::clone(&ds), cfg.clone(), shard, first[3].state_after).unwrap();
    let again: Vec<_> = resumed.take(3).map(|b| b.unwrap()).collect();
    for (a, b) in again.iter().zip(&first[4..]) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.input_ids, b.input_ids);
        assert_eq!(a.state_after, b.state_after);
    }
    // Both ranks together see every sample in epoch 0.
    let mut all: Vec<usize> = (0..2)
        .flat_map(|r| {
            let l = Loader::new(
                Arc::clone(&ds),
                cfg.clone(),
                Shard {
                    rank: r,
                    world_size: 2,
                    accum: 1,
                },
                LoaderState::default(),
            )
            .unwrap();
            l.take(per_epoch)
                .flat_map(|b| b.unwrap().indices)
                .collect::<Vec<_>>()
        })
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all, (0..21).collect::<Vec<_>>());
    // Fixed padding is the reference's 320.
    let fixed = LoaderConfig {
        padding: Padding::Fixed,
        ..cfg
    };
    let b = Loader::new(ds, fixed, Shard::default(), LoaderState::default())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(b.seq_len, 320);
    let t = b.to_tensors(tch::Device::Cpu);
    assert_eq!(t.input_ids.size(), vec![4, 320]);
    assert_eq!(t.position_ids.size(), vec![4, 2, 320]);
    assert_eq!(t.images.size(), vec![4, 3, 32, 32]);
}

#[test]
fn loader_reports_an_image_that_vanished_after_validation() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic_dataset(dir.path(), 4, &shared);
    std::fs::write(&ds.records[2].images[0], b"not a png").unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: false,
        workers: 1,
        ..Default::default()
    };
    let err = Loader::new(ds, cfg, Shard::default(), LoaderState::default())
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("record 2 (synth_00002)") && msg.contains("synth_00002.png"),
        "{msg}"
    );
}

// ---- synthetic set ----

#[test]
fn synthetic_set_is_deterministic_and_findings_are_visible() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let fa = synthetic::generate(a.path(), 12, 64, 77).unwrap();
    let fb = synthetic::generate(b.path(), 12, 64, 77).unwrap();
    assert_eq!(std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    for i in 0..12 {
        let name = format!("Xray/synth_{i:05}.png");
        assert_eq!(
            std::fs::read(a.path().join(&name)).unwrap(),
            std::fs::read(b.path().join(&name)).unwrap()
        );
    }
    let file: synthetic::SyntheticFile =
        serde_json::from_slice(&std::fs::read(&fa).unwrap()).unwrap();
    for ann in &file.annotations {
        assert_eq!(ann.caption, ann.findings.report());
    }
    // Heart width and effusion are measurable in the pixels.
    use synthetic::{Effusion, Findings};
    let size = 128;
    let draw = |f: Findings| synthetic::render(&f, size, &mut PyRandom::new(3));
    let row_bright = |img: &[u8], v: f64| {
        let y = (v * size as f64) as usize;
        img[y * size..(y + 1) * size]
            .iter()
            .filter(|&&p| p > 150)
            .count()
    };
    let normal = draw(Findings {
        cardiomegaly: false,
        effusion: Effusion::None,
    });
    let big = draw(Findings {
        cardiomegaly: true,
        effusion: Effusion::None,
    });
    assert!(row_bright(&big, 0.64) > row_bright(&normal, 0.64) + size / 10);
    let left = draw(Findings {
        cardiomegaly: false,
        effusion: Effusion::Left,
    });
    // Patient's left is the image's right: the lower right lung field turns bright.
    let region_mean = |img: &[u8], u0: f64, u1: f64| {
        let (y0, y1) = ((0.68 * size as f64) as usize, (0.74 * size as f64) as usize);
        let (x0, x1) = ((u0 * size as f64) as usize, (u1 * size as f64) as usize);
        let mut s = 0u64;
        for y in y0..y1 {
            for x in x0..x1 {
                s += img[y * size + x] as u64;
            }
        }
        s as f64 / ((y1 - y0) * (x1 - x0)) as f64
    };
    assert!(region_mean(&left, 0.70, 0.76) > region_mean(&normal, 0.70, 0.76) + 40.0);
    assert!((region_mean(&left, 0.24, 0.30) - region_mean(&normal, 0.24, 0.30)).abs() < 10.0);
    assert_eq!(
        Findings { cardiomegaly: true, effusion: Effusion::Left }.report(),
        "心脏明显增大，心胸比例增大。双肺野清晰，未见局灶性实变或气胸。左侧胸腔积液，左侧肋膈角变钝。印象：心脏增大，左侧胸腔积液。"
    );
}

#[test]
fn sat_sampler_batches_follow_the_reference_order() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic_dataset(dir.path(), 13, &shared);
    let cfg = LoaderConfig {
        sampler: xrayglm::data::batch::Sampler::Sat,
        batch_size: 2,
        workers: 1,
        ..Default::default()
    };
    // Rank 1 of 2: global batch k holds positions [4k, 4k+4); this rank takes [4k+2, 4k+4).
    let l = Loader::new(
        ds.clone(),
        cfg.clone(),
        Shard {
            rank: 1,
            world_size: 2,
            accum: 1,
        },
        LoaderState::default(),
    )
    .unwrap();
    let got: Vec<Vec<usize>> = l.take(3).map(|b| b.unwrap().indices).collect();
    for (k, idx) in got.iter().enumerate() {
        let want: Vec<usize> = (0..2)
            .map(|j| xrayglm::data::rng::sat_random_mapping((4 * k + 2 + j) as u64, 13) as usize)
            .collect();
        assert_eq!(idx, &want);
    }
    // Resumable like the epoch sampler.
    let r = Loader::new(
        ds,
        cfg,
        Shard {
            rank: 1,
            world_size: 2,
            accum: 1,
        },
        LoaderState {
            epoch: 0,
            offset: 2,
        },
    )
    .unwrap();
    assert_eq!(r.take(1).next().unwrap().unwrap().indices, got[2]);
}

/// Length-grouped batches: every sample once per epoch, a different grouping each epoch,
/// reproducible, the longest batch first, and far less padding than
/// random batches on a skewed length mix.
#[test]
fn length_grouped_batches_cover_the_epoch_and_cut_padding() {
    let mut rng = PyRandom::new(9);
    let lens: Vec<usize> = (0..1003)
        .map(|_| 60 + rng.randbelow(200) as usize)
        .collect();
    let global = 8;
    let padded = |order: &[usize]| -> usize {
        order
            .chunks(global)
            .map(|b| b.iter().map(|&i| lens[i]).max().unwrap() * b.len())
            .sum()
    };
    let useful: usize = lens.iter().sum();
    for epoch in 0..3 {
        let o = length_grouped_order(&lens, 4, epoch, global);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..lens.len()).collect::<Vec<_>>(), "a permutation");
        assert_eq!(o, length_grouped_order(&lens, 4, epoch, global));
        let longest = *lens.iter().max().unwrap();
        assert_eq!(lens[o[0]], longest, "the longest batch comes first");
        let grouped = padded(&o);
        let random = padded(&epoch_order(lens.len(), 4, epoch, true));
        eprintln!(
            "epoch {epoch}: padding overhead {:.1} % grouped, {:.1} % random",
            100.0 * (grouped - useful) as f64 / useful as f64,
            100.0 * (random - useful) as f64 / useful as f64
        );
        assert!(
            (grouped - useful) * 5 < random - useful,
            "grouped {grouped} random {random}"
        );
    }
    assert_ne!(
        length_grouped_order(&lens, 4, 0, global),
        length_grouped_order(&lens, 4, 1, global)
    );
}

#[test]
fn length_grouped_loader_resumes_exactly() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic_dataset(dir.path(), 21, &shared);
    let cfg = LoaderConfig {
        batch_size: 4,
        sampler: Sampler::LengthGrouped,
        seed: 3,
        ..Default::default()
    };
    let shard = Shard {
        rank: 0,
        world_size: 2,
        accum: 1,
    };
    let first: Vec<_> = Loader::new(Arc::clone(&ds), cfg.clone(), shard, LoaderState::default())
        .unwrap()
        .take(7)
        .map(|b| b.unwrap())
        .collect();
    let again: Vec<_> = Loader::new(Arc::clone(&ds), cfg, shard, first[3].state_after)
        .unwrap()
        .take(3)
        .map(|b| b.unwrap())
        .collect();
    for (a, b) in again.iter().zip(&first[4..]) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.state_after, b.state_after);
    }
}

/// Image paths stay inside the image root — `../x`, an absolute path, an
/// `image_id` that climbs out — unless allowed; the error names the record and the flag.
#[test]
fn image_paths_may_not_leave_the_image_root() {
    let b = Bad::new();
    let sub = b.dir.path().join("sub");
    std::fs::create_dir_all(sub.join("a")).unwrap();
    std::fs::create_dir_all(sub.join("x")).unwrap();
    let ok = b.dir.path().join("ok.png");
    let write = |name: &str, text: String| {
        let p = sub.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (
            write("up.json", r#"[{"img":"../ok.png","prompt":"p","label":"l"}]"#.into()),
            "up.json: record 0 (img ../ok.png): image path \"../ok.png\" leaves the image root",
        ),
        (
            write(
                "abs.json",
                serde_json::json!([{"img": ok.to_str().unwrap(), "prompt": "p", "label": "l"}])
                    .to_string(),
            ),
            "is absolute; give it relative to the image root",
        ),
        (
            write(
                "ann.json",
                r#"{"annotations":[{"image_id":"a/../../ok","caption":"c"}]}"#.into(),
            ),
            "ann.json: record 0 (image_id a/../../ok): image path \"a/../../ok.png\" leaves the image root",
        ),
    ];
    for (file, want) in &cases {
        let e = format!(
            "{:#}",
            load_records(file, &LoadOptions::default()).unwrap_err()
        );
        assert!(e.contains(want) && e.contains("allow_outside_root"), "{e}");
        // Allowed explicitly, the same file loads the film.
        let allowed = LoadOptions {
            allow_outside_root: true,
            ..Default::default()
        };
        let r = load_records(file, &allowed).unwrap();
        assert_eq!(
            std::fs::canonicalize(&r.records[0].images[0]).unwrap(),
            std::fs::canonicalize(&ok).unwrap()
        );
    }
    // Going down and back up inside the root is fine.
    std::fs::copy(&ok, sub.join("in.png")).unwrap();
    let f = write(
        "in.json",
        r#"[{"img":"x/../in.png","prompt":"p","label":"l"}]"#.into(),
    );
    assert_eq!(
        load_records(&f, &LoadOptions::default())
            .unwrap()
            .records
            .len(),
        1
    );
}

/// A PNG that claims `w`×`h` gray pixels and carries one compressed empty row: a few dozen bytes
/// that would unpack to gigabytes (a decompression bomb).
fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut z, &vec![0u8; w as usize + 1]).unwrap();
    chunk(&mut png, b"IDAT", &z.finish().unwrap());
    chunk(&mut png, b"IEND", b"");
    png
}

/// A decompression bomb is not "corrupt": the error says which limit was hit
/// and how to raise it (`XRAYGLM_MAX_IMAGE_MIB`), and the limit is honoured both ways.
#[test]
fn decompression_bombs_name_the_limit_and_how_to_raise_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bomb.png"), bomb_png(100_000, 100_000)).unwrap();
    let file = dir.path().join("b.json");
    std::fs::write(&file, r#"[{"img":"bomb.png","prompt":"p","label":"l"}]"#).unwrap();
    let e = format!(
        "{:#}",
        load_records(&file, &LoadOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("b.json: record 0 (img bomb.png): image")
            && e.contains("is too large to decode: decoding it (100000x100000 pixels) needs more memory than the limit of 512 MiB per image")
            && e.contains("XRAYGLM_MAX_IMAGE_MIB=<MiB>")
            && !e.contains("corrupt"),
        "{e}"
    );
    // A real 1,000 x 1,000 film against a 1 MiB limit, and with the limit raised (CLI, so the
    // variable is the child's own).
    let img = image::RgbImage::from_pixel(1000, 1000, image::Rgb([90, 90, 90]));
    img.save(dir.path().join("big.png")).unwrap();
    let list = dir.path().join("big.json");
    std::fs::write(&list, r#"[{"img":"big.png","prompt":"p","label":"l"}]"#).unwrap();
    let run = |mib: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("prepare-data")
            .arg(&list)
            .arg("--out")
            .arg(dir.path().join(format!("out{mib}.json")))
            .env("XRAYGLM_MAX_IMAGE_MIB", mib)
            .env_remove("XRAYGLM_TOKENIZER")
            .output()
            .unwrap()
    };
    let o = run("1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("the limit of 1 MiB per image"),
        "{err}"
    );
    let o = run("16");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Conversation files in LLaVA's and ShareGPT's layouts. A two-turn conversation is two
/// records (each answer a target, the earlier turns its history) or, with `conversation_turns =
/// "last"`, one; `<image>` markers and system turns leave the text; the training prompt is the
/// text `chat` builds for the same history; only the answer is a target; bad conversations name
/// their record.
#[test]
fn llava_and_sharegpt_conversations_become_per_turn_samples() {
    use xrayglm::data::records::ConversationTurns;
    use xrayglm::infer::chat::{prompt_text, Turn};
    let b = Bad::new();
    let llava = b.file(
        "llava.json",
        r#"[{"id": "c1", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\n描述这张胸片"},
            {"from": "gpt", "value": "心脏大小正常。"},
            {"from": "human", "value": "有积液吗？"},
            {"from": "gpt", "value": "未见胸腔积液。"}]}]"#,
    );
    let share = b.file(
        "share.json",
        r#"[{"messages": [
            {"role": "system", "content": "你是放射科医生。"},
            {"role": "user", "content": "<image>描述这张胸片"},
            {"role": "assistant", "content": "心脏大小正常。"},
            {"role": "user", "content": "有积液吗？"},
            {"role": "assistant", "content": "未见胸腔积液。"}], "images": ["ok.png"]}]"#,
    );
    for (path, schema) in [(&llava, Schema::Llava), (&share, Schema::ShareGpt)] {
        let l = load_records(path, &LoadOptions::default()).unwrap();
        assert_eq!(l.schema, schema);
        assert_eq!(l.records.len(), 2);
        let (r0, r1) = (&l.records[0], &l.records[1]);
        assert_eq!(
            (r0.prompt.as_str(), r0.label.as_str()),
            ("描述这张胸片", "心脏大小正常。")
        );
        assert!(r0.history.is_empty());
        assert_eq!(
            (r1.prompt.as_str(), r1.label.as_str()),
            ("有积液吗？", "未见胸腔积液。")
        );
        assert_eq!(
            r1.history,
            vec![("描述这张胸片".to_string(), "心脏大小正常。".to_string())]
        );
        assert!(r1.images[0].ends_with("ok.png"));
        let last = LoadOptions {
            conversation_turns: ConversationTurns::Last,
            ..Default::default()
        };
        let l = load_records(path, &last).unwrap();
        assert_eq!(l.records.len(), 1);
        assert_eq!(
            l.records[0],
            Record {
                index: 0,
                ..r1.clone()
            }
        );
    }
    // The training prompt is chat's prompt for the same history; only the answer is a target.
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let builder = SampleBuilder::new(tok.clone(), SampleConfig::default()).unwrap();
    let r1 = &load_records(&llava, &LoadOptions::default())
        .unwrap()
        .records[1];
    let turns: Vec<Turn> = r1
        .history
        .iter()
        .map(|(q, a)| Turn {
            query: q.clone(),
            response: a.clone(),
        })
        .collect();
    assert_eq!(
        builder.prompt_text_with(&r1.history, &r1.prompt),
        format!("</img>{}", prompt_text(&turns, &r1.prompt, false))
    );
    let s = builder
        .build_with_history(&r1.history, &r1.prompt, &r1.label)
        .unwrap();
    let target: Vec<i64> = s.labels.iter().copied().filter(|&l| l != IGNORE).collect();
    // The reference's labels: `<sop>`, the answer, `<eop>` (the loss shifts them by one).
    let mut want = vec![xrayglm::tokenizer::ids::SOP];
    want.extend(tok.encode(&r1.label).unwrap());
    want.push(xrayglm::tokenizer::ids::EOP);
    assert_eq!(target, want);
    let one = builder.build(&r1.prompt, &r1.label).unwrap();
    assert!(
        s.context_length > one.context_length,
        "the history is in the prefix"
    );
    // Bad conversations name the file and record.
    for (text, what) in [
        (
            r#"[{"image": ["ok.png", "ok.png"], "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]"#,
            "1 <image> markers for 2 image(s)",
        ),
        (
            r#"[{"image": "ok.png", "conversations": [{"from": "gpt", "value": "a"}]}]"#,
            "an answer without a question",
        ),
        (
            r#"[{"image": "ok.png", "conversations": [{"from": "robot", "value": "a"}]}]"#,
            "unknown from \"robot\"",
        ),
        (
            r#"[{"image": "ok.png", "conversations": [{"from": "human", "value": "q"}]}]"#,
            "no question with an answer",
        ),
        (
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]"#,
            "no image",
        ),
        (
            r#"[{"image": "nope.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]"#,
            "not found",
        ),
    ] {
        let e = b.err("bad.json", text);
        assert!(
            e.contains("bad.json: record 0") && e.contains(what),
            "{what}: {e}"
        );
    }
}

/// Several views per study. The synthetic set with lateral films is named as OpenI is
/// (`<study>_<k>`, the PA film the same pixels as the one-view set's); `data.group_views` makes one
/// record per study with its films in `k` order (counted by views; a file listing `_2` before `_1`
/// still gives `[_1, _2]`; an id that is not `<report>_<k>` is a bad record); training lists and
/// conversation files carry several films; a two-film sample has two `<img>` blocks (one film:
/// exactly the reference's ids) and its batch places every film at its row's slots.
#[test]
fn several_views_per_study_become_one_sample() {
    use xrayglm::data::records::{write_training_list, BadKind, StudyCounts};
    let dir = tempfile::tempdir().unwrap();
    let one = synthetic::generate(&dir.path().join("one"), 4, 48, 5).unwrap();
    let two = synthetic::generate_views(&dir.path().join("two"), 4, 48, 5, true).unwrap();
    let xray = two.parent().unwrap();
    assert_eq!(
        std::fs::read(one.with_file_name("synth_00002.png")).unwrap(),
        std::fs::read(xray.join("synth_00002_1.png")).unwrap(),
        "the PA film is the one-view set's"
    );
    assert_ne!(
        std::fs::read(xray.join("synth_00002_1.png")).unwrap(),
        std::fs::read(xray.join("synth_00002_2.png")).unwrap()
    );
    let per_film = load_records(&two, &LoadOptions::default()).unwrap();
    assert_eq!(per_film.records.len(), 8);
    assert!(!per_film.grouped);
    let grouped_opts = LoadOptions {
        group_views: true,
        ..Default::default()
    };
    let g = load_records(&two, &grouped_opts).unwrap();
    let counts = StudyCounts {
        studies: 4,
        one_view: 0,
        two_views: 4,
        three_or_more: 0,
        differing_captions: 0,
    };
    assert_eq!((g.studies, per_film.studies), (Some(counts), Some(counts)));
    assert_eq!(g.records.len(), 4);
    let r = &g.records[2];
    assert_eq!(r.id, "synth_00002");
    assert_eq!(r.img, vec!["synth_00002_1.png", "synth_00002_2.png"]);
    assert_eq!(r.label, per_film.records[4].label);
    // Out of order in the file, a third view, a study of one, an ungroupable id.
    let ann = |ids: &[&str]| {
        let a: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({"image_id": id, "caption": format!("report of {}", &id[..3])}))
            .collect();
        serde_json::json!({ "annotations": a }).to_string()
    };
    for (k, src) in ["synth_00000_1", "synth_00000_2", "synth_00001_1"]
        .iter()
        .enumerate()
    {
        let name = ["7_2", "7_1", "9_1"][k];
        std::fs::copy(
            xray.join(format!("{src}.png")),
            xray.join(format!("{name}.png")),
        )
        .unwrap();
    }
    std::fs::copy(xray.join("synth_00001_2.png"), xray.join("7_10.png")).unwrap();
    let f = xray.join("mixed.json");
    std::fs::write(&f, ann(&["7_2", "9_1", "7_10", "7_1"])).unwrap();
    let m = load_records(&f, &grouped_opts).unwrap();
    let views: Vec<Vec<String>> = m.records.iter().map(|r| r.img.clone()).collect();
    assert_eq!(
        views,
        vec![
            vec!["7_1.png".to_string(), "7_2.png".into(), "7_10.png".into()],
            vec!["9_1.png".into()]
        ]
    );
    assert_eq!(
        (
            m.studies.unwrap().one_view,
            m.studies.unwrap().three_or_more
        ),
        (1, 1)
    );
    std::fs::write(&f, ann(&["7_1", "xray"])).unwrap();
    let e = format!("{:#}", load_records(&f, &grouped_opts).unwrap_err());
    assert!(
        e.contains("record 1 (image_id xray)") && e.contains("<report>_<k>"),
        "{e}"
    );
    let skipped = load_records(
        &f,
        &LoadOptions {
            skip_bad: true,
            ..grouped_opts.clone()
        },
    )
    .unwrap();
    assert_eq!(skipped.bad_counts(), vec![(BadKind::NotAStudy, 1)]);
    // A training list keeps the views (a list in "img") and loads back the same.
    let list = xray.join("two-prompt.json");
    write_training_list(&list, &g.records).unwrap();
    let text = std::fs::read_to_string(&list).unwrap();
    assert!(text.contains("\"synth_00002_2.png\""), "{text}");
    let back = load_records(&list, &LoadOptions::default()).unwrap();
    let paths = |rs: &[Record]| rs.iter().map(|r| r.images.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&back.records), paths(&g.records));
    // A conversation with two films and two markers.
    let conv = xray.join("conv.json");
    std::fs::write(
        &conv,
        r#"[{"messages": [{"role": "user", "content": "<image><image>比较两张片子"}, {"role": "assistant", "content": "一致。"}], "images": ["synth_00000_1.png", "synth_00000_2.png"]}]"#,
    )
    .unwrap();
    let c = load_records(&conv, &LoadOptions::default()).unwrap();
    assert_eq!(c.records[0].images.len(), 2);
    assert_eq!(c.records[0].prompt, "比较两张片子");
    // Samples and batches.
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let cfg = SampleConfig {
        max_source_length: 112,
        ..Default::default()
    };
    let builder = SampleBuilder::new(tok.clone(), cfg).unwrap();
    let s1 = builder.build_for(1, &[], "问题", "答案").unwrap();
    assert_eq!(s1, builder.build("问题", "答案").unwrap());
    let s2 = builder.build_for(2, &[], "问题", "答案").unwrap();
    let (open, close) = (tok.encode("<img>").unwrap(), tok.encode("</img>").unwrap());
    assert_eq!(s2.image_starts, vec![3, 3 + 32 + close.len() + open.len()]);
    assert_eq!(&s2.input_ids[35..35 + close.len()], close.as_slice());
    assert_eq!(
        &s2.input_ids[35 + close.len()..s2.image_starts[1]],
        open.as_slice()
    );
    assert_eq!(
        &s2.input_ids[s2.image_starts[1] + 32..],
        &s1.input_ids[35..]
    );
    let short = SampleBuilder::new(tok, SampleConfig::default()).unwrap();
    let e = format!("{:#}", short.build_for(2, &[], "q", "a").unwrap_err());
    assert!(e.contains("max_source_length must be at least"), "{e}");
    let proc = ImageProcessor {
        size: 32,
        ..Default::default()
    };
    let ds = Arc::new(Dataset::new(g.records, &builder, proc, "two").unwrap());
    let lc = LoaderConfig {
        batch_size: 3,
        workers: 1,
        shuffle: false,
        ..Default::default()
    };
    let b = Loader::new(ds, lc, Shard::default(), LoaderState::default())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let st = s2
        .image_starts
        .iter()
        .map(|&x| x as i64)
        .collect::<Vec<_>>();
    assert_eq!(
        b.image_at,
        (0..3)
            .flat_map(|r| st.iter().map(move |&x| (r, x)))
            .collect::<Vec<_>>()
    );
    assert_eq!(b.images.len(), 6 * 3 * 32 * 32);
    let t = b.to_tensors(tch::Device::Cpu);
    assert_eq!(t.images.size(), vec![6, 3, 32, 32]);
    let per_row = b.films_per_row(&t.images);
    assert_eq!(per_row.len(), 3);
    assert!(per_row.iter().all(|f| f.size()[0] == 2));
}

/// The hard synthetic set: deterministic; every report, whatever its phrasing and order, states
/// exactly its film's findings to the built-in Chinese labeler (so CE-F1 measures the findings);
/// one set of findings is written in several ways; the findings change the film.
#[test]
fn hard_synthetic_reports_state_their_findings_in_many_ways() {
    use xrayglm::data::synthetic_hard::{generate_hard, HardAnnotation};
    use xrayglm::eval::findings::{files::labeler_for, Observation, State};
    use xrayglm::eval::metrics::Lang;
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &Path| -> Vec<HardAnnotation> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        assert_eq!(v["kind"], "hard");
        serde_json::from_value(v["annotations"].clone()).unwrap()
    };
    let file = generate_hard(&dir.path().join("a"), 300, 48, 9).unwrap();
    let again = generate_hard(&dir.path().join("b"), 300, 48, 9).unwrap();
    let (a, b) = (read(&file), read(&again));
    assert_eq!(a.len(), 300);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.caption, x.findings), (&y.caption, y.findings));
    }
    assert_eq!(
        std::fs::read(file.with_file_name("hard_00007.png")).unwrap(),
        std::fs::read(again.with_file_name("hard_00007.png")).unwrap()
    );
    let labeler = labeler_for(Some(Lang::Zh), None, &[]).unwrap();
    for ann in &a {
        let labels = labeler.label(&ann.caption);
        let want = ann.findings.observations();
        for o in Observation::ALL {
            let present = labels.get(o) == State::Positive;
            assert_eq!(
                present,
                want.contains(&o),
                "{o:?} in {:?} ({:?})",
                ann.caption,
                ann.findings
            );
        }
    }
    // Several phrasings and orders of one set of findings; every finding occurs.
    let mut by_findings: std::collections::HashMap<String, std::collections::BTreeSet<&str>> =
        Default::default();
    for ann in &a {
        by_findings
            .entry(format!("{:?}", ann.findings))
            .or_default()
            .insert(&ann.caption);
    }
    let repeated: Vec<_> = by_findings.values().filter(|c| c.len() > 1).collect();
    assert!(
        repeated.len() >= 5,
        "{} sets written more than one way",
        repeated.len()
    );
    for o in [
        Observation::Cardiomegaly,
        Observation::LungLesion,
        Observation::Consolidation,
        Observation::Pneumothorax,
        Observation::PleuralEffusion,
        Observation::SupportDevices,
        Observation::NoFinding,
    ] {
        let n = a
            .iter()
            .filter(|x| x.findings.observations().contains(&o))
            .count();
        assert!(n >= 10, "{o:?}: {n} of 300");
    }
    // Findings change the pixels: two films differing only in a finding differ where it is drawn.
    let base = a[0].findings;
    let film = |f: &xrayglm::data::synthetic_hard::HardFindings| {
        xrayglm::data::synthetic_hard::render_hard(f, 64, &mut xrayglm::data::rng::PyRandom::new(3))
    };
    let mut with_catheter = base;
    with_catheter.catheter = !base.catheter;
    assert_ne!(film(&base), film(&with_catheter));
}
