//! The model toolchain behind `prefstream-train`.

pub mod alignx;
pub mod attention;
pub mod audit;
pub mod base;
pub mod batch;
pub mod curves;
pub mod dims;
pub mod eval;
pub mod export;
pub mod generate;
pub mod grpo;
pub mod judge;
pub mod model;
pub mod pipeline;
pub mod rft;
pub mod sft;
pub mod synth;
pub mod teacher;
