//! The tokens tokenizer_config.json names or lists, as transformers 5.24 treats them at load:
//! the config's flags over tokenizer.json's, every named special token added (with its flags),
//! and the tokens transformers would add or drop refused by name (refdpo runs the file's
//! vocabulary).

use super::backend::Pipeline;
use crate::error::{fs, Error, Result};
use serde_json::Value;
use std::path::Path;

/// transformers re-adds each `added_tokens_decoder` entry of tokenizer_config.json whose flags
/// (lstrip, rstrip, normalized, single_word, special) differ from tokenizer.json's, so the
/// config's flags win: they are written into the file's entry of the same id and content.
/// Returns whether any changed.
pub(super) fn added_token_flags(tok: &mut Value, cfg: &Value) -> bool {
    let Some(decoder) = cfg.get("added_tokens_decoder").and_then(Value::as_object) else {
        return false;
    };
    let Some(added) = tok.get_mut("added_tokens").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut changed = false;
    for entry in added.iter_mut() {
        let id = entry
            .get("id")
            .and_then(Value::as_u64)
            .map(|i| i.to_string());
        let Some(want) = id.and_then(|i| decoder.get(&i)) else {
            continue;
        };
        if want.get("content") != entry.get("content") {
            continue;
        }
        for k in ["lstrip", "rstrip", "normalized", "single_word", "special"] {
            if let Some(v) = want.get(k).filter(|v| v.is_boolean()) {
                if entry.get(k) != Some(v) {
                    entry[k] = v.clone();
                    changed = true;
                }
            }
        }
    }
    changed
}

