//! Python's string methods and Jinja2's filters that chat templates call and minijinja (with
//! minijinja-contrib's `pycompat`) lacks or reads otherwise: `rsplit`, `removeprefix`,
//! `removesuffix`, `partition`, `rpartition`, `center`, `ljust`, `rjust`, `zfill`, `index`,
//! `rindex`; Jinja2's `int`, `float`, `wordcount`, `center`, `truncate` and `striptags`. Each as
//! CPython 3.11 and Jinja2 3.1 compute it (checked in
//! `tokenize::template::tests::jinja2_features_render_as_transformers`).

use super::python::py_space;
use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// A string argument, or the error Python raises for another type.
fn text_arg<'a>(args: &'a [Value], i: usize, method: &str) -> Result<&'a str, Error> {
    args[i]
        .as_str()
        .ok_or_else(|| invalid(format!("str.{method}() takes a string, not {}", args[i])))
}

/// A width argument: a count (a negative one is 0 to Python's padding).
fn width_arg(args: &[Value], i: usize, method: &str) -> Result<usize, Error> {
    let w = i64::try_from(args[i].clone())
        .map_err(|_| invalid(format!("str.{method}() takes an integer width")))?;
    let w = usize::try_from(w.max(0)).unwrap_or(0);
    super::bounds::indent_width(Some(w)).map(|w| w.unwrap_or(0))
}

/// A fill character: one character, as Python requires.
fn fill_arg(args: &[Value], i: usize, method: &str) -> Result<char, Error> {
    let Some(v) = args.get(i) else {
        return Ok(' ');
    };
    let mut chars = v.as_str().unwrap_or_default().chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(invalid(format!(
            "str.{method}()'s fill character must be exactly one character, not {v}"
        ))),
    }
}

/// `text.method(*args)` for the methods above; `None` for another method (others take it).
pub fn method(text: &str, name: &str, args: &[Value]) -> Option<Result<Value, Error>> {
    let n = args.len();
    let r = match (name, n) {
        ("rsplit", 0..=2) => rsplit(text, args),
        ("removeprefix", 1) => {
            text_arg(args, 0, name).map(|p| Value::from(text.strip_prefix(p).unwrap_or(text)))
        }
        ("removesuffix", 1) => {
            text_arg(args, 0, name).map(|s| Value::from(text.strip_suffix(s).unwrap_or(text)))
        }
        ("partition" | "rpartition", 1) => text_arg(args, 0, name).and_then(|sep| {
            if sep.is_empty() {
                return Err(invalid("empty separator (a ValueError in Python)".into()));
            }
            let found = if name == "partition" {
                text.find(sep)
            } else {
                text.rfind(sep)
            };
            let parts = match (found, name) {
                (Some(i), _) => [&text[..i], sep, &text[i + sep.len()..]],
                (None, "partition") => [text, "", ""],
                (None, _) => ["", "", text],
            };
            Ok(minijinja::value::PyTuple::value(
                parts.map(Value::from).to_vec(),
            ))
        }),
        ("center" | "ljust" | "rjust", 1 | 2) => width_arg(args, 0, name)
            .and_then(|w| fill_arg(args, 1, name).map(|c| Value::from(pad(text, w, c, name)))),
        ("zfill", 1) => width_arg(args, 0, name).map(|w| Value::from(zfill(text, w))),
        ("index" | "rindex", 1) => text_arg(args, 0, name).and_then(|sub| {
            let at = if name == "index" {
                text.find(sub)
            } else {
                text.rfind(sub)
            };
            at.map(|b| Value::from(text[..b].chars().count()))
                .ok_or_else(|| invalid("substring not found (a ValueError in Python)".into()))
        }),
        _ => return None,
    };
    Some(r)
}

/// `str.rsplit(sep=None, maxsplit=-1)`: from the right; without a separator, runs of Python's
/// whitespace separate and none is kept at either end.
fn rsplit(text: &str, args: &[Value]) -> Result<Value, Error> {
    let max = match args.get(1) {
        None => -1,
        Some(v) => i64::try_from(v.clone())
            .map_err(|_| invalid("str.rsplit()'s maxsplit must be an integer".into()))?,
    };
    let max = usize::try_from(max).ok();
    let mut parts: Vec<&str> = Vec::new();
    match args.first().filter(|v| !v.is_none()) {
        Some(sep) => {
            let sep = sep
                .as_str()
                .ok_or_else(|| invalid(format!("str.rsplit() takes a string, not {sep}")))?;
            if sep.is_empty() {
                return Err(invalid("empty separator (a ValueError in Python)".into()));
            }
            let mut rest = text;
            while max.is_none_or(|m| parts.len() < m) {
                let Some(i) = rest.rfind(sep) else { break };
                parts.push(&rest[i + sep.len()..]);
                rest = &rest[..i];
            }
            parts.push(rest);
        }
        None => {
            let mut rest = text.trim_end_matches(py_space);
            while !rest.is_empty() {
                if max.is_some_and(|m| parts.len() == m) {
                    parts.push(rest);
                    break;
                }
                let start = rest
                    .char_indices()
                    .rev()
                    .find(|&(_, c)| py_space(c))
                    .map_or(0, |(i, c)| i + c.len_utf8());
                parts.push(&rest[start..]);
                rest = rest[..start].trim_end_matches(py_space);
            }
        }
    }
    parts.reverse();
    Ok(Value::from_iter(parts.into_iter().map(Value::from)))
}

