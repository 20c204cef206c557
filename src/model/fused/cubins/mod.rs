//! refdpo's Triton kernels as committed cubins: the manifest `../triton/compile.py` writes beside
//! them, read as a typed artifact (what each compiled kernel needs at launch), and, under
//! `--features cuda`, the launcher ([`launch`]). The kernels' source is Triton
//! (`../triton/flash_attn.py`, `../triton/adamw.py`, `../triton/adamw8.py`), checked on the CPU by Triton's interpreter
//! and compiled ahead of time with no GPU, so building refdpo needs no Python. The unit tests
//! here fail when a committed cubin or the manifest is stale against its source.

#[cfg(feature = "cuda")]
pub mod launch;

use serde::Deserialize;
use std::collections::BTreeMap;

/// `triton/manifest.json`, as compiled into the binary.
pub const MANIFEST_JSON: &str = include_str!("../triton/manifest.json");

/// What `compile.py` compiled, from which sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Each source file beside the manifest and its SHA-256 (hex) when it was compiled.
    pub sources: BTreeMap<String, String>,
    /// The Triton version that compiled them.
    pub triton: String,
    pub kernels: Vec<Kernel>,
}

/// One compiled kernel: what a launch needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// The file stem under `triton/kernels/` (`<name>.cubin`).
    pub name: String,
    /// Its source file.
    pub source: String,
    /// The `@triton.jit` function.
    pub kernel: String,
    /// The cubin's entry point.
    pub entry: String,
    /// Compute capability × 10 + minor (80, 90).
    pub arch: u32,
    /// The compile-time constants: tiles, soft cap, the optimizer's state dtype and chunk.
    pub constexprs: BTreeMap<String, serde_json::Value>,
    /// Threads per block = num_warps × 32.
    pub num_warps: u32,
    pub num_stages: u32,
    /// Whether multiplies and adds may fuse (off where the kernel must equal the composed ops).
    pub fp_fusion: bool,
    /// Dynamic shared memory, bytes.
    pub shared: u32,
    /// The kernel's parameters in order, `name:type` (`*bf16`, `*fp16`, `*fp32`, `*fp64`,
    /// `*i32`, `*i64`, `i32`, `fp32`, `fp64`).
    pub params: Vec<String>,
    /// The integer parameters it was compiled to assume are multiples of 16 (Triton's
    /// `tt.divisibility`: what lets a tile's rows load as 16-byte vectors); a launch with any
    /// other value is refused.
    pub multiple_of_16: Vec<String>,
    /// Null pointers Triton's calling convention appends after them.
    pub scratch_params: usize,
    /// SHA-256 (hex) of the cubin.
    pub sha256: String,
}

impl Kernel {
    /// The type of parameter `i` (`*bf16`, `i32`, …).
    pub fn param_type(&self, i: usize) -> Option<&str> {
        self.params.get(i)?.split_once(':').map(|(_, t)| t)
    }

    /// The name of parameter `i`.
    pub fn param_name(&self, i: usize) -> Option<&str> {
        self.params.get(i)?.split_once(':').map(|(n, _)| n)
    }

    /// Why `value` cannot be parameter `i`, if it was compiled as a multiple of 16 and is not.
    pub fn misfit(&self, i: usize, value: i64) -> Option<String> {
        let name = self.param_name(i)?;
        (self.multiple_of_16.iter().any(|m| m == name) && value % 16 != 0).then(|| {
            format!(
                "{}: `{name}` = {value}, where the kernel was compiled for multiples of 16",
                self.name
            )
        })
    }

    /// A tile-size constexpr.
    pub fn tile(&self, name: &str) -> Option<usize> {
        self.constexprs.get(name)?.as_u64().map(|v| v as usize)
    }
}

/// What a launch asks of a kernel: parameter types by index and constexpr values (a constexpr
/// the kernel does not have is not asked of it).
pub struct Want<'a> {
    pub kernel: &'a str,
    pub arch: u32,
    pub types: &'a [(usize, &'a str)],
    pub constexprs: &'a [(&'a str, serde_json::Value)],
}

impl Manifest {
    /// The manifest compiled into this binary.
    pub fn embedded() -> crate::error::Result<Self> {
        serde_json::from_str(MANIFEST_JSON).map_err(|e| {
            crate::error::Error::Model(format!(
                "the Triton kernels' manifest (src/model/fused/triton/manifest.json): {e}; \
                 rerun src/model/fused/triton/compile.py"
            ))
        })
    }

    /// The kernel compiled for `want`, if any.
    pub fn find(&self, want: &Want<'_>) -> Option<&Kernel> {
        self.kernels.iter().find(|k| {
            k.kernel == want.kernel
                && k.arch == want.arch
                && want.types.iter().all(|&(i, t)| k.param_type(i) == Some(t))
                && want
                    .constexprs
                    .iter()
                    .all(|(name, v)| k.constexprs.get(*name).is_none_or(|have| have == v))
        })
    }
}

