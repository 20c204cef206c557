//! What one chat-template rendering may cost besides its instructions (`FUEL`) and its output
//! (`limit_output`): wall time, and the size of what a filter or a Python-style method builds.
//! One instruction can do a lot of work (`l|sort` over a long list, `s.replace('a', 'aa')`,
//! `x|indent(2000000000)`): each of those calls is checked against the rendering's deadline and
//! its result against the output limit, so such a template is a `template_error`, not an hour
//! per row or an abort for memory. What no call of refdpo's sees (`s ~ s` in a recursive macro,
//! `ns.s + ns.s` in a loop, a list copied whole on each turn) is bounded by the allocator: a
//! rendering may keep 16 times its output limit (at least 256 MiB) and take [`BACKSTOP`] seconds
//! before the process stops with an error naming the template (`profile::heap::cap_thread`).

use minijinja::value::{Kwargs, StringInput, Value};
use minijinja::{Environment, Error, ErrorKind, State};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Wall time one rendering may take (ChatML over a long conversation takes well under 1 ms).
pub const SECONDS: u64 = 10;

/// Wall time one rendering may take before the allocator stops the process: past [`SECONDS`],
/// so that a template whose calls refdpo sees fails there, as one row's `template_error`.
pub const BACKSTOP: u64 = SECONDS + 5;

/// The widest indent `indent` or `tojson` may be asked for.
const MAX_INDENT: usize = 1024;

thread_local! {
    /// The rendering under way on this thread: its deadline and value limit.
    static BUDGET: Cell<Option<(Instant, usize)>> = const { Cell::new(None) };
    /// Whether it ran past its deadline.
    static OVERRAN: Cell<bool> = const { Cell::new(false) };
}

/// What the allocator says of a rendering that kept more than its cap.
const RUNAWAY: &str = "the chat template ran away rendering one conversation (a string or list \
    that doubles, or one copied whole on every turn of a loop): fix or replace the model's chat \
    template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`)";

/// The budget of the rendering that holds it, set until it drops.
pub struct Rendering {
    _cap: crate::profile::heap::ThreadCap,
}

impl Rendering {
    pub fn start(value_limit: usize) -> Self {
        let deadline = Instant::now() + Duration::from_secs(SECONDS);
        BUDGET.with(|b| b.set(Some((deadline, value_limit))));
        OVERRAN.with(|o| o.set(false));
        Rendering {
            _cap: crate::profile::heap::cap_thread(
                value_limit.saturating_mul(16),
                BACKSTOP,
                RUNAWAY,
            ),
        }
    }

    /// The rendering ran past its deadline (and failed for it).
    pub fn overran(&self) -> bool {
        OVERRAN.with(Cell::get)
    }
}

impl Drop for Rendering {
    fn drop(&mut self) {
        BUDGET.with(|b| b.set(None));
    }
}

fn bound(why: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, why)
}

/// Past the deadline: an error.
fn in_time() -> Result<(), Error> {
    match BUDGET.with(Cell::get) {
        Some((deadline, _)) if Instant::now() > deadline => {
            OVERRAN.with(|o| o.set(true));
            Err(bound(format!(
                "the template ran past {SECONDS} s for one conversation"
            )))
        }
        _ => Ok(()),
    }
}

/// `result`, unless the deadline passed or it is a string or sequence beyond the value limit.
fn checked(result: Result<Value, Error>) -> Result<Value, Error> {
    let v = result?;
    in_time()?;
    let limit = BUDGET.with(Cell::get).map_or(usize::MAX, |(_, l)| l);
    let size = v
        .as_str()
        .map(str::len)
        .or_else(|| v.len().filter(|_| v.as_str().is_none()));
    match size {
        Some(n) if n > limit => Err(bound(format!(
            "the template built a value of {n} bytes or items, beyond the {limit} it may write"
        ))),
        _ => Ok(v),
    }
}

/// The indent width asked of `indent` or `tojson`, refused past [`MAX_INDENT`].
pub fn indent_width(width: Option<usize>) -> Result<Option<usize>, Error> {
    match width {
        Some(w) if w > MAX_INDENT => {
            Err(bound(format!("an indent of {w} (more than {MAX_INDENT})")))
        }
        w => Ok(w),
    }
}

