//! Activation checkpointing (of every layer, or of some) gives the same gradients as the plain
//! backward, with adapters on every layer or above the first only. In its own test
//! binary: it relies on libtorch's global generator for dropout, which tests running in parallel
//! in the same process would disturb.

mod common;

use tch::{Device, Kind, Tensor};
use xrayglm::model::config::ModelConfig;
use xrayglm::model::visualglm::VisualGlm;

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    same_gradients(&cfg);
    // Adapters on the last layer only: the layers below run forward only, in both backwards.
    let mut upper = cfg.clone();
    let last = cfg.sat.num_layers - 1;
    assert!(last > 0);
    upper.lora.as_mut().unwrap().layers = vec![last];
    upper.lora.as_mut().unwrap().mlp = false;
    same_gradients(&upper);
}

fn same_gradients(cfg: &ModelConfig) {
    tch::manual_seed(5);
    let mut m = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
    m.set_dropout(
        0.1,
        xrayglm::model::chatglm::Dropouts {
            embedding: 0.1,
            attention: 0.1,
            output: 0.1,
        },
    );
    common::randomize_lora_b(&m, 0.05);
    let (ids, image) = xrayglm::bench::model_inputs(cfg, 2, 70, Device::Cpu);
    let (pos, ctx) =
        xrayglm::model::positions::positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    let grads = |m: &VisualGlm, checkpoint: bool| -> (f64, Vec<(String, Tensor)>) {
        for (_, v) in m.lora.variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(77);
        m.set_dropout_seed(1234);
        let inputs = xrayglm::model::visualglm::BatchInputs {
            input_ids: &ids,
            images: xrayglm::model::visualglm::Images::Pixels(&image),
            image_at: xrayglm::model::chatglm::ImageAt::EachRow(3),
            position_ids: &pos,
            context_lengths: &ctx,
            labels: &labels,
        };
        let loss = m.loss_backward(&inputs, 8.0, checkpoint).unwrap();
        let mut g: Vec<(String, Tensor)> = m
            .lora
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        (loss, g)
    };
    let (l1, g1) = grads(&m, false);
    // Every layer recomputed, then only the first (the second keeps its activations), then none.
    for recompute in [None, Some(1), Some(0)] {
        m.set_recompute_layers(recompute);
        let (l2, g2) = grads(&m, true);
        assert_eq!(l1, l2, "recompute {recompute:?}");
        for ((k, a), (_, b)) in g1.iter().zip(&g2) {
            let e = common::rel_err(b, a);
            assert!(e <= 1e-6, "recompute {recompute:?}: {k}: {e:.3e}");
            assert!(a.abs().max().double_value(&[]) > 0.0, "{k}: zero gradient");
        }
    }
}
