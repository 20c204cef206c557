//! `text % args` as Python's printf-style formatting (refdpo's patch, `PATCH.md`): Jinja2
//! evaluates `'%s and %d' % (a, 3)` with Python's `str.__mod__`, where minijinja had no `%` for
//! strings. A tuple on the right is the arguments; a map is the mapping of `%(key)s`; any other
//! value is one argument.

use std::fmt::Write;

use super::pyrepr::{write_repr, PyTuple};
use super::{Value, ValueKind};
use crate::error::{Error, ErrorKind};

fn type_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// One conversion's flags, width and precision.
#[derive(Default)]
struct Spec {
    left: bool,
    plus: bool,
    space: bool,
    zero: bool,
    alt: bool,
    width: usize,
    precision: Option<usize>,
}

/// The widest field or precision a conversion may ask for (the output stays bounded).
const MAX_FIELD: usize = 100_000;

/// `format % rhs`.
pub(crate) fn format(text: &str, rhs: &Value) -> Result<Value, Error> {
    let keyed = text.contains("%(");
    // a tuple is the arguments; any other value (a list, a dict) is one argument
    let args: Vec<Value> = match rhs.downcast_object_ref::<PyTuple>() {
        Some(t) if !keyed => t.0.clone(),
        _ => vec![rhs.clone()],
    };
    let mut next = args.iter();
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut arg: Option<Value> = None;
        if chars.peek() == Some(&'(') {
            chars.next();
            let mut key = String::new();
            let mut depth = 1;
            for k in chars.by_ref() {
                match k {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                key.push(k);
            }
            if rhs.kind() != ValueKind::Map {
                return Err(type_error("format requires a mapping"));
            }
            arg = Some(ok!(rhs.get_item(&Value::from(key.as_str()))));
            if arg.as_ref().is_some_and(Value::is_undefined) {
                return Err(type_error(format!("KeyError: {key:?}")));
            }
        }
        let mut spec = Spec::default();
        while let Some(&f) = chars.peek() {
            match f {
                '-' => spec.left = true,
                '+' => spec.plus = true,
                ' ' => spec.space = true,
                '0' => spec.zero = true,
                '#' => spec.alt = true,
                _ => break,
            }
            chars.next();
        }
        let number = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
                          next: &mut std::slice::Iter<'_, Value>|
         -> Result<Option<usize>, Error> {
            if chars.peek() == Some(&'*') {
                chars.next();
                let v = next
                    .next()
                    .ok_or_else(|| type_error("not enough arguments for format string"))?;
                let n = i64::try_from(v.clone()).map_err(|_| type_error("* wants int"))?;
                return Ok(Some(n.unsigned_abs() as usize));
            }
            let mut n: Option<usize> = None;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                chars.next();
                n = Some(n.unwrap_or(0).saturating_mul(10).saturating_add(d as usize));
            }
            Ok(n)
        };
        spec.width = ok!(number(&mut chars, &mut next)).unwrap_or(0);
        if chars.peek() == Some(&'.') {
            chars.next();
            spec.precision = Some(ok!(number(&mut chars, &mut next)).unwrap_or(0));
        }
        if spec.width > MAX_FIELD || spec.precision.is_some_and(|p| p > MAX_FIELD) {
            return Err(type_error(format!(
                "a format field wider than {MAX_FIELD} characters"
            )));
        }
        // length modifiers are accepted and ignored, as Python does
        while matches!(chars.peek(), Some('h' | 'l' | 'L')) {
            chars.next();
        }
        let conv = chars
            .next()
            .ok_or_else(|| type_error("incomplete format"))?;
        if conv == '%' {
            out.push('%');
            continue;
        }
        let arg = match arg {
            Some(a) => a,
            None => next
                .next()
                .cloned()
                .ok_or_else(|| type_error("not enough arguments for format string"))?,
        };
        ok!(convert(&mut out, conv, &arg, &spec));
    }
    if !keyed && next.next().is_some() {
        return Err(type_error(
            "not all arguments converted during string formatting",
        ));
    }
    Ok(Value::from(out))
}

/// Pads `body` (after its sign or prefix `lead`) to the spec's width.
fn pad(out: &mut String, lead: &str, body: &str, spec: &Spec, numeric: bool) {
    let len = lead.chars().count() + body.chars().count();
    let fill = spec.width.saturating_sub(len);
    if spec.left {
        out.push_str(lead);
        out.push_str(body);
        out.extend(std::iter::repeat_n(' ', fill));
    } else if spec.zero && numeric {
        out.push_str(lead);
        out.extend(std::iter::repeat_n('0', fill));
        out.push_str(body);
    } else {
        out.extend(std::iter::repeat_n(' ', fill));
        out.push_str(lead);
        out.push_str(body);
    }
}

fn sign(negative: bool, spec: &Spec) -> &'static str {
    match (negative, spec.plus, spec.space) {
        (true, _, _) => "-",
        (false, true, _) => "+",
        (false, false, true) => " ",
        _ => "",
    }
}

