//! Chat templates as transformers renders them: jinja with `trim_blocks` and `lstrip_blocks`,
//! Python string methods, `raise_exception`, `strftime_now` and a `tojson` that writes like
//! Python's `json.dumps`. The template comes from `chat_template.jinja` if the model has one,
//! else from `tokenizer_config.json`'s `chat_template`, as transformers picks it.

use super::python::{strftime_now, tojson};
use crate::data::{Content, Message, TemplateInputs};
use crate::error::{fs, Error, Result};
use minijinja::{Environment, ErrorKind, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Template instructions one rendering may run: far above any hub template's needs (ChatML
/// over a long conversation runs a few thousand), low enough that a runaway loop stops in well
/// under a second.
pub const FUEL: u64 = 2_000_000;

/// The standard named special tokens (transformers' `special_tokens_map` gives every template
/// these and the model's own `*_token`s: [`special_tokens`]).
pub const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// The named special tokens that are set, by name.
    special: BTreeMap<String, String>,
    /// The most bytes one rendering may write (see [`ChatTemplate::limit_output`]).
    output_limit: usize,
    /// Why there is no template (the model has none): every rendering fails with it.
    missing: Option<String>,
    /// A rendering ran past its time bound: the template is not run again (each row would wait
    /// the bound out).
    overran: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("sha256", &self.sha256())
            .finish()
    }
}

/// The named special tokens tokenizer_config.json sets, as transformers 5 names them for the
/// template: the standard ones ([`SPECIAL_TOKENS`]), every other top-level `*_token` key that
/// holds a token (Gemma 3's `boi_token`, a `sep_think_token`), and `extra_special_tokens`' map
/// entries.
pub(super) fn special_tokens(cfg: &serde_json::Value) -> BTreeMap<String, String> {
    let top = cfg.as_object().into_iter().flatten();
    let extra = cfg
        .get("extra_special_tokens")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten();
    top.filter(|(k, _)| k.ends_with("_token"))
        .chain(extra)
        .filter_map(|(k, v)| Some((k.clone(), token_string(Some(v))?)))
        .collect()
}

/// Every special token tokenizer_config.json names ([`special_tokens`], and the unnamed lists
/// `additional_special_tokens` and `extra_special_tokens`): transformers adds each to the
/// tokenizer as a special token at load, matched whole wherever it stands in a text.
/// Each as (the key that names it, its content).
pub(super) fn named_special_tokens(cfg: &serde_json::Value) -> Vec<(String, String)> {
    named_special_values(cfg)
        .into_iter()
        .filter_map(|(k, v)| Some((k, token_string(Some(v))?)))
        .collect()
}

/// [`named_special_tokens`] as their values in tokenizer_config.json (a string, or an
/// `AddedToken` object with its flags).
pub(super) fn named_special_values(cfg: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    let holds_token = |v: &&serde_json::Value| token_string(Some(v)).is_some();
    let top = cfg.as_object().into_iter().flatten();
    let extra = cfg
        .get("extra_special_tokens")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten();
    // by key, as [`special_tokens`] (a map entry over a top-level key of the same name)
    let named: BTreeMap<String, &serde_json::Value> = top
        .filter(|(k, _)| k.ends_with("_token"))
        .chain(extra)
        .filter(|(_, v)| holds_token(v))
        .map(|(k, v)| (k.clone(), v))
        .collect();
    let lists = ["additional_special_tokens", "extra_special_tokens"]
        .into_iter()
        .filter_map(|k| Some((k, cfg.get(k)?.as_array()?)))
        .flat_map(|(k, list)| {
            list.iter()
                .filter(holds_token)
                .map(move |v| (k.to_string(), v))
        });
    named.into_iter().chain(lists).collect()
}

