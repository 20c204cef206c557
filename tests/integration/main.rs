//! Integration tests: one binary, one module per area. Tests that read `../shared/realdata` are
//! ignored where it is absent (the summary counts them), and fail under `CI=true` (build.rs).

mod attacks;
mod common;
mod contract;
mod demo_pipeline;
mod device_script;
mod families;
mod fidelity;
mod first_hour;
mod fuzz;
mod generate;
mod hostile;
mod hub;
mod integrity;
mod interrupts;
mod judge;
mod kernels;
mod limits;
mod lora;
mod mishaps;
mod own_data;
mod precision;
mod python_package;
mod resumes;
mod shards;
mod stats;
mod tensorboard;
mod train;
mod trl;