/// A token transformers would add to the vocabulary at load (a named special token, or an
/// `added_tokens_decoder`, `additional_special_tokens` or `extra_special_tokens` entry that
/// tokenizer.json lacks), and a `special_tokens_map.json` that transformers would read over
/// tokenizer_config.json: refused by name, since refdpo runs the file's vocabulary.
pub(super) fn check_special_tokens(
    tok: &tokenizers::Tokenizer,
    cfg: &Value,
    dir: &Path,
) -> Result<()> {
    use super::template::{named_special_tokens, token_string, SPECIAL_TOKENS};
    // a named special token is a string, `{"content": ...}` or null; transformers refuses others
    // ("Cannot set a non-string value"), where refdpo had read one as no token at all
    for key in SPECIAL_TOKENS {
        if let Some(v) = cfg
            .get(key)
            .filter(|v| !v.is_null() && token_string(Some(v)).is_none())
        {
            return Err(Error::Tokenize(format!(
                "`{}`: `{key}` is {v}, not a token (a string, or an object with its `content`)",
                dir.join("tokenizer_config.json").display()
            )));
        }
    }
    let named = named_special_tokens(cfg);
    if let Some(decoder) = cfg.get("added_tokens_decoder").and_then(Value::as_object) {
        for (id, entry) in decoder {
            if let Some(c) = entry.get("content").and_then(Value::as_str) {
                let here = id.parse::<u32>().ok().and_then(|i| tok.id_to_token(i));
                if here.as_deref() != Some(c) {
                    return Err(Error::Tokenize(format!(
                        "`{}`: `added_tokens_decoder` gives id {id} to {c:?}, which \
                         tokenizer.json does not: transformers would add it; save the tokenizer \
                         with transformers so both files agree",
                        dir.join("tokenizer_config.json").display()
                    )));
                }
            }
        }
    }
    if let Some((key, c)) = named.iter().find(|(_, c)| tok.token_to_id(c).is_none()) {
        return Err(Error::Tokenize(format!(
            "`{}`: `{key}` {c:?} is not a token of tokenizer.json: transformers would add it as a \
             new token; add it to the tokenizer (and the model's embeddings) first",
            dir.join("tokenizer_config.json").display()
        )));
    }
    // without `added_tokens_decoder`, transformers reads special_tokens_map.json over the config
    let map_path = dir.join("special_tokens_map.json");
    if cfg.get("added_tokens_decoder").is_none() && map_path.is_file() {
        let map: Value = fs::read_json(&map_path)?;
        for k in super::template::SPECIAL_TOKENS {
            let (m, c) = (token_string(map.get(k)), token_string(cfg.get(k)));
            if m.is_some() && m != c {
                return Err(Error::Tokenize(format!(
                    "`{}` says `{k}` is {:?}, tokenizer_config.json {:?}: transformers would take \
                     the first; make the two files agree",
                    map_path.display(),
                    m.unwrap_or_default(),
                    c.unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// A named special token with the flags (`lstrip`, `rstrip`, `single_word`, `normalized`,
/// `special`) tokenizer_config.json gives its content, as transformers 5.24 adds it: those of its
/// `added_tokens_decoder` entry, else those of the `AddedToken` that names it (a `*_token` key,
/// an `additional_special_tokens` or `extra_special_tokens` item), else the defaults of a special
/// token (fuzzer: `"lstrip": true` had been ignored, and the spaces around the token kept).
fn with_config_flags(mut token: tokenizers::AddedToken, cfg: &Value) -> tokenizers::AddedToken {
    let holds = |v: &&Value| v.get("content").and_then(Value::as_str) == Some(&token.content);
    let decoder = cfg
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.values());
    let named = super::template::named_special_values(cfg);
    let Some(flags) = decoder.chain(named.iter().map(|(_, v)| *v)).find(holds) else {
        return token;
    };
    let flag = |k: &str| flags.get(k).and_then(Value::as_bool);
    if let Some(b) = flag("special") {
        token = token.special(b);
    }
    if let Some(b) = flag("lstrip") {
        token = token.lstrip(b);
    }
    if let Some(b) = flag("rstrip") {
        token = token.rstrip(b);
    }
    if let Some(b) = flag("single_word") {
        token = token.single_word(b);
    }
    if let Some(b) = flag("normalized") {
        token = token.normalized(b);
    }
    token
}

/// transformers adds every named special token at load: one the vocabulary holds and
/// tokenizer.json does not add is then matched whole wherever it stands (even inside a word).
pub(super) fn add_named_special_tokens(
    tokenizer: &mut tokenizers::Tokenizer,
    cfg: &Value,
    dir: &Path,
) -> Result<()> {
    let added: std::collections::HashSet<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let named: Vec<tokenizers::AddedToken> = super::template::named_special_tokens(cfg)
        .into_iter()
        .filter(|(_, c)| !added.contains(c))
        .map(|(_, c)| with_config_flags(tokenizers::AddedToken::from(c, true), cfg))
        .collect();
    if !named.is_empty() {
        tokenizer.add_special_tokens(named).map_err(|e| {
            Error::Tokenize(format!(
                "`{}`: cannot add its named special tokens: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// A class that rebuilds the pipeline (GPT2, Qwen2, Llama, Gemma) keeps only the added tokens
/// `added_tokens_decoder` lists, where the config has one: a token tokenizer.json adds beyond
/// them (`</s>` in a Qwen2 folder) is then plain text to transformers, and one token to
/// refdpo's file. Refused by name; the file-as-is classes keep every one. (transformers 5.24's
/// GPT2Tokenizer drops them too: checked on SmolLM2's tokenizer with a `<|tool|>` added.)
pub(super) fn check_added_tokens_listed(
    tok: &Value,
    cfg: &Value,
    pipeline: Pipeline,
    dir: &Path,
) -> Result<()> {
    if pipeline == Pipeline::AsIs {
        return Ok(());
    }
    let Some(decoder) = cfg.get("added_tokens_decoder").and_then(Value::as_object) else {
        return Ok(());
    };
    // a token the config names (`eos_token`, `unk_token`, …, `additional_special_tokens`) is
    // added back by transformers whatever the list says
    let named: Vec<String> = super::template::named_special_tokens(cfg)
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let added = tok.get("added_tokens").and_then(Value::as_array);
    for entry in added.into_iter().flatten() {
        let (Some(id), Some(content)) = (
            entry.get("id").and_then(Value::as_u64),
            entry.get("content").and_then(Value::as_str),
        ) else {
            continue;
        };
        if !decoder.contains_key(&id.to_string()) && !named.iter().any(|n| n == content) {
            return Err(Error::Tokenize(format!(
                "`{}` adds {content:?} (id {id}), which `added_tokens_decoder` in \
                 tokenizer_config.json does not list: transformers' {pipeline:?} tokenizer drops \
                 it and reads the text as plain characters; save the tokenizer with transformers \
                 so both files agree",
                dir.join("tokenizer.json").display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_added_token_the_config_does_not_list_is_refused_where_the_class_drops_it() {
        let tok = json!({"added_tokens": [
            {"id": 0, "content": "<|im_end|>"}, {"id": 2, "content": "</s>"}
        ]});
        let listed = |ids: &[u64]| {
            let d: serde_json::Map<String, Value> = ids
                .iter()
                .map(|i| (i.to_string(), json!({"content": "x"})))
                .collect();
            json!({ "added_tokens_decoder": d })
        };
        let dir = Path::new("m");
        let e = check_added_tokens_listed(&tok, &listed(&[0]), Pipeline::Qwen2, dir).unwrap_err();
        assert!(e.to_string().contains("\"</s>\" (id 2)"), "{e}");
        check_added_tokens_listed(&tok, &listed(&[0, 2]), Pipeline::Qwen2, dir).unwrap();
        // one the config names as a special token is kept by transformers (a Llama's `</s>`)
        let mut named = listed(&[0]);
        named["eos_token"] = json!("</s>");
        check_added_tokens_listed(&tok, &named, Pipeline::Llama, dir).unwrap();
        // no list: the file's tokens; the file as is keeps every one, GPT2Tokenizer does not
        check_added_tokens_listed(&tok, &json!({}), Pipeline::Llama, dir).unwrap();
        check_added_tokens_listed(&tok, &listed(&[0]), Pipeline::Gpt2, dir).unwrap_err();
        check_added_tokens_listed(&tok, &listed(&[0]), Pipeline::AsIs, dir).unwrap();
    }

    /// A named special token that is neither a string nor `{"content": ...}` is refused by key,
    /// as transformers refuses it; refdpo had read `eos_token: 5` as no EOS at all (fuzzer).
    #[test]
    fn a_special_token_that_is_not_a_token_is_refused_by_key() {
        let tok = tokenizers::Tokenizer::from_bytes(
            json!({"model": {"type": "WordLevel", "vocab": {"a": 0, "</s>": 1}, "unk_token": "a"}})
                .to_string(),
        )
        .unwrap();
        let dir = Path::new("m");
        for odd in [json!(5), json!(true), json!(["</s>"]), json!({"id": 1})] {
            let e = check_special_tokens(&tok, &json!({ "eos_token": odd }), dir).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("`eos_token` is {odd}, not a token")),
                "{e}"
            );
        }
        for fine in [json!("</s>"), json!({"content": "</s>"}), json!(null)] {
            check_special_tokens(&tok, &json!({ "eos_token": fine }), dir).unwrap();
        }
    }

    /// A named special token tokenizer.json has only in its vocabulary is added with the flags
    /// the config gives it: its `added_tokens_decoder` entry's over its `AddedToken`'s (as
    /// transformers 5.24; the ids in `tokenize::backend::tests::tokenizer_classes_encode_as_transformers`).
    #[test]
    fn a_named_token_is_added_with_the_configs_flags() {
        let added = |cfg: Value| {
            let mut tok = tokenizers::Tokenizer::from_bytes(
                json!({"model": {"type": "WordLevel", "vocab": {"a": 0, "<e>": 1}, "unk_token": "a"}})
                    .to_string(),
            )
            .unwrap();
            add_named_special_tokens(&mut tok, &cfg, Path::new("m")).unwrap();
            let t = tok.get_added_tokens_decoder()[&1].clone();
            (t.lstrip, t.rstrip, t.single_word)
        };
        let token = |lstrip: bool, rstrip: bool| {
            json!({"__type": "AddedToken", "content": "<e>", "lstrip": lstrip, "rstrip": rstrip,
                "single_word": false, "normalized": false, "special": true})
        };
        assert_eq!(added(json!({"eos_token": "<e>"})), (false, false, false));
        assert_eq!(
            added(json!({"eos_token": token(true, true)})),
            (true, true, false)
        );
        let mut entry = token(false, true);
        entry.as_object_mut().unwrap().remove("__type");
        let both = json!({"eos_token": token(true, false), "added_tokens_decoder": {"1": entry}});
        assert_eq!(added(both), (false, true, false));
        let listed = json!({"additional_special_tokens": [
            {"content": "<e>", "single_word": true, "lstrip": true}
        ]});
        assert_eq!(added(listed), (true, false, true));
    }
}