/// A `tokenizer_config.json` special token: a string or `{"content": ...}`; None where null.
pub(super) fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => Some(o.get("content")?.as_str()?.to_string()),
        _ => None,
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` (it marks the assistant's tokens for
/// `return_assistant_tokens_mask` and renders its body as is) as `{% if true %}…{% endif %}`: a
/// block tag for a block tag, so `trim_blocks` and `lstrip_blocks` treat it alike.
fn generation_blocks_as_ifs(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let word = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match word {
            Some(w) => out.push_str(&format!("{{%{lead} {w} {trail}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A message as transformers 5.24 gives it to a template: its keys whose value is null dropped
/// (`_normalize_chat_messages`; a null `content` is no key), then, where it has a reasoning field
/// (`reasoning_content`, `thinking`, `reasoning`, the first set), that text also as its
/// `reasoning_content`, and as its `thinking` unless it has one (`_alias_reasoning_fields`).
fn aliased(m: &Message) -> Value {
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    if m.extra.is_empty() && m.content != Content::Null {
        return Value::from_serialize(m);
    }
    let mut m = m.clone();
    m.extra.retain(|_, v| !v.is_null());
    if let Some(r) = REASONING.iter().find_map(|k| m.extra.get(*k)).cloned() {
        if !m.extra.contains_key("thinking") {
            m.extra.insert("thinking".into(), r.clone());
        }
        m.extra.insert("reasoning_content".into(), r);
    }
    let mut v = serde_json::to_value(&m).unwrap_or_default();
    if let (Some(o), Content::Null) = (v.as_object_mut(), &m.content) {
        o.remove("content");
    }
    Value::from_serialize(&v)
}

impl ChatTemplate {
    /// Loads the template of a model/tokenizer directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            fs::read_json(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            fs::read_to_string(&jinja)?
        } else {
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                // A list of named templates: transformers uses the one named "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from))
                    .ok_or_else(|| {
                        Error::Tokenize(format!(
                            "`{}` has no template named \"default\"",
                            cfg_path.display()
                        ))
                    })?,
                // plain-text rows need none (TRL tokenizes them without one); a conversation
                // rendered with it fails with this message
                None | Some(serde_json::Value::Null) => String::new(),
                Some(other) => {
                    return Err(Error::Tokenize(format!(
                        "`chat_template` in `{}` is {other}, not a template (a string, or a list \
                         of named templates)",
                        cfg_path.display()
                    )))
                }
            }
        };
        let missing = (source.is_empty() && !jinja.exists()).then(|| {
            format!(
                "no chat template in `{}`: add chat_template.jinja or a `chat_template` key to \
                 tokenizer_config.json (conversations are rendered with it, as TRL renders them)",
                dir.display()
            )
        });
        // transformers gives a special token the config leaves out (not null: out) the default of
        // the tokenizer class it names (GPT2Tokenizer's `<|endoftext|>`), which refdpo cannot
        // know: the EOS token (TRL appends it to plain-text answers) and those the template uses.
        let class = cfg.get("tokenizer_class").and_then(|c| c.as_str());
        if let Some(class) =
            class.filter(|c| !["PreTrainedTokenizerFast", "TokenizersBackend"].contains(c))
        {
            let obj = cfg.as_object();
            let left_out = SPECIAL_TOKENS.iter().find(|k| {
                obj.is_some_and(|o| !o.contains_key(**k))
                    && (**k == "eos_token" || source.contains(**k))
            });
            if let Some(k) = left_out {
                return Err(Error::Tokenize(format!(
                    "`{}` leaves out `{k}`: transformers would take `{class}`'s own default for \
                     it, which refdpo cannot know; write it into the file (null for none)",
                    cfg_path.display()
                )));
            }
        }
        let mut t = Self::with_tokens(&source, special_tokens(&cfg))?;
        t.missing = missing;
        Ok(t)
    }

    /// A template with only a BOS and an EOS token (empty: not set).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let special = [("bos_token", bos_token), ("eos_token", eos_token)]
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(k, t)| (k.to_string(), t.to_string()))
            .collect();
        Self::with_tokens(source, special)
    }

    fn with_tokens(source: &str, special: BTreeMap<String, String>) -> Result<Self> {
        // Jinja2's lexer reads every `\r\n` and `\r` of a template's source as `\n` (a template
        // saved with Windows line ends renders as the original)
        let source = &source.replace("\r\n", "\n").replace('\r', "\n");
        let mut env = Environment::new();
        // A template that recurses or loops without end stops with an error, never an abort.
        env.set_fuel(Some(FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python's string and dict methods, and the filters whose one call can do hours of
        // work or build gigabytes, bounded per rendering.
        super::bounds::install(&mut env);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", generation_blocks_as_ifs(source))
            .map_err(|e| Error::Tokenize(format!("the chat template does not compile: {e:#}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            special,
            output_limit: usize::MAX,
            missing: None,
            overran: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Caps one rendering's output at `bytes`: a template that writes more fails with an error
    /// naming the limit instead of growing a string until memory runs out.
    pub fn limit_output(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &TemplateInputs::default())
    }

    /// [`Self::render`] with a row's `tools` and `chat_template_kwargs`, as transformers renders
    /// it: the special tokens, then the kwargs over them, then the messages (reasoning fields
    /// aliased), `tools` (none where absent), `documents` (none) and `add_generation_prompt`.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        inputs: &TemplateInputs,
    ) -> Result<String> {
        if let Some(why) = &self.missing {
            return Err(Error::Tokenize(why.clone()));
        }
        if self.overran.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Tokenize(format!(
                "the chat template ran past {} s on an earlier conversation: it is not run again",
                super::bounds::SECONDS
            )));
        }
        let tmpl = self.env.get_template("chat").expect("template was added");
        let mut ctx: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        for (k, v) in &inputs.kwargs {
            if matches!(
                k.as_str(),
                "messages" | "add_generation_prompt" | "documents"
            ) {
                return Err(Error::Tokenize(format!(
                    "`chat_template_kwargs` sets `{k}`, which the template gets from refdpo (in \
                     transformers it is an error too)"
                )));
            }
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        let messages: Vec<Value> = messages.iter().map(aliased).collect();
        ctx.insert("messages".into(), Value::from(messages));
        if !inputs.kwargs.contains_key("tools") {
            ctx.insert("tools".into(), Value::from_serialize(&inputs.tools));
        }
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let mut out = Capped {
            text: Vec::new(),
            limit: self.output_limit,
        };
        let budget = super::bounds::Rendering::start(self.output_limit);
        // minijinja panics on some hostile templates (`loop.cycle()` with no arguments, a format
        // precision over 65535): an error for this conversation, as its other errors are
        let result = match crate::error::catch_quietly(|| {
            tmpl.render_captured_to(Value::from(ctx), &mut out)
        }) {
            Ok(result) => result,
            Err(panic) => {
                return Err(Error::Tokenize(format!(
                    "rendering the chat template failed: minijinja stopped on it ({panic})"
                )))
            }
        };
        if result.is_err() && budget.overran() {
            self.overran
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok(_) => String::from_utf8(out.text)
                .map_err(|_| Error::Tokenize("the chat template wrote invalid UTF-8".into())),
            Err(_) if out.text.len() > self.output_limit => Err(Error::Tokenize(format!(
                "the chat template wrote more than {} bytes for one conversation (the limit, \
                 from `tokenize.max_length`): it does not stop, or the conversation is far \
                 longer than `max_length` can keep",
                self.output_limit
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::Tokenize(format!(
                "the chat template ran out of its {FUEL} instructions for one conversation: it \
                 loops or recurses without end"
            ))),
            Err(e) => Err(Error::Tokenize(format!(
                "rendering the chat template failed: {e}"
            ))),
        }
    }

    /// The EOS token's text (`tokenizer_config.json`), which TRL appends to standard answers;
    /// None where it is not set.
    pub fn eos_token(&self) -> Option<&str> {
        self.special.get("eos_token").map(String::as_str)
    }

    /// SHA-256 of the template source (part of the cache fingerprint).
    pub fn sha256(&self) -> String {
        format!("{:x}", Sha256::digest(self.source.as_bytes()))
    }
}

/// A sink that refuses to grow past `limit` bytes.
struct Capped {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            // remembered as over the limit, without keeping the bytes
            self.text.resize(self.limit + 1, 0);
            return Err(std::io::Error::other("output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
