//! prefstream: streaming preference inference (AlignXplore) over Kafka, Redis and ONNX Runtime.

pub mod engine;
pub mod event;
pub mod offsets;
pub mod onnx;
pub mod prompt;
pub mod runtime;
pub mod sampling;
pub mod state;
pub mod tokenizer;
pub mod train;
pub mod window;
