//! What each of the tiled attention's four launches passes, in the kernels' parameter order:
//! buffers by their parameter names, sizes, strides and constants by value, and the grid. Plain
//! data, so that it is checked on the CPU against the launches `../triton/host.py` makes for the
//! same shapes (the launches the interpreter tests run): `cuda.rs` only puts the device buffers
//! in the named places.

use super::cpu::{Dims, Order};
use super::op::Params;

/// One argument of a launch.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A buffer, by the name of its parameter in the kernels that take it (`Q`, `LSE`, …; `CU`
    /// the keys' sequence offsets, `CU_Q` the queries').
    Buf(&'static str),
    /// A size, stride or constant, passed as i32.
    Int(usize),
    Float(f32),
}

/// One kernel launch: the kernel, its grid and its arguments in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: [usize; 3],
    pub args: Vec<Value>,
}

/// The backward's compiled tiles: the query tile of the delta and dQ passes, and the key tile
/// of the dK/dV pass.
#[derive(Debug, Clone, Copy)]
pub struct Tiles {
    pub delta_m: usize,
    pub dkdv_n: usize,
    pub dq_m: usize,
}

/// The attention's shape: `n` (its `t` the keys' positions per batch row), `tq` the queries'
/// positions per batch row, and each sequence's keys and queries (its last positions).
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub n: Dims,
    pub tq: usize,
    pub keys: &'a [usize],
    pub queries: &'a [usize],
}

/// (batch, position, head) strides of a contiguous tensor of `h` heads over `t` positions.
fn strides(n: Dims, h: usize, t: usize) -> [Value; 3] {
    let head = match n.order {
        Order::Bhtd => t * n.d,
        Order::Bthd => n.d,
    };
    [
        Value::Int(h * t * n.d),
        Value::Int(n.position_stride(h)),
        Value::Int(head),
    ]
}

/// The values every kernel but the delta ends with.
fn scalars(s: &Shape, p: &Params) -> [Value; 8] {
    let n = s.n;
    [
        Value::Int(n.t),
        Value::Int(s.tq),
        Value::Int(n.b * s.tq),
        Value::Int(n.d),
        Value::Int(n.hq / n.hkv),
        Value::Int(p.window),
        Value::Float(p.scale),
        Value::Float(p.softcap.unwrap_or(1.0)),
    ]
}

/// A program per `block` positions of the longest sequence, per sequence, per head (a shorter
/// sequence's extra programs return).
fn grid(lens: &[usize], block: usize, heads: usize) -> [usize; 3] {
    let longest = lens.iter().copied().max().unwrap_or(0);
    [longest.div_ceil(block), lens.len(), heads]
}

