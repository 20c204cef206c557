//! The Python that chat templates call through transformers: `tojson` as `json.dumps` writes,
//! and `strftime_now` as `datetime.now().strftime` for the date formats templates use.

use minijinja::{ErrorKind, Value};

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

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
    }
}
