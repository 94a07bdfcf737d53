//! The model toolchain behind `prefstream-train`, in rooms by role:
//!
//! - `data`: the synthetic world, its dimensions, the AlignX importer, the teacher;
//! - `net`: the decoders (from-scratch `model`, pretrained `base` with LoRA) and attention;
//! - `stages`: judge, SFT, GRPO, RFT and their sampling;
//! - `export` (ONNX), `eval` (Acc_jud, audit), `pipeline` (the steps over a run directory).
//!
//! Each room's modules are also re-exported here (`train::sft`, `train::model`…), the paths
//! the binaries, tests and benches use.

pub mod batch;
pub mod curves;
pub mod data;
pub mod eval;
pub mod export;
pub mod net;
pub mod pipeline;
pub mod stages;

pub use data::{alignx, dims, synth, teacher};
pub use eval::audit;
pub use net::{attention, base, model};
pub use stages::{generate, grpo, judge, rft, sft};
