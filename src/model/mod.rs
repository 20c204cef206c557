//! The model stage: HF config and safetensors in, the decoder of a supported family out.

pub mod config;
pub mod fused;
pub mod init;
pub mod lora;
pub mod shapes;
pub mod softcap;
pub mod transformer;
pub mod weights;

pub use config::{Arch, TransformerConfig};
pub use softcap::softcap;
pub use transformer::{OpMode, ParamSource, Transformer};
