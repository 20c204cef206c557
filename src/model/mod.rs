//! The model stage: HF config and safetensors in, a Llama/Qwen2 decoder out.

pub mod config;
pub mod init;
pub mod transformer;
pub mod weights;

pub use config::{Arch, TransformerConfig};
pub use transformer::{OpMode, ParamSource, Transformer};
