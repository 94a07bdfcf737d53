//! The networks: the from-scratch decoder (`model`, kept as the fast package of the delivery
//! tests), the pretrained Llama-family base with LoRA adapters (`base`), and the masked
//! attention both use.

pub mod attention;
pub mod base;
pub mod model;
