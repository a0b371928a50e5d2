//! PyRandom reproduces CPython's `random` (fixture from scripts/make_rng_fixtures.py).

mod common;

use xrayglm::data::records::RANDOM_PROMPTS;
use xrayglm::data::rng::PyRandom;

#[test]
fn matches_cpython_random() {
    let fx = common::read_json(&common::fixture("python_random.json"));
    for case in fx.as_array().unwrap() {
        let seed = case["seed"].as_i64().unwrap();
        let mut r = PyRandom::new(seed);
        let choices: Vec<u64> = (0..200)
            .map(|_| {
                let picked = *r.choice(&RANDOM_PROMPTS);
                RANDOM_PROMPTS.iter().position(|p| *p == picked).unwrap() as u64
            })
            .collect();
        let want: Vec<u64> = case["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(choices, want, "seed {seed}: choice");
        for v in case["random"].as_array().unwrap() {
            assert_eq!(r.random(), v.as_f64().unwrap(), "seed {seed}: random()");
        }
        for (k, v) in case["getrandbits_k"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["getrandbits"].as_array().unwrap())
        {
            assert_eq!(
                r.getrandbits(k.as_u64().unwrap() as u32),
                v.as_u64().unwrap(),
                "seed {seed}: getrandbits({k})"
            );
        }
        let mut items: Vec<u64> = (0..25).collect();
        r.shuffle(&mut items);
        let want: Vec<u64> = case["shuffle25"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(items, want, "seed {seed}: shuffle");
        for v in case["randbelow_1000003"].as_array().unwrap() {
            assert_eq!(r.randbelow(1000003), v.as_u64().unwrap());
        }
    }
}

/// sat 0.3.6's RandomMappingDataset, run from its own source (scripts/make_sampler_fixtures.py).
#[test]
fn sat_random_mapping_matches_the_original() {
    let fx = common::read_json(&common::fixture("sat_sampler.json"));
    let mut checked = 0;
    for (n, case) in fx.as_object().unwrap() {
        let n: u64 = n.parse().unwrap();
        for (i, s) in case["index"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["sample"].as_array().unwrap())
        {
            assert_eq!(
                xrayglm::data::rng::sat_random_mapping(i.as_u64().unwrap(), n),
                s.as_u64().unwrap(),
                "n={n} i={i}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 98);
}
