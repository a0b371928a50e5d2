//! Image preprocessing parity with Pillow + torchvision.
//!
//! * ../shared/reference/image_preprocess_examples.json (Pillow 13.0.0): the resized uint8 sums
//!   exactly; the listed values and channel statistics to 1e-6.
//! * tests/fixtures/images (scripts/make_image_fixtures.py, Pillow 13 + torchvision 0.26): full
//!   3×224×224 tensors; PNG to 1e-6, JPEG within 4 grey levels (different JPEG decoders).

mod common;

use serde_json::Value;
use xrayglm::data::image::{ImageProcessor, SixteenBit, CLIP_STD};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn openi_xrays_match_reference_statistics() {
    let Some(shared) = common::shared() else {
        return;
    };
    let ex = common::read_json(&shared.join("reference/image_preprocess_examples.json"));
    let proc = ImageProcessor {
        size: 224,
        sixteen_bit: SixteenBit::Pillow,
    };
    let results = ex["results"].as_object().unwrap();
    assert_eq!(results.len(), 5);
    for (name, r) in results {
        let bytes = std::fs::read(shared.join("data").join(name)).unwrap();
        let resized = proc.resized(&bytes).unwrap();
        assert_eq!(
            resized.sum(),
            r["uint8_resized_sum"].as_u64().unwrap(),
            "{name}: uint8 sum"
        );
        let x = proc.process_bytes(&bytes).unwrap();
        let n = 224 * 224;
        let at = |c: usize, y: usize, xx: usize| x[c * n + y * 224 + xx] as f64;
        for (i, v) in r["x[0,0,0:4]"].as_array().unwrap().iter().enumerate() {
            assert!(
                close(at(0, 0, i), v.as_f64().unwrap(), 1e-6),
                "{name} x[0,0,{i}]"
            );
        }
        for (c, v) in r["x[:,112,112]"].as_array().unwrap().iter().enumerate() {
            assert!(
                close(at(c, 112, 112), v.as_f64().unwrap(), 1e-6),
                "{name} x[{c},112,112]"
            );
        }
        for c in 0..3 {
            let ch = &x[c * n..(c + 1) * n];
            // The reference statistics are numpy float32 reductions (sequential float32
            // accumulation); reproduce them that way to 1e-6.
            let (mean32, std32) = numpy_f32_mean_std(ch);
            assert!(
                close(mean32 as f64, r["channel_mean"][c].as_f64().unwrap(), 1e-6),
                "{name} mean[{c}] {mean32}"
            );
            assert!(
                close(std32 as f64, r["channel_std"][c].as_f64().unwrap(), 1e-6),
                "{name} std[{c}] {std32}"
            );
            // The exact mean follows from the uint8 image: (Σu/(255·n) − m)/s.
            let exact = (resized
                .data
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| v as f64)
                .sum::<f64>()
                / (255.0 * n as f64)
                - xrayglm::data::image::CLIP_MEAN[c] as f64)
                / CLIP_STD[c] as f64;
            let mean64 = ch.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!(
                close(mean64, exact, 1e-6),
                "{name} exact mean[{c}] {mean64} vs {exact}"
            );
        }
    }
}

/// numpy's `x.mean()` / `x.std()` on float32 data: float32 accumulation in order.
fn numpy_f32_mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().fold(0f32, |a, &x| a + x) / n;
    let var = v.iter().fold(0f32, |a, &x| a + (x - mean) * (x - mean)) / n;
    (mean, var.sqrt())
}

fn tensor(path: &std::path::Path) -> Vec<f32> {
    common::read_gz(path)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn generated_images_match_torchvision_tensors() {
    let dir = common::fixture("images");
    let manifest: Value = common::read_json(&dir.join("manifest.json"));
    let images = manifest["images"].as_array().unwrap();
    assert!(images.len() >= 8);
    let modes: std::collections::HashSet<&str> =
        images.iter().map(|i| i["mode"].as_str().unwrap()).collect();
    for m in ["RGB", "L", "RGBA", "P", "I;16"] {
        assert!(modes.contains(m), "fixtures lack mode {m}");
    }
    // Pillow semantics for 16-bit grayscale (clip), as the fixtures were made with Pillow.
    let proc = ImageProcessor {
        size: 224,
        sixteen_bit: SixteenBit::Pillow,
    };
    for img in images {
        let name = img["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let want = tensor(&dir.join(format!("{name}.f32.gz")));
        let got = proc.process_bytes(&bytes).unwrap();
        assert_eq!(got.len(), 3 * 224 * 224);
        assert_eq!(want.len(), got.len());
        let n = 224 * 224;
        if name.ends_with(".png") {
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{name}: max |diff| {worst}");
            assert_eq!(
                proc.resized(&bytes).unwrap().sum(),
                img["uint8_resized_sum"].as_u64().unwrap(),
                "{name}"
            );
        } else {
            // Back to grey levels: |Δx|·std·255.
            let mut worst = 0f32;
            for c in 0..3 {
                for i in 0..n {
                    worst =
                        worst.max((got[c * n + i] - want[c * n + i]).abs() * CLIP_STD[c] * 255.0);
                }
            }
            assert!(worst <= 4.0 + 1e-3, "{name}: {worst} grey levels");
        }
    }
}

#[test]
fn sixteen_bit_scale_policy_keeps_contrast() {
    let dir = common::fixture("images");
    let bytes = std::fs::read(dir.join("gray16_400x350.png")).unwrap();
    let pillow = ImageProcessor {
        size: 224,
        sixteen_bit: SixteenBit::Pillow,
    }
    .resized(&bytes)
    .unwrap();
    let scale = ImageProcessor {
        size: 224,
        sixteen_bit: SixteenBit::Scale,
    }
    .resized(&bytes)
    .unwrap();
    // The fixture's values run up to ~400 of 65535: Pillow clips most of them to white, while
    // scaling maps them to dark greys.
    assert!(
        pillow.sum() > scale.sum() * 5,
        "pillow {} scale {}",
        pillow.sum(),
        scale.sum()
    );
}
