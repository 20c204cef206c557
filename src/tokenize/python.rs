//! The Python that chat templates call through transformers: `tojson` as `json.dumps` writes,
//! `strftime_now` as `datetime.now().strftime` for the date formats templates use, and the
//! string methods whose idea of whitespace is Python's (`str.isspace`, which Rust's
//! `char::is_whitespace` lacks U+001C–U+001F of).

use minijinja::{Error, ErrorKind, Value};

/// `json.dumps(value, ensure_ascii=False[, indent=N])`: separators `", "` and `": "` (`","` before a
/// newline when indented), insertion order kept.
pub fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = super::bounds::indent_width(kwargs.get("indent")?)?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let (open, close, items): (char, char, Vec<(Option<&String>, &J)>) = match v {
        J::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        J::Object(m) => ('{', '}', m.iter().map(|(k, x)| (Some(k), x)).collect()),
        J::Number(n) if n.is_f64() => return out.push_str(&py_float(n.as_f64().unwrap_or(0.0))),
        other => return out.push_str(&other.to_string()),
    };
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    let pad = |n: usize| " ".repeat(indent.unwrap_or(0) * n);
    for (i, (key, item)) in items.into_iter().enumerate() {
        match (i, indent) {
            (0, None) => {}
            (_, None) => out.push_str(", "),
            (0, Some(_)) => out.push_str(&format!("\n{}", pad(level + 1))),
            (_, Some(_)) => out.push_str(&format!(",\n{}", pad(level + 1))),
        }
        if let Some(k) = key {
            out.push_str(&serde_json::to_string(k).unwrap_or_default());
            out.push_str(": ");
        }
        write_py_json(item, indent, level + 1, out);
    }
    if indent.is_some() {
        out.push_str(&format!("\n{}", pad(level)));
    }
    out.push(close);
}