fn bufs<'a>(names: &'a [&'static str]) -> impl Iterator<Item = Value> + 'a {
    names.iter().map(|&b| Value::Buf(b))
}

/// The forward: o and the log-sum-exp, a program per query tile (`block_m` positions) of each
/// sequence's positions.
pub fn forward(s: &Shape, p: &Params, block_m: usize) -> Launch {
    let n = s.n;
    let mut args: Vec<Value> = bufs(&["Q", "K", "V", "O", "LSE", "CU", "CU_Q"]).collect();
    for (h, t) in [(n.hq, s.tq), (n.hkv, n.t), (n.hkv, n.t), (n.hq, s.tq)] {
        args.extend(strides(n, h, t));
    }
    args.extend(scalars(s, p));
    Launch {
        kernel: "flash_fwd",
        grid: grid(s.keys, block_m, n.hq),
        args,
    }
}

/// The backward's three passes: delta (on the queries' axis), dK and dV (a program per key
/// tile of each kv head), dQ.
pub fn backward(s: &Shape, p: &Params, tiles: &Tiles) -> [Launch; 3] {
    let n = s.n;
    // the delta kernel's own offsets (`CU`) are the queries'
    let mut delta: Vec<Value> = bufs(&["O", "DO", "DELTA", "CU_Q"]).collect();
    delta.extend(strides(n, n.hq, s.tq));
    delta.extend(strides(n, n.hq, s.tq));
    delta.extend([Value::Int(s.tq), Value::Int(n.b * s.tq), Value::Int(n.d)]);
    let inputs = [(n.hq, s.tq), (n.hkv, n.t), (n.hkv, n.t), (n.hq, s.tq)];
    let ins = ["Q", "K", "V", "DO", "LSE", "DELTA"];
    let mut dkdv: Vec<Value> = bufs(&ins)
        .chain(bufs(&["DK", "DV", "CU", "CU_Q"]))
        .collect();
    for (h, t) in inputs.into_iter().chain([(n.hkv, n.t); 2]) {
        dkdv.extend(strides(n, h, t));
    }
    dkdv.extend(scalars(s, p));
    let mut dq: Vec<Value> = bufs(&ins).chain(bufs(&["DQ", "CU", "CU_Q"])).collect();
    for (h, t) in inputs.into_iter().chain([(n.hq, s.tq)]) {
        dq.extend(strides(n, h, t));
    }
    dq.extend(scalars(s, p));
    [
        Launch {
            kernel: "flash_bwd_delta",
            grid: grid(s.queries, tiles.delta_m, n.hq),
            args: delta,
        },
        Launch {
            kernel: "flash_bwd_dkdv",
            grid: grid(s.keys, tiles.dkdv_n, n.hkv),
            args: dkdv,
        },
        Launch {
            kernel: "flash_bwd_dq",
            grid: grid(s.keys, tiles.dq_m, n.hq),
            args: dq,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::cubins::{Manifest, Want};
    use serde_json::Value as Json;

    /// The manifest's tile `name` of `kernel` for head dim `d` (any arch and dtype: the tiles are
    /// the same).
    fn tile(m: &Manifest, kernel: &str, d: usize, softcap: bool, name: &str) -> usize {
        let mut consts = vec![("BLOCK_D", super::super::block_d(d).into())];
        if kernel != "flash_bwd_delta" {
            consts.push(("SOFTCAP", softcap.into()));
        }
        let want = Want {
            kernel,
            arch: 90,
            types: &[(0, "*bf16")],
            constexprs: &consts,
        };
        m.find(&want).unwrap().tile(name).unwrap()
    }

    /// A value of the plan as launches.json writes it: buffers by name, integers, floats;
    /// where every position is a query, the queries' offsets are the keys' (one tensor there).
    fn json(v: &Value, same_queries: bool) -> Json {
        match v {
            Value::Buf("CU_Q") if same_queries => Json::from("CU"),
            Value::Buf(name) => Json::from(*name),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => Json::from(f64::from(*f)),
        }
    }

    /// Each launch of the plan is the launch `../triton/host.py` makes for the same shape
    /// (`launches.json`, from `launches.py`): padded and packed batches, both orders, fewer
    /// queries than keys, a window, a cap, grouped heads.
    #[test]
    fn every_launch_is_the_python_launchers() {
        let m = Manifest::embedded().unwrap();
        let cases: Json = serde_json::from_str(include_str!("../triton/launches.json")).unwrap();
        let cases = cases.as_object().unwrap();
        assert_eq!(cases.len(), 4);
        for (name, case) in cases {
            let s = &case["shape"];
            let int = |k: &str| s[k].as_u64().unwrap() as usize;
            let list = |k: &str| -> Vec<usize> {
                s[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect()
            };
            let order = match s["layout"].as_str().unwrap() {
                "bthd" => Order::Bthd,
                _ => Order::Bhtd,
            };
            let n = Dims {
                b: int("b"),
                hq: int("hq"),
                hkv: int("hkv"),
                t: int("t"),
                d: int("d"),
                order,
            };
            let (keys, queries) = (list("keys"), list("queries"));
            let cap = s["softcap"].as_f64().unwrap() as f32;
            let p = Params {
                scale: s["scale"].as_f64().unwrap() as f32,
                window: int("window"),
                softcap: (cap != 0.0).then_some(cap),
            };
            let shape = Shape {
                n,
                tq: int("tq"),
                keys: &keys,
                queries: &queries,
            };
            let softcap = p.softcap.is_some();
            let t = |kernel: &str, name: &str| tile(&m, kernel, n.d, softcap, name);
            let tiles = Tiles {
                delta_m: t("flash_bwd_delta", "BLOCK_M"),
                dkdv_n: t("flash_bwd_dkdv", "BLOCK_N"),
                dq_m: t("flash_bwd_dq", "BLOCK_M"),
            };
            let ours = [
                vec![forward(&shape, &p, t("flash_fwd", "BLOCK_M"))],
                backward(&shape, &p, &tiles).to_vec(),
            ]
            .concat();
            let theirs = case["launches"].as_array().unwrap();
            assert_eq!(ours.len(), theirs.len(), "{name}");
            let same_queries = keys == queries;
            for (ours, theirs) in ours.iter().zip(theirs) {
                let what = format!("{name} {}", ours.kernel);
                assert_eq!(ours.kernel, theirs["kernel"].as_str().unwrap(), "{what}");
                let grid: Vec<usize> = theirs["grid"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(ours.grid.to_vec(), grid, "{what}: grid");
                let ours: Vec<Json> = ours.args.iter().map(|v| json(v, same_queries)).collect();
                assert_eq!(&Json::from(ours), &theirs["args"], "{what}: arguments");
            }
        }
    }
}
