use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind};
use crate::value::{Enumerator, Object, ObjectRepr, Value};

/// The deepest a value stored into a namespace may nest, and the most values it may hold
/// (refdpo's patch, `PATCH.md`). A namespace is the one value a template can change, so it is
/// the one way to build a value that holds itself, or one nested a level deeper on every pass of
/// a loop; printing, serializing or comparing such a value recursed until the stack overflowed,
/// an abort no caller can catch.
const MAX_DEPTH: usize = 64;
const MAX_VALUES: usize = 100_000;

/// This object exists for the `namespace` function.
///
/// It's special in that it behaves like a dictionary in many ways but it's the only
/// object that can be used with `{% set %}` assignments.  This is used internally
/// in the vm via downcasting.
#[derive(Debug, Default)]
pub(crate) struct Namespace {
    data: Mutex<BTreeMap<Arc<str>, Value>>,
}

impl Object for Namespace {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.data.lock().unwrap().get(some!(key.as_str())).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let data = self.data.lock().unwrap();
        let keys = data.keys().cloned().map(Value::from);
        Enumerator::Values(keys.collect())
    }
}

impl Namespace {
    pub(crate) fn set_value(&self, key: &str, value: Value) {
        self.data.lock().unwrap().insert(key.into(), value);
    }

    /// Whether `value` may be stored in this namespace: not if it holds the namespace itself,
    /// nests deeper than `MAX_DEPTH` or holds more than `MAX_VALUES` values (refdpo's patch).
    pub(crate) fn check_storable(&self, value: &Value) -> Result<(), Error> {
        let mut count = 0;
        self.walk(value, 0, &mut count)
            .map_err(|why| Error::new(ErrorKind::InvalidOperation, why))
    }

    fn walk(&self, value: &Value, depth: usize, count: &mut usize) -> Result<(), &'static str> {
        *count += 1;
        if *count > MAX_VALUES {
            return Err("cannot store a value of more than 100000 items in a namespace");
        }
        if depth > MAX_DEPTH {
            return Err("cannot store a value nested more than 64 deep in a namespace");
        }
        if let Some(ns) = value.downcast_object_ref::<Namespace>() {
            if std::ptr::eq(ns, self) {
                return Err("cannot store a namespace in itself");
            }
            // cloned out: no lock is held while the values are walked
            let values: Vec<Value> = ns.data.lock().unwrap().values().cloned().collect();
            for v in &values {
                self.walk(v, depth + 1, count)?;
            }
            return Ok(());
        }
        let Some(obj) = value.as_object() else {
            return Ok(());
        };
        match obj.repr() {
            ObjectRepr::Map => {
                if let Some(pairs) = obj.try_iter_pairs() {
                    for (_, v) in pairs {
                        self.walk(&v, depth + 1, count)?;
                    }
                }
            }
            ObjectRepr::Seq | ObjectRepr::Iterable => {
                if let Some(values) = obj.try_iter() {
                    for v in values {
                        self.walk(&v, depth + 1, count)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