/// The manifest's name of a tensor dtype.
pub fn dtype_name(dtype: candle_core::DType) -> Option<&'static str> {
    match dtype {
        candle_core::DType::BF16 => Some("bf16"),
        candle_core::DType::F16 => Some("fp16"),
        candle_core::DType::F32 => Some("fp32"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::fs;
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/model/fused/triton")
    }

    #[test]
    fn the_committed_kernels_are_compiled_from_the_committed_sources() {
        let m = Manifest::embedded().unwrap();
        assert!(m.sources.contains_key("flash_attn.py") && m.sources.contains_key("adamw.py"));
        for (source, sha) in &m.sources {
            assert_eq!(
                &fs::sha256(&dir().join(source)).unwrap(),
                sha,
                "{source} changed since its kernels were compiled: run `make triton-compile`"
            );
        }
        for k in &m.kernels {
            let path = dir().join("kernels").join(format!("{}.cubin", k.name));
            assert_eq!(
                fs::sha256(&path).unwrap(),
                k.sha256,
                "{} is not what compile.py wrote",
                path.display()
            );
            assert!(m.sources.contains_key(&k.source), "{}", k.name);
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(dir().join("kernels"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = m
            .kernels
            .iter()
            .map(|k| format!("{}.cubin", k.name))
            .collect();
        listed.sort();
        assert_eq!(
            on_disk, listed,
            "kernels/ holds files the manifest does not list"
        );
    }

    #[test]
    fn every_launch_contract_is_complete() {
        let m = Manifest::embedded().unwrap();
        for k in &m.kernels {
            assert_eq!(k.scratch_params, 2, "{}", k.name);
            for name in &k.multiple_of_16 {
                let i = (0..k.params.len()).find(|&i| k.param_name(i) == Some(name));
                let i = i.unwrap_or_else(|| panic!("{}: no parameter {name}", k.name));
                assert_eq!(k.param_type(i), Some("i32"), "{}: {name}", k.name);
                assert!(k.misfit(i, 64).is_none() && k.misfit(i, 0).is_none());
                assert!(k.misfit(i, 24).unwrap().contains(name.as_str()));
            }
            // The attention's head dim and strides: its tiles' loads are vectorized only so.
            if k.source == "flash_attn.py" {
                let strides = k
                    .params
                    .iter()
                    .filter(|p| p.starts_with('s') && p.ends_with(":i32"));
                assert_eq!(k.multiple_of_16.len(), strides.count() + 1, "{}", k.name);
                assert!(
                    k.multiple_of_16.iter().any(|m| m == "head_dim"),
                    "{}",
                    k.name
                );
            } else {
                assert!(k.multiple_of_16.is_empty(), "{}", k.name);
            }
            assert!(k.num_warps >= 1 && k.num_warps * 32 <= 1024, "{}", k.name);
            // sm_80's and sm_90's opt-in shared memory per block.
            let limit = if k.arch >= 90 { 227 << 10 } else { 163 << 10 };
            assert!(
                k.shared <= limit,
                "{}: {} bytes of shared memory",
                k.name,
                k.shared
            );
            assert!((0..k.params.len()).all(|i| k.param_type(i).is_some()));
            assert_eq!(k.entry, k.kernel, "{}", k.name);
            // AdamW (dense and 8-bit) must equal the composed ops op by op: no fused
            // multiply-adds.
            let optimizer = matches!(k.source.as_str(), "adamw.py" | "adamw8.py");
            assert_eq!(k.fp_fusion, !optimizer, "{}", k.name);
        }
    }

    #[test]
    fn a_launch_finds_exactly_its_variant() {
        let m = Manifest::embedded().unwrap();
        let want = |kernel, types: &[(usize, &str)], consts: &[(&str, serde_json::Value)]| {
            m.kernels
                .iter()
                .filter(|k| {
                    k.arch == 90
                        && std::ptr::eq(
                            *k,
                            m.find(&Want {
                                kernel,
                                arch: 90,
                                types,
                                constexprs: consts,
                            })
                            .unwrap_or(&m.kernels[0]),
                        )
                })
                .count()
        };
        use serde_json::json;
        assert_eq!(
            want(
                "flash_fwd",
                &[(0, "*bf16")],
                &[("BLOCK_D", json!(128)), ("SOFTCAP", json!(true))]
            ),
            1
        );
        // the optimizer's four variants: state dtype × master weights' dtype
        for (state, weights, name) in [
            (false, false, "adamw_multi_sm90_fp32"),
            (false, true, "adamw_multi_sm90_fp32_wbf16"),
            (true, false, "adamw_multi_sm90_bf16"),
            (true, true, "adamw_multi_sm90_bf16_wbf16"),
        ] {
            let consts = [("BF16", json!(state)), ("W_BF16", json!(weights))];
            assert_eq!(want("adamw_multi", &[], &consts), 1, "{name}");
            let adamw = m
                .find(&Want {
                    kernel: "adamw_multi",
                    arch: 90,
                    types: &[],
                    constexprs: &consts,
                })
                .unwrap();
            assert_eq!(adamw.name, name);
            assert_eq!(adamw.param_type(0), Some("*i64"));
            assert_eq!(adamw.tile("CHUNK"), Some(super::super::adamw_step::CHUNK));
            // and its 8-bit moments' update, on the same chunks
            assert_eq!(want("adamw8_multi", &[], &consts), 1, "{name}");
            let adamw8 = m
                .find(&Want {
                    kernel: "adamw8_multi",
                    arch: 90,
                    types: &[],
                    constexprs: &consts,
                })
                .unwrap();
            assert_eq!(adamw8.name, name.replace("adamw_multi", "adamw8_multi"));
            assert_eq!(adamw8.tile("CHUNK"), Some(super::super::adamw_step::CHUNK));
            assert_eq!(
                adamw8.tile("QBLOCK"),
                Some(super::super::adamw_step::QBLOCK)
            );
        }
    }
}