/// The number a `%d`/`%x`/`%e`… conversion reads, as Python's `int()`/`float()` of it.
fn number_of(arg: &Value, conv: char) -> Result<Value, Error> {
    match arg.kind() {
        ValueKind::Number => Ok(arg.clone()),
        ValueKind::Bool => Ok(Value::from(i64::from(arg.is_true()))),
        _ => Err(type_error(format!(
            "%{conv} format: a real number is required, not {}",
            arg.kind()
        ))),
    }
}

fn convert(out: &mut String, conv: char, arg: &Value, spec: &Spec) -> Result<(), Error> {
    match conv {
        's' | 'r' | 'a' => {
            let mut text = String::new();
            if conv == 's' {
                write!(text, "{arg}").ok();
            } else {
                write!(text, "{}", Repr(arg)).ok();
            }
            if let Some(p) = spec.precision {
                text = text.chars().take(p).collect();
            }
            pad(out, "", &text, spec, false);
        }
        'c' => {
            let ch = match arg.as_str() {
                Some(s) if s.chars().count() == 1 => s.to_string(),
                _ => {
                    let code = u32::try_from(arg.clone())
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| type_error("%c requires an int or a unicode character"))?;
                    code.to_string()
                }
            };
            pad(out, "", &ch, spec, false);
        }
        'd' | 'i' | 'u' | 'o' | 'x' | 'X' => {
            let n = ok!(number_of(arg, conv));
            let v: i128 = match i128::try_from(n.clone()) {
                Ok(v) => v,
                Err(_) => {
                    let f = f64::try_from(n).unwrap_or(f64::NAN);
                    if !f.is_finite() {
                        return Err(type_error("cannot convert float infinity or NaN to integer"));
                    }
                    f.trunc() as i128
                }
            };
            let mag = v.unsigned_abs();
            let mut digits = match conv {
                'o' => format!("{mag:o}"),
                'x' => format!("{mag:x}"),
                'X' => format!("{mag:X}"),
                _ => mag.to_string(),
            };
            if let Some(p) = spec.precision {
                if digits.len() < p {
                    digits = format!("{}{digits}", "0".repeat(p - digits.len()));
                }
            }
            let prefix = match (spec.alt, conv) {
                (true, 'o') => "0o",
                (true, 'x') => "0x",
                (true, 'X') => "0X",
                _ => "",
            };
            let lead = format!("{}{prefix}", sign(v < 0, spec));
            pad(out, &lead, &digits, spec, true);
        }
        'e' | 'E' | 'f' | 'F' | 'g' | 'G' => {
            let x = f64::try_from(ok!(number_of(arg, conv))).unwrap_or(f64::NAN);
            let upper = conv.is_ascii_uppercase();
            let body = if x.is_finite() {
                float_body(x.abs(), conv.to_ascii_lowercase(), spec)
            } else if x.is_nan() {
                "nan".to_string()
            } else {
                "inf".to_string()
            };
            let body = if upper { body.to_uppercase() } else { body };
            let numeric = x.is_finite();
            pad(out, sign(x.is_sign_negative() && !x.is_nan(), spec), &body, spec, numeric);
        }
        other => {
            return Err(type_error(format!(
                "unsupported format character {other:?}"
            )))
        }
    }
    Ok(())
}

/// Python's `repr` of a value (`%r`).
struct Repr<'a>(&'a Value);

impl std::fmt::Display for Repr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_repr(self.0, f)
    }
}

/// `%e`, `%f` or `%g` of a finite, non-negative `x` (C's printf, as Python's).
fn float_body(x: f64, conv: char, spec: &Spec) -> String {
    let p = spec.precision.unwrap_or(6);
    let exp_form = |x: f64, p: usize| {
        let s = format!("{x:.p$e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let m = if spec.alt && p == 0 { format!("{m}.") } else { m.to_string() };
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    match conv {
        'e' => exp_form(x, p),
        'f' => {
            let s = format!("{x:.p$}");
            if spec.alt && p == 0 {
                format!("{s}.")
            } else {
                s
            }
        }
        _ => {
            let p = p.max(1);
            // the exponent %e would show at this precision (after its rounding)
            let e: i32 = format!("{x:.prec$e}", prec = p - 1)
                .split_once('e')
                .and_then(|(_, e)| e.parse().ok())
                .unwrap_or(0);
            let mut s = if -4 <= e && e < p as i32 {
                let decimals = (p as i32 - 1 - e).max(0) as usize;
                format!("{x:.decimals$}")
            } else {
                exp_form(x, p - 1)
            };
            if !spec.alt {
                let (m, tail) = match s.find('e') {
                    Some(i) => (s[..i].to_string(), s[i..].to_string()),
                    None => (s.clone(), String::new()),
                };
                let m = if m.contains('.') {
                    m.trim_end_matches('0').trim_end_matches('.').to_string()
                } else {
                    m
                };
                s = format!("{m}{tail}");
            }
            s
        }
    }
}