/// `repr(float)` (minijinja's, as refdpo patches it to print floats as Python does), with
/// `json.dumps`'s `NaN` and `Infinity`.
fn py_float(x: f64) -> String {
    if !x.is_finite() {
        // json.dumps writes NaN and Infinity; a JSON value never holds them
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    minijinja::value::float_repr(x)
}

/// Python's `str.isspace` of one character: Rust's whitespace and the four separators
/// U+001C–U+001F.
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.splitlines`'s line boundaries.
fn py_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r'
            | '\u{0b}'
            | '\u{0c}'
            | '\u{1c}'
            | '\u{1d}'
            | '\u{1e}'
            | '\u{85}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// The string methods (and `trim`) whose result depends on Python's whitespace, called with
/// their default arguments: `strip`, `lstrip`, `rstrip`, `split`, `splitlines`, `isspace`.
/// `None` where `name` or the arguments are not such a call (others take it).
pub fn whitespace_method(text: &str, name: &str, args: &[Value]) -> Option<Value> {
    let none = |i: usize| args.get(i).is_none_or(Value::is_none);
    match (name, args.len()) {
        ("strip", 0 | 1) if none(0) => Some(Value::from(text.trim_matches(py_space))),
        ("lstrip", 0 | 1) if none(0) => Some(Value::from(text.trim_start_matches(py_space))),
        ("rstrip", 0 | 1) if none(0) => Some(Value::from(text.trim_end_matches(py_space))),
        ("isspace", 0) => Some(Value::from(!text.is_empty() && text.chars().all(py_space))),
        ("split", 0..=2) if none(0) => {
            let max = match args.get(1) {
                None => None,
                Some(v) => Some(i64::try_from(v.clone()).ok()?),
            };
            Some(py_split(text, max.filter(|&m| m >= 0).map(|m| m as usize)))
        }
        ("splitlines", 0 | 1) => {
            let keep = match args.first() {
                None => false,
                Some(v) => bool::try_from(v.clone()).ok()?,
            };
            Some(py_splitlines(text, keep))
        }
        _ => None,
    }
}

/// Python's answer where a string method's needle is the empty string and minijinja-contrib's
/// is not: `count('')` is the number of characters + 1 (its loop never advanced: a render that
/// never ended), `split('')` is Python's `ValueError: empty separator`. `None` for every other
/// call.
pub fn empty_needle(text: &str, name: &str, args: &[Value]) -> Option<Result<Value, Error>> {
    if args.len() != 1 || args[0].as_str() != Some("") {
        return None;
    }
    match name {
        "count" => Some(Ok(Value::from(text.chars().count() + 1))),
        "split" => Some(Err(Error::new(
            ErrorKind::InvalidOperation,
            "str.split('') has an empty separator (a ValueError in Python)",
        ))),
        _ => None,
    }
}

/// `str.split()` / `str.split(None, max)`: runs of whitespace separate, none at either end.
fn py_split(text: &str, max: Option<usize>) -> Value {
    let mut parts = Vec::new();
    let mut rest = text.trim_start_matches(py_space);
    while !rest.is_empty() {
        if max.is_some_and(|m| parts.len() == m) {
            parts.push(Value::from(rest));
            break;
        }
        let end = rest.find(py_space).unwrap_or(rest.len());
        parts.push(Value::from(&rest[..end]));
        rest = rest[end..].trim_start_matches(py_space);
    }
    Value::from(parts)
}

/// `str.splitlines(keepends)`: `\r\n` is one break.
fn py_splitlines(text: &str, keep: bool) -> Value {
    Value::from_iter(py_lines(text, keep).into_iter().map(Value::from))
}

/// `str.splitlines(keepends)` as slices of `text`.
fn py_lines(text: &str, keep: bool) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !py_line_break(c) {
            continue;
        }
        let mut end = i + c.len_utf8();
        if c == '\r' && chars.peek().is_some_and(|&(_, n)| n == '\n') {
            chars.next();
            end += 1;
        }
        lines.push(&text[start..if keep { end } else { i }]);
        start = end;
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Jinja2 3.1's `indent` filter (`do_indent`): the text and a newline split by `splitlines`,
/// so a trailing newline is kept and every Python line break ends a line; lines after the first
/// (and the first with `first`) get `indention`, blank ones only with `blank`.
pub fn py_indent(text: &str, indention: &str, first: bool, blank: bool) -> String {
    let text = format!("{text}\n");
    let lines = py_lines(&text, false);
    let mut out = if blank {
        lines.join(&format!("\n{indention}"))
    } else {
        let mut out = lines.first().copied().unwrap_or_default().to_string();
        if lines.len() > 1 {
            out.push('\n');
            let rest: Vec<String> = lines[1..]
                .iter()
                .map(|l| {
                    if l.is_empty() {
                        String::new()
                    } else {
                        format!("{indention}{l}")
                    }
                })
                .collect();
            out.push_str(&rest.join("\n"));
        }
        out
    };
    if first {
        out.insert_str(0, indention);
    }
    out
}

/// `strftime_now` for templates that print today's date (Llama-3's "Today Date").
pub fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against CPython 3.11's `repr` of the same floats.
    #[test]
    fn floats_as_python_writes_them() {
        for (x, py) in [
            (1e-05, "1e-05"),
            (1.5e-07, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5e-10, "-2.5e-10"),
            (1e20, "1e+20"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (2.71, "2.71"),
            (9.5367431640625e-07, "9.5367431640625e-07"),
        ] {
            assert_eq!(py_float(x), py, "{x}");
        }
    }

    /// Against CPython 3.11: `"\x1f a\u3000b \x1c".strip()`, `.split()`, `.splitlines()`, … (a
    /// list printed as Jinja2 prints it, Python's `repr`).
    #[test]
    fn whitespace_as_python_sees_it() {
        let call = |t: &str, name: &str, args: &[Value]| {
            whitespace_method(t, name, args).map(|v| v.to_string())
        };
        let t = "\x1f a\u{3000}b \x1c";
        assert_eq!(call(t, "strip", &[]).unwrap(), "a\u{3000}b");
        assert_eq!(call(t, "strip", &[Value::from(())]).unwrap(), "a\u{3000}b");
        assert_eq!(call(t, "lstrip", &[]).unwrap(), "a\u{3000}b \x1c");
        assert_eq!(call(t, "rstrip", &[]).unwrap(), "\x1f a\u{3000}b");
        assert_eq!(call(t, "split", &[]).unwrap(), "['a', 'b']");
        assert_eq!(
            call("  a b  c ", "split", &[Value::from(()), Value::from(1)]).unwrap(),
            "['a', 'b  c ']"
        );
        assert_eq!(call("\x1d\t", "isspace", &[]).unwrap(), "True");
        assert_eq!(call("", "isspace", &[]).unwrap(), "False");
        assert_eq!(
            call("a\r\nb\rc\x1ed\n", "splitlines", &[]).unwrap(),
            "['a', 'b', 'c', 'd']"
        );
        assert_eq!(
            call("a\r\nb", "splitlines", &[Value::from(true)]).unwrap(),
            r"['a\r\n', 'b']"
        );
        // characters to strip, or a separator: not this call
        assert!(call(t, "strip", &[Value::from("x")]).is_none());
        assert!(call(t, "split", &[Value::from(",")]).is_none());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
    }
}
