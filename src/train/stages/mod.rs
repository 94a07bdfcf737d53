//! The training stages, in order: the judge R (`judge`), cold-start SFT (`sft`), GRPO with the
//! judge's reward (`grpo`), rejection-sampling fine-tuning (`rft`), and the sampling they share
//! (`generate`), and the optimiser schedule they share (`schedule`).

pub mod generate;
pub mod grpo;
pub mod judge;
pub mod rft;
pub mod schedule;
pub mod sft;