/// Puts the bounded filters and methods into `env`.
pub fn install(env: &mut Environment) {
    env.add_filter("sort", |s: &State, v: Value, k: Kwargs| {
        in_time()?;
        checked(minijinja::filters::sort(s, v, k))
    });
    env.add_filter("unique", |s: &State, v: Value, k: Kwargs| {
        in_time()?;
        checked(minijinja::filters::unique(s, v, k))
    });
    env.add_filter("join", join);
    env.add_filter("replace", replace);
    env.add_filter("indent", indent);
    env.add_filter("trim", trim);
    env.add_filter("int", super::pystr::int_filter);
    env.add_filter("float", super::pystr::float_filter);
    env.add_filter("wordcount", |v: StringInput<'_>| {
        super::pystr::wordcount(v.as_str())
    });
    env.add_filter("striptags", |v: StringInput<'_>| {
        super::pystr::striptags(v.as_str()).map(Value::from)
    });
    env.add_filter("center", |v: StringInput<'_>, width: Option<usize>| {
        super::pystr::center_filter(v.as_str(), width).map(Value::from)
    });
    env.add_filter(
        "truncate",
        |v: StringInput<'_>,
         length: Option<usize>,
         killwords: Option<bool>,
         end: Option<String>,
         leeway: Option<usize>| {
            in_time()?;
            super::pystr::truncate(v.as_str(), length, killwords, end, leeway).map(Value::from)
        },
    );
    env.set_unknown_method_callback(|s, v, name, args| {
        in_time()?;
        if let Some(done) = v
            .as_str()
            .and_then(|text| super::python::whitespace_method(text, name, args))
        {
            return checked(Ok(done));
        }
        if let Some(done) = v
            .as_str()
            .and_then(|text| super::python::empty_needle(text, name, args))
        {
            return done;
        }
        if let Some(done) = v
            .as_str()
            .and_then(|text| super::pystr::method(text, name, args))
        {
            return checked(done);
        }
        // a dict's `items()` as Python's (key, value) tuples
        if name == "items" && args.is_empty() && v.kind() == minijinja::value::ValueKind::Map {
            return checked(minijinja::filters::items(v));
        }
        checked(minijinja_contrib::pycompat::unknown_method_callback(
            s, v, name, args,
        ))
    });
}

/// Jinja2's `trim`: Python's `str.strip(chars)`, whitespace as Python has it.
fn trim(v: StringInput<'_>, chars: Option<StringInput<'_>>) -> Value {
    let out = match chars {
        Some(chars) => {
            let set: Vec<char> = chars.as_str().chars().collect();
            v.as_str().trim_matches(&set[..]).to_string()
        }
        None => v.as_str().trim_matches(super::python::py_space).to_string(),
    };
    v.preserve_safety(out)
}

fn join(s: &State, v: &Value, joiner: Option<StringInput<'_>>) -> Result<Value, Error> {
    in_time()?;
    checked(minijinja::filters::join(s, v, joiner))
}

fn replace(
    s: &State,
    v: StringInput<'_>,
    from: StringInput<'_>,
    to: StringInput<'_>,
) -> Result<Value, Error> {
    in_time()?;
    checked(minijinja::filters::replace(s, v, from, to))
}

/// Jinja2's `indent` (`python::py_indent`: a trailing newline kept, minijinja's drops it), its
/// width a number of spaces or a string.
fn indent(
    v: StringInput<'_>,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    in_time()?;
    let width = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<Value>>("width")?,
    };
    let first = first
        .or(kwargs.get::<Option<bool>>("first")?)
        .unwrap_or(false);
    let blank = blank
        .or(kwargs.get::<Option<bool>>("blank")?)
        .unwrap_or(false);
    kwargs.assert_all_used()?;
    let indention = match width {
        None => " ".repeat(4),
        Some(w) => match w.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = usize::try_from(w.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("indent's width is {w}, not a count of spaces or a string"),
                    )
                })?;
                " ".repeat(indent_width(Some(n))?.unwrap_or(4))
            }
        },
    };
    let out = super::python::py_indent(v.as_str(), &indention, first, blank);
    checked(Ok(v.preserve_safety(out)))
}

#[cfg(test)]
mod tests {
    use crate::data::Message;
    use crate::tokenize::ChatTemplate;

    fn fails(source: &str) -> String {
        let t = ChatTemplate::new(source, "", "")
            .unwrap()
            .limit_output(1 << 20);
        t.render(&[Message::new("user", "Hi")], false)
            .unwrap_err()
            .to_string()
    }

