//! The model stage: HF config and safetensors in, the decoder of a supported family out.
//!
//! The decoder by idea: [`op_mode`] (which op set a forward uses), the layers ([`norm`],
//! [`rope`], [`attention`], [`mlp`]) mirroring [`fused`] (and, on the CPU, [`cpu`]), the layer ([`block`]), each family's
//! weight names ([`load`], [`shapes`]), the per-length tables ([`tables`]), the assembled model
//! ([`transformer`]) and its incremental form ([`decode`], its keys and values in [`kv_cache`]).

pub mod attention;
pub mod block;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod fused;
pub mod gather_rows;
pub mod init;
pub mod kv_cache;
pub mod linear_op;
pub mod load;
pub mod lora;
pub mod mlp;
pub mod norm;
pub mod op_mode;
pub mod packing;
pub mod params;
pub mod reward;
pub mod rope;
pub mod row_ops;
pub mod shapes;
pub mod softcap;
pub mod tables;
pub mod transformer;
pub mod weights;

pub use block::Block;
pub use config::{Arch, TransformerConfig};
pub use decode::DecodeStep;
pub use kv_cache::KvCache;
pub use norm::RmsNorm;
pub use op_mode::OpMode;
pub use packing::{Piece, Sharing};
pub use params::ParamSource;
pub use softcap::softcap;
pub use tables::{ContextCache, SeqContext};
pub use transformer::Transformer;
