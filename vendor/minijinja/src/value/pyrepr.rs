//! Values printed as Jinja2 prints them (refdpo's patch, `PATCH.md`): a float as Python's
//! `str(float)`, and a list or dict as Python's `repr`, each string in it quoted as `repr`
//! quotes it. A chat template that prints a message's list of content parts, a tool call's
//! arguments or a float then writes the text transformers writes.

use std::fmt::{self, Write};
use std::sync::Arc;

use super::py_unprintable::UNPRINTABLE;
use super::{Enumerator, Object, ObjectRepr, Value, ValueRepr};

/// A Python tuple, as `dictsort`, `items` and `str.partition` make them: a sequence that prints
/// as `(a, b)` (`(a,)` with one item), where a list prints as `[a, b]`.
#[derive(Debug, Clone)]
pub struct PyTuple(pub Vec<Value>);

impl PyTuple {
    /// The tuple as a value.
    pub fn value(items: Vec<Value>) -> Value {
        Value::from_object(PyTuple(items))
    }
}

impl Object for PyTuple {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('(')?;
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write_repr(item, f)?;
        }
        if self.0.len() == 1 {
            f.write_char(',')?;
        }
        f.write_char(')')
    }
}

/// Python's `repr(float)` (which `str` equals): the shortest digits that read back, in fixed
/// notation for decimal exponents -4 to 15 (with a `.0` where whole), else as `1e-05` or
/// `1.5e+20`; `inf`, `-inf` and `nan`.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{:e}", x.abs()); // shortest round-trip digits: "1.5e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        return format!("{sign}{text}");
    }
    let mantissa = match digits.split_at(1) {
        (first, "") => first.to_string(),
        (first, rest) => format!("{first}.{rest}"),
    };
    let exp_sign = if exp < 0 { '-' } else { '+' };
    format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
}

/// Python's `repr` of a value inside a printed list or dict.
pub(crate) fn write_repr(v: &Value, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match &v.0 {
        ValueRepr::String(s, _) => write_str_repr(s, f),
        ValueRepr::SmallStr(s) => write_str_repr(s.as_str(), f),
        ValueRepr::Undefined(_) => f.write_str("Undefined"),
        ValueRepr::Bytes(_) => fmt::Debug::fmt(v, f),
        // numbers, booleans and None print as their repr; lists and dicts recurse
        _ => fmt::Display::fmt(v, f),
    }
}

/// A list's items as Python's `repr` writes them: `[1, 'a']`.
pub(crate) fn write_list(
    items: impl Iterator<Item = Value>,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    f.write_char('[')?;
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_repr(&item, f)?;
    }
    f.write_char(']')
}

/// A dict's pairs as Python's `repr` writes them: `{'a': 1}`.
pub(crate) fn write_dict(
    pairs: impl Iterator<Item = (Value, Value)>,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    f.write_char('{')?;
    for (i, (key, value)) in pairs.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_repr(&key, f)?;
        f.write_str(": ")?;
        write_repr(&value, f)?;
    }
    f.write_char('}')
}

/// Python's `repr(str)` (CPython's `unicode_repr`): single quotes, or double quotes where the
/// text holds a single quote and no double quote; `\\`, the quote, `\t`, `\n` and `\r`
/// escaped, and every other character `str.isprintable` is false for as `\xhh`, `\uhhhh` or
/// `\Uhhhhhhhh`.
fn write_str_repr(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    f.write_char(quote)?;
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            c if c == quote => write!(f, "\\{c}")?,
            '\t' => f.write_str("\\t")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
            c if (c as u32) < 0x7f || printable(c) => f.write_char(c)?,
            c if (c as u32) <= 0xff => write!(f, "\\x{:02x}", c as u32)?,
            c if (c as u32) <= 0xffff => write!(f, "\\u{:04x}", c as u32)?,
            c => write!(f, "\\U{:08x}", c as u32)?,
        }
    }
    f.write_char(quote)
}

/// Python's `str.isprintable` of a character from U+0080 up.
fn printable(c: char) -> bool {
    let c = c as u32;
    let i = UNPRINTABLE.partition_point(|&(_, last)| last < c);
    UNPRINTABLE.get(i).is_none_or(|&(first, _)| c < first)
}