/// `str.center`, `ljust` and `rjust` (CPython's `pad`: `center` puts the odd space on the left
/// where the width is odd, else on the right).
fn pad(text: &str, width: usize, fill: char, how: &str) -> String {
    let len = text.chars().count();
    let Some(marg) = width.checked_sub(len).filter(|&m| m > 0) else {
        return text.to_string();
    };
    let left = match how {
        "ljust" => 0,
        "rjust" => marg,
        _ => marg / 2 + (marg & width & 1),
    };
    let fill = |n: usize| std::iter::repeat_n(fill, n).collect::<String>();
    format!("{}{text}{}", fill(left), fill(marg - left))
}

/// `str.zfill`: zeros after a leading sign.
fn zfill(text: &str, width: usize) -> String {
    let len = text.chars().count();
    if len >= width {
        return text.to_string();
    }
    let zeros = "0".repeat(width - len);
    match text.strip_prefix(['+', '-']) {
        Some(rest) => format!("{}{zeros}{rest}", &text[..1]),
        None => format!("{zeros}{text}"),
    }
}

/// Python's `int(text, base)` for bases 2–36 (whitespace around, a sign, `_` between digits,
/// the base's prefix for 2, 8 and 16); `None` where Python raises `ValueError`.
fn py_int(text: &str, base: u32) -> Option<i128> {
    let t = text.trim_matches(py_space);
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let prefix = match base {
        16 => ["0x", "0X"],
        8 => ["0o", "0O"],
        2 => ["0b", "0B"],
        _ => ["", ""],
    };
    let t = prefix
        .iter()
        .filter(|p| !p.is_empty())
        .find_map(|p| t.strip_prefix(p).map(|r| r.strip_prefix('_').unwrap_or(r)))
        .unwrap_or(t);
    if t.is_empty() || t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    let digits: String = t.chars().filter(|&c| c != '_').collect();
    if !digits.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let v = i128::from_str_radix(&digits, base).ok()?;
    Some(if neg { -v } else { v })
}

/// Python's `float(text)`: whitespace around, `_` between digits, `nan`, `inf`, `infinity`.
fn py_float(text: &str) -> Option<f64> {
    let t = text.trim_matches(py_space);
    // Rust reads `nan`, `inf` and `infinity` (any case, signed) as Python does
    let bare = t.trim_start_matches(['+', '-']).to_ascii_lowercase();
    if matches!(bare.as_str(), "nan" | "inf" | "infinity") {
        return t.parse::<f64>().ok();
    }
    let ok = |c: char| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-');
    if t.is_empty() || !t.chars().all(|c| ok(c) || c == '_') {
        return None;
    }
    // an underscore only between two digits
    let b = t.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let digit = |j: Option<&u8>| j.is_some_and(u8::is_ascii_digit);
            if !(i > 0 && digit(b.get(i - 1)) && digit(b.get(i + 1))) {
                return None;
            }
        }
    }
    t.replace('_', "").parse::<f64>().ok()
}

/// Jinja2's `int` filter: `int(value, base)` for text, `int(value)` otherwise, then
/// `int(float(value))`, then `default` (0).
pub fn int_filter(value: &Value, default: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let default = match default {
        Some(d) => d,
        None => kwargs
            .get::<Option<Value>>("default")?
            .unwrap_or(Value::from(0)),
    };
    let base = kwargs.get::<Option<u32>>("base")?.unwrap_or(10);
    kwargs.assert_all_used()?;
    if !(2..=36).contains(&base) {
        return Err(invalid(format!("int()'s base must be 2 to 36, not {base}")));
    }
    if let Some(text) = value.as_str() {
        if let Some(i) = py_int(text, base) {
            return Ok(Value::from(i));
        }
        return Ok(match py_float(text) {
            Some(f) if f.is_finite() => Value::from(f.trunc() as i128),
            _ => default,
        });
    }
    if value.is_number() {
        if let Ok(i) = i128::try_from(value.clone()) {
            return Ok(Value::from(i));
        }
        let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        return Ok(if f.is_finite() {
            Value::from(f.trunc() as i128)
        } else {
            default
        });
    }
    Ok(if value.kind() == minijinja::value::ValueKind::Bool {
        Value::from(i64::from(value.is_true()))
    } else {
        default
    })
}

