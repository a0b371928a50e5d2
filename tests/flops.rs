//! The FLOP accounting (`model::flops`) against the matmuls and convolutions libtorch really runs
//! (its operator record, counted by src/model/flop_trace.cpp): a LoRA training step of the tiny
//! preset with its vision side, plain and with activation checkpointing, and one ChatGLM layer at
//! the real width (4096 hidden, 16,384 inner, 32 heads) with XrayGLM's adapters. Exact equality:
//! every count is a whole number. In its own test binary: the count sees every thread's
//! operators, so no other test may run beside it.

use tch::{Device, Kind, Tensor};
use xrayglm::model::config::ModelConfig;
use xrayglm::model::flops::{trace, training_step, StepPlan, StepShape};
use xrayglm::model::visualglm::{BatchInputs, Images, VisualGlm};

/// One training step's traced FLOPs and the accounting's (model, hardware) for it.
fn step(cfg: &ModelConfig, rows: i64, seq: i64, embeds: bool, plan: StepPlan) -> (f64, f64, f64) {
    tch::manual_seed(3);
    let mut m = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
    m.set_fused_attention(false);
    m.set_recompute_layers(Some(plan.recompute_layers));
    let (ids, image) = xrayglm::bench::model_inputs(cfg, rows, seq, Device::Cpu);
    let (pos, ctx) = xrayglm::model::positions::positions_from_ids(
        &ids,
        cfg.sat.bos_token_id,
        cfg.sat.mask_token_id,
        cfg.sat.gmask_token_id,
    )
    .unwrap();
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    let embeds_t = Tensor::randn(
        [rows, cfg.sat.image_length, cfg.sat.hidden_size],
        (Kind::Float, Device::Cpu),
    );
    let inputs = BatchInputs {
        input_ids: &ids,
        images: if embeds {
            Images::Embeds(&embeds_t)
        } else {
            Images::Pixels(&image)
        },
        image_at: xrayglm::model::chatglm::ImageAt::EachRow(3),
        position_ids: &pos,
        context_lengths: &ctx,
        labels: &labels,
    };
    let (loss, traced, calls) =
        trace(|| m.loss_backward(&inputs, 1.0, plan.checkpointed).unwrap()).unwrap();
    assert!(loss.is_finite() && calls > 0);
    // The positions whose next label counts.
    let targets = labels
        .narrow(1, 1, seq - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]);
    let shape = StepShape {
        rows,
        seq,
        targets,
        films: if embeds { 0 } else { rows },
    };
    let f = training_step(cfg, &shape, &plan);
    (traced, f.model(), f.hardware())
}

#[test]
fn the_accounting_counts_what_libtorch_runs() {
    // The tiny preset, vision included: adapters on both layers, then on the last one only.
    let tiny = ModelConfig::preset("tiny").unwrap();
    let mut upper = tiny.clone();
    upper.lora.as_mut().unwrap().layers = vec![1];
    for cfg in [&tiny, &upper] {
        let (traced, model, _) = step(cfg, 2, 72, false, StepPlan::default());
        assert_eq!(traced, model, "plain backward");
        for recompute in [2, 1] {
            let plan = StepPlan {
                checkpointed: true,
                recompute_layers: recompute,
            };
            let (traced, model, hardware) = step(cfg, 2, 72, false, plan);
            assert_eq!(traced, hardware, "recompute {recompute}");
            // Only layers with a backward run again: none when the recomputed ones are all
            // below the adapters.
            let lowest = cfg.lora.as_ref().unwrap().layers[0] as usize;
            assert_eq!(
                hardware > model,
                recompute > lowest,
                "recompute {recompute}"
            );
        }
    }
    // One ChatGLM layer at the real width with XrayGLM's adapters (rank 10 on the attention),
    // the films' embeddings given (the vision cache's case).
    let mut real = ModelConfig::preset("visualglm-6b").unwrap();
    real.sat.num_layers = 1;
    real.sat.eva_args = tiny.sat.eva_args.clone();
    real.sat.qformer_args = tiny.sat.qformer_args.clone();
    real.lora.as_mut().unwrap().layers = vec![0];
    let (traced, model, hardware) = step(&real, 1, 64, true, StepPlan::default());
    eprintln!("real-width layer: {traced:.4e} FLOPs traced, {model:.4e} counted");
    assert_eq!(traced, model);
    assert_eq!(hardware, model, "nothing recomputed");
}