    /// Values built by one filter or method call, which neither the fuel nor the output limit
    /// bounded: they aborted the process for memory (one instruction each).
    #[test]
    fn a_value_past_the_output_limit_is_an_error_not_an_abort() {
        let e = fails("{{ 'a\nb'|indent(2000000000) }}");
        assert!(e.contains("an indent of 2000000000"), "{e}");
        let e = fails("{{ messages|tojson(indent=1000000000) }}");
        assert!(e.contains("an indent of 1000000000"), "{e}");
        let e = fails(
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}\
             {% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}",
        );
        assert!(e.contains("built a value of"), "{e}");
        let e = fails(
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}\
             {% set ns.s = ns.s|replace('b', 'bb') %}{% endfor %}",
        );
        assert!(e.contains("built a value of"), "{e}");
        // what real templates do still works
        let t = ChatTemplate::new(
            "{{ messages[0].content|indent(2)|replace('H', 'h') }}{{ [3, 1]|sort|join(',') }}\
             {{ messages[0].content.upper() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "Hi")], false).unwrap(),
            "hi1,3HI"
        );
    }

    /// Sorting a long list in a loop stays under the fuel but took minutes per row: past the
    /// deadline it stops, and the template is not run again (each row would wait it out).
    #[test]
    fn a_template_past_its_deadline_stops_and_is_not_run_again() {
        let t = ChatTemplate::new(
            "{% set l = range(100000)|list %}{% for i in range(100000) %}{% set x = l|sort %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let msgs = [Message::new("user", "Hi")];
        let started = std::time::Instant::now();
        let e = t.render(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("ran past 10 s"), "{e}");
        assert!(started.elapsed().as_secs() < 30);
        let again = std::time::Instant::now();
        let e = t.render(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("on an earlier conversation"), "{e}");
        assert!(again.elapsed().as_millis() < 100);
    }

    fn renders(source: &str) -> String {
        let t = ChatTemplate::new(source, "", "").unwrap();
        t.render(&[Message::new("user", "Hi")], false).unwrap()
    }

    /// A namespace is the one value a template can change: one holding itself, or a value nested
    /// a level deeper on every pass of a loop, overflowed the stack when printed, serialized or
    /// compared (an abort). vendor/minijinja refuses to store such a value.
    #[test]
    fn a_namespace_holding_itself_or_nested_without_end_is_an_error_not_an_abort() {
        for sink in [
            "{{ ns }}",
            "{{ ns|tojson }}",
            "{{ [ns]|sort }}",
            "{{ ns == ns }}",
        ] {
            let e = fails(&format!(
                "{{% set ns = namespace(a=1) %}}{{% set ns.me = ns %}}{sink}"
            ));
            assert!(
                e.contains("cannot store a namespace in itself"),
                "{sink}: {e}"
            );
        }
        let e = fails(
            "{% set a = namespace() %}{% set b = namespace(x=[a]) %}{% set a.y = {'b': b} %}{{ a }}",
        );
        assert!(e.contains("cannot store a namespace in itself"), "{e}");
        let e = fails(
            "{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}\
             {% endfor %}{{ ns.x }}",
        );
        assert!(e.contains("nested more than 64 deep"), "{e}");
        // what chat templates store in namespaces still renders
        assert_eq!(
            renders(
                "{% set ns = namespace(found=false, m=[]) %}{% for m in messages %}\
                 {% set ns.found = true %}{% set ns.m = ns.m + [m] %}{% endfor %}\
                 {% set other = namespace(n=3) %}{% set ns.o = [other.n] %}\
                 {{ ns.found }}{{ ns.m[0]['content'] }}{{ ns.o }}"
            ),
            "TrueHi[3]"
        );
    }

    /// minijinja panicked on these (a panic in a worker thread ended the run).
    #[test]
    fn a_template_minijinja_panics_on_is_an_error() {
        for source in [
            "{% for m in messages %}{{ loop.cycle() }}{% endfor %}",
            "{{ '%.65536f'|format(1.0) }}",
        ] {
            let e = fails(source);
            assert!(e.contains("minijinja stopped on it"), "{source}: {e}");
        }
    }

    /// `count('')` never returned (minijinja-contrib's loop did not advance); Python counts
    /// len + 1, and `split('')` is Python's ValueError.
    #[test]
    fn an_empty_needle_is_counted_as_python_counts_it() {
        assert_eq!(
            renders("{{ 'abc'.count('') }} {{ 'abcab'.count('ab') }}"),
            "4 2"
        );
        assert_eq!(renders("{{ 'ä€'.count('') }}"), "3");
        let e = fails("{{ 'abc'.split('') }}");
        assert!(e.contains("empty separator"), "{e}");
    }
}