/// Jinja2's `float` filter: `float(value)`, else `default` (0.0).
pub fn float_filter(value: &Value, default: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let default = match default {
        Some(d) => d,
        None => kwargs
            .get::<Option<Value>>("default")?
            .unwrap_or(Value::from(0.0)),
    };
    kwargs.assert_all_used()?;
    if let Some(text) = value.as_str() {
        return Ok(py_float(text).map_or(default, Value::from));
    }
    if value.kind() == minijinja::value::ValueKind::Bool {
        return Ok(Value::from(if value.is_true() { 1.0 } else { 0.0 }));
    }
    Ok(f64::try_from(value.clone()).map_or(default, Value::from))
}

/// Jinja2's `wordcount`: the matches of `\w+` (letters, digits and `_`, Unicode's).
pub fn wordcount(text: &str) -> usize {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    text.split(|c: char| !word(c))
        .filter(|w| !w.is_empty())
        .count()
}

/// Jinja2's `center` filter: `str.center(width)`, width 80 by default.
pub fn center_filter(text: &str, width: Option<usize>) -> Result<String, Error> {
    let width = super::bounds::indent_width(Some(width.unwrap_or(80)))?.unwrap_or(80);
    Ok(pad(text, width, ' ', "center"))
}

/// Jinja2's `truncate(length=255, killwords=False, end='...', leeway=5)`: the text as is within
/// `length + leeway` characters; else cut to `length - len(end)` (at the last space, unless
/// `killwords`) and `end` added.
pub fn truncate(
    text: &str,
    length: Option<usize>,
    killwords: Option<bool>,
    end: Option<String>,
    leeway: Option<usize>,
) -> Result<String, Error> {
    let length = length.unwrap_or(255);
    let end = end.unwrap_or_else(|| "...".into());
    let leeway = leeway.unwrap_or(5);
    let end_len = end.chars().count();
    if length < end_len {
        return Err(invalid(format!(
            "truncate's length {length} is shorter than its end {end:?} (an AssertionError)"
        )));
    }
    if text.chars().count() <= length.saturating_add(leeway) {
        return Ok(text.to_string());
    }
    let cut: String = text.chars().take(length - end_len).collect();
    if killwords.unwrap_or(false) {
        return Ok(cut + &end);
    }
    let kept = cut.rsplit_once(' ').map_or(cut.as_str(), |(head, _)| head);
    Ok(format!("{kept}{end}"))
}

/// Jinja2's `striptags` (markupsafe 3's `Markup.striptags`): comments and tags removed, runs of
/// whitespace one space, then entities unescaped. refdpo unescapes the five XML entities and
/// numeric references to printable characters; another entity is an error (`html.unescape`
/// knows 2,231 names), not a guess.
pub fn striptags(text: &str) -> Result<String, Error> {
    let mut parts = String::new();
    let mut pos = 0;
    while let Some(start) = text[pos..].find('<').map(|i| pos + i) {
        let end = if text[start..].starts_with("<!--") {
            match text[start + 4..].find("-->") {
                Some(i) => start + 4 + i + 3,
                None => break,
            }
        } else {
            match text[start..].find('>') {
                Some(i) => start + i + 1,
                None => break,
            }
        };
        parts.push_str(&text[pos..start]);
        pos = end;
    }
    parts.push_str(&text[pos..]);
    let collapsed = parts
        .split(py_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    unescape(&collapsed)
}

/// The XML entities and numeric character references of printable characters.
fn unescape(text: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        let end = tail.find(';').filter(|&e| e <= 10);
        let name = end.map(|e| &tail[..e]);
        let ch = match name {
            Some("amp") => Some('&'),
            Some("lt") => Some('<'),
            Some("gt") => Some('>'),
            Some("quot") => Some('"'),
            Some("apos") => Some('\''),
            Some(n) if n.starts_with('#') => {
                let n = &n[1..];
                let code = match n.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => n.parse::<u32>().ok(),
                };
                code.filter(|&c| (0x20..0x7f).contains(&c) || c >= 0xa0)
                    .and_then(char::from_u32)
            }
            _ => None,
        };
        match (ch, end) {
            (Some(c), Some(e)) => {
                out.push(c);
                rest = &tail[e + 1..];
            }
            _ => {
                return Err(invalid(format!(
                    "striptags: the text holds an HTML entity refdpo does not unescape ({:?}); \
                     Python's html.unescape would",
                    &rest[i..rest.len().min(i + 12)]
                )))
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}
