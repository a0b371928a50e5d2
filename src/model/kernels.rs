//! The alternatives to ChatGLM's default elementwise kernels: the defaults are the measured-fast
//! choices; `xrayglm bench layer` times each alternative against them in one run, and the tests
//! hold every alternative to the reference.

/// How a layer's elementwise work is done. The defaults are the measured-fast choices; the
/// alternatives exist so that `xrayglm bench layer` can time both in one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kernels {
    /// sat's `gelu_impl` op for op (8 elementwise kernels and their autograd nodes) instead of
    /// libtorch's one-kernel tanh GELU (the same formula evaluated in fp32 inside the kernel).
    pub sat_gelu: bool,
    /// Add each LoRA's `ΔW = B·A·scaling` to the frozen weight and run one matmul (how a merged
    /// model runs), instead of the two thin matmuls `(x·Aᵀ)·Bᵀ` beside the frozen one. The LoRA
    /// dropout is not applied on this path; int8 layers keep the two matmuls.
    pub lora_as_weight: bool,
    /// Rotate the four quarter-tensors (q and k, position and block halves) one by one and
    /// concatenate them back, instead of one rotation of the stacked q and k.
    pub split_rotary: bool,
}

impl Kernels {
    /// Each non-default choice alone, with its name: what `xrayglm bench layer` times against the
    /// default and what the tests hold to the reference.
    pub fn alternatives() -> [(&'static str, Kernels); 3] {
        let none = Kernels::default();
        [
            (
                "sat's GELU arithmetic (8 kernels)",
                Kernels {
                    sat_gelu: true,
                    ..none
                },
            ),
            (
                "rotary on the four quarter-tensors apart",
                Kernels {
                    split_rotary: true,
                    ..none
                },
            ),
            (
                "LoRA as a materialized dW = B.A",
                Kernels {
                    lora_as_weight: true,
                    ..none
                },
            ),
        ]
    }
}
