//! prefstream: streaming preference inference (AlignXplore) over Kafka, Redis and ONNX Runtime.

pub mod config;
pub mod demo;
pub mod engine;
pub mod event;
pub mod kafka;
pub mod offsets;
pub mod onnx;
pub mod padding;
pub mod pipeline;
pub mod prompt;
pub mod replay;
pub mod runtime;
pub mod sampling;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod tokenizer;
pub mod train;
pub mod window;
