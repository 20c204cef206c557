//! Source records → [`PreferenceRow`]s through the user's column, message-key and role mapping
//! (`dataset.columns`, `dataset.message_keys`, `dataset.roles`). Which of TRL's layouts a row is
//! in (conversational or standard, explicit or implicit prompt) is read off its values here; the
//! prompt is extracted and checked in the tokenize stage.

use super::{Content, Message, PreferenceRow, SkipReason, TemplateInputs, Turns};
use crate::config::DatasetConfig;
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Where each contract field lives in the source rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    prompt: String,
    /// Whether `prompt` was mapped explicitly (then every row must have it).
    prompt_required: bool,
    chosen: String,
    rejected: String,
    prompt_id: String,
    score_chosen: String,
    score_rejected: String,
    role: String,
    content: String,
    roles: BTreeMap<String, String>,
}

impl Mapping {
    pub fn new(cfg: &DatasetConfig) -> Self {
        let c = &cfg.columns;
        let name = |v: &Option<String>, default: &str| v.clone().unwrap_or_else(|| default.into());
        Self {
            prompt: name(&c.prompt, "prompt"),
            prompt_required: c.prompt.is_some(),
            chosen: name(&c.chosen, "chosen"),
            rejected: name(&c.rejected, "rejected"),
            prompt_id: name(&c.prompt_id, "prompt_id"),
            score_chosen: name(&c.score_chosen, "score_chosen"),
            score_rejected: name(&c.score_rejected, "score_rejected"),
            role: name(&cfg.message_keys.role, "role"),
            content: name(&cfg.message_keys.content, "content"),
            roles: cfg
                .roles
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().to_string()))
                .collect(),
        }
    }

    /// Whether a row's `column` is one this mapping reads (the columns, and TRL's `tools` and
    /// `chat_template_kwargs`).
    pub fn reads(&self, column: &str) -> bool {
        [
            &self.prompt,
            &self.chosen,
            &self.rejected,
            &self.prompt_id,
            &self.score_chosen,
            &self.score_rejected,
        ]
        .iter()
        .any(|c| c.as_str() == column)
            || matches!(column, "tools" | "chat_template_kwargs")
    }

    /// Checks a row's columns: the answer columns (and a mapped prompt) must be there. The
    /// error names what was found and the keys that fix it.
    pub fn check_columns(&self, fields: &Map<String, Value>, path: &Path) -> Result<()> {
        let mut needed = vec![
            ("chosen", "the chosen answer", &self.chosen),
            ("rejected", "the rejected answer", &self.rejected),
        ];
        if self.prompt_required {
            needed.push(("prompt", "the prompt", &self.prompt));
        }
        for (key, what, column) in needed {
            if !fields.contains_key(column.as_str()) {
                let found: Vec<&str> = fields.keys().map(String::as_str).collect();
                return Err(Error::schema(
                    path,
                    format!(
                        "column `{column}` is missing ({what}); found: {}. Map it with \
                         `dataset.columns.{key} = \"<column>\"`",
                        found.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One record → a row, or why it cannot be one.
    pub fn row(
        &self,
        row: u64,
        line: Option<u64>,
        fields: &Map<String, Value>,
    ) -> std::result::Result<PreferenceRow, SkipReason> {
        let answer = |column: &str| -> std::result::Result<Option<Turns>, SkipReason> {
            match fields.get(column) {
                None => Err(SkipReason::MissingField),
                Some(v) => self.turns(v),
            }
        };
        let (chosen, rejected) = (answer(&self.chosen)?, answer(&self.rejected)?);
        // a prompt column's null (or a message of it with no content) is a missing prompt,
        // which TRL fails on: never a prompt taken from the answers instead
        let prompt = match fields.get(&self.prompt) {
            None if self.prompt_required => return Err(SkipReason::MissingField),
            None => None,
            Some(Value::Null) => return Err(SkipReason::NullValue),
            Some(v) => Some(self.turns(v)?.ok_or(SkipReason::NullValue)?),
        };
        // TRL's `maybe_extract_prompt`: a string prompt beside full conversations (the H4
        // UltraFeedback layout) is ignored, and the prompt is extracted from the answers; a
        // conversation prompt beside plain-text answers is no layout TRL reads (it fails).
        let prompt = match (prompt, &chosen) {
            (Some(Turns::Text(_)), Some(Turns::Messages(_))) => None,
            (Some(Turns::Messages(_)), Some(Turns::Text(_))) => return Err(SkipReason::WrongType),
            (p, _) => p,
        };
        let prompt_id = match fields.get(&self.prompt_id) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        // a number, or a string holding one ("9.5", as some CSV-born datasets store scores);
        // anything else is no score
        let score = |column: &str| match fields.get(column)? {
            Value::String(s) => s.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
            v => v.as_f64(),
        };
        Ok(PreferenceRow {
            row,
            line,
            prompt_id,
            prompt,
            chosen,
            rejected,
            score_chosen: score(&self.score_chosen),
            score_rejected: score(&self.score_rejected),
            template: template_inputs(fields)?,
        })
    }

    /// A value as text or messages (a single message object is a one-message list); `None` for
    /// null.
    fn turns(&self, v: &Value) -> std::result::Result<Option<Turns>, SkipReason> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(Turns::Text(s.clone()))),
            Value::Object(m) => Ok(self.message(m)?.map(|m| Turns::Messages(vec![m]))),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let Value::Object(m) = item else {
                        return Err(SkipReason::WrongType);
                    };
                    match self.message(m)? {
                        Some(m) => out.push(m),
                        None => return Ok(None),
                    }
                }
                Ok(Some(Turns::Messages(out)))
            }
            _ => Err(SkipReason::WrongType),
        }
    }

    /// A message object through `message_keys` and `roles`; `None` when role or content is
    /// missing or null (the row is then skipped as `null_value`). A `content` list is a list
    /// of parts, each an object (another item is a `wrong_type` skip).
    fn message(&self, m: &Map<String, Value>) -> std::result::Result<Option<Message>, SkipReason> {
        // a tool call's turn may have no content (OpenAI's exports write null): transformers
        // drops the key, and a template that checks for it renders the call (one that reads it
        // unchecked fails: a `template_error` skip, as TRL fails on it)
        let calls = m.get("tool_calls").is_some_and(|v| !v.is_null());
        let (role, content) = match (m.get(&self.role), m.get(&self.content)) {
            (Some(Value::String(r)), Some(Value::String(c))) => (r, Content::Text(c.clone())),
            (Some(Value::String(r)), Some(Value::Array(parts)))
                if parts.iter().all(Value::is_object) =>
            {
                (r, Content::Parts(parts.clone()))
            }
            (Some(Value::String(r)), None | Some(Value::Null)) if calls => (r, Content::Null),
            (None | Some(Value::Null), _) | (_, None | Some(Value::Null)) => return Ok(None),
            _ => return Err(SkipReason::WrongType),
        };
        let role = self.roles.get(role).unwrap_or(role);
        Ok(Some(Message {
            role: role.clone(),
            content,
            extra: m
                .iter()
                .filter(|(k, _)| **k != self.role && **k != self.content)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }))
    }
}

/// TRL's `tools` (a list, or a JSON string holding one; null is none) and
/// `chat_template_kwargs` (an object) columns; another type is a `wrong_type` skip, where TRL
/// would fail on the whole dataset.
fn template_inputs(fields: &Map<String, Value>) -> std::result::Result<TemplateInputs, SkipReason> {
    let tools = match fields.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Null) => None,
            Ok(v @ Value::Array(_)) => Some(v),
            _ => return Err(SkipReason::WrongType),
        },
        Some(v @ Value::Array(_)) => Some(v.clone()),
        Some(_) => return Err(SkipReason::WrongType),
    };
    let kwargs = match fields.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(SkipReason::WrongType),
    };
    Ok(TemplateInputs { tools, kwargs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Columns, MessageKeys, Role};
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn sharegpt_mapping_single_message_objects_and_skips() {
        let cfg = DatasetConfig {
            columns: Columns {
                prompt: Some("conversations".into()),
                ..Columns::default()
            },
            message_keys: MessageKeys {
                role: Some("from".into()),
                content: Some("value".into()),
            },
            roles: [
                ("human".to_string(), Role::User),
                ("gpt".to_string(), Role::Assistant),
            ]
            .into_iter()
            .collect(),
            ..DatasetConfig::default()
        };
        let m = Mapping::new(&cfg);
        let row = m
            .row(
                3,
                Some(4),
                &fields(json!({
                    "conversations": [{"from": "human", "value": "q"}],
                    "chosen": {"from": "gpt", "value": "a"},
                    "rejected": {"from": "gpt", "value": "b"},
                })),
            )
            .unwrap();
        assert_eq!(
            row.prompt,
            Some(Turns::Messages(vec![Message::new("user", "q")]))
        );
        assert_eq!(
            row.chosen,
            Some(Turns::Messages(vec![Message::new("assistant", "a")]))
        );
        assert_eq!((row.row, row.line), (3, Some(4)));
        let skip = |v: Value| m.row(0, None, &fields(v)).unwrap_err();
        assert_eq!(
            skip(json!({"conversations": [], "chosen": "a"})),
            SkipReason::MissingField
        );
        assert_eq!(
            skip(json!({"conversations": [], "chosen": 1, "rejected": "b"})),
            SkipReason::WrongType
        );
        assert_eq!(
            skip(json!({"chosen": "a", "rejected": "b"})),
            SkipReason::MissingField,
            "a mapped prompt is required"
        );
        let err = m
            .check_columns(
                &fields(json!({"prompt": "p", "chosen": "a", "rejected": "b"})),
                Path::new("f.jsonl"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`conversations`") && err.contains("found: prompt, chosen, rejected"),
            "{err}"
        );
    }

    #[test]
    fn a_prompt_of_the_other_kind_is_ignored_as_trl_does() {
        let m = Mapping::new(&DatasetConfig::default());
        let conv = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
        let row = m
            .row(
                0,
                None,
                &fields(json!({"prompt": "q", "chosen": conv, "rejected": conv, "prompt_id": "x"})),
            )
            .unwrap();
        assert_eq!((row.prompt, row.prompt_id.as_str()), (None, "x"));
        let row = m
            .row(
                0,
                None,
                &fields(json!({"prompt": "q", "chosen": " a", "rejected": " b"})),
            )
            .unwrap();
        assert_eq!(row.prompt, Some(Turns::Text("q".into())));
    }

    #[test]
    fn scores_are_numbers_or_strings_holding_one() {
        let m = Mapping::new(&DatasetConfig::default());
        let score = |c: Value, r: Value| {
            let f = fields(json!({"prompt": "q", "chosen": " a", "rejected": " b",
                "score_chosen": c, "score_rejected": r}));
            let row = m.row(0, None, &f).unwrap();
            (row.score_chosen, row.score_rejected)
        };
        assert_eq!(score(json!(9.5), json!(3)), (Some(9.5), Some(3.0)));
        assert_eq!(score(json!(" 9.5"), json!("x")), (Some(9.5), None));
        assert_eq!(score(json!("NaN"), json!(null)), (None, None));
    }
}

#[cfg(test)]
mod prompt_tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> std::result::Result<PreferenceRow, SkipReason> {
        Mapping::new(&DatasetConfig::default()).row(0, None, v.as_object().unwrap())
    }

    /// A prompt the file holds is never replaced by one taken from the answers: a null one,
    /// or a conversation beside plain-text answers (TRL fails on both), is a counted skip;
    /// the H4 layout's string prompt beside full conversations is still ignored as TRL does.
    #[test]
    fn a_prompt_of_the_file_is_used_or_the_row_skipped() {
        let text = json!({"prompt": null, "chosen": " The sky is blue.", "rejected": " The sky is green."});
        assert_eq!(row(text).unwrap_err(), SkipReason::NullValue);
        let mixed = json!({
            "prompt": [{"role": "user", "content": "Question?"}],
            "chosen": "The answer is 1.", "rejected": "The answer is 2.",
        });
        assert_eq!(row(mixed).unwrap_err(), SkipReason::WrongType);
        let null_turn = json!({
            "prompt": [{"role": "user", "content": null}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        });
        assert_eq!(row(null_turn).unwrap_err(), SkipReason::NullValue);
        let h4 = json!({
            "prompt": "q",
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        });
        assert_eq!(row(h4).unwrap().prompt, None);
    }

    /// OpenAI's export of a tool call: `content: null` beside `tool_calls`, read as an empty
    /// content (transformers drops the key; the template renders the call).
    #[test]
    fn a_tool_call_turn_without_content_is_read() {
        let calls = json!([{"type": "function", "function": {"name": "f", "arguments": {}}}]);
        let r = row(json!({
            "prompt": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": calls},
                {"role": "tool", "content": "sunny"},
            ],
            "chosen": [{"role": "assistant", "content": "Sunny."}],
            "rejected": [{"role": "assistant", "content": "Rain."}],
        }))
        .unwrap();
        let Some(Turns::Messages(p)) = r.prompt else {
            panic!("a conversation prompt")
        };
        assert_eq!(
            (&p[1].content, &p[1].extra["tool_calls"]),
            (&Content::Null, &calls)
        );
        assert_eq!(p[0].content, Content::Text("weather?".into()));
    }

    /// A `content` list of parts is read as it is (TRL passes it to the template); a list
    /// holding something other than objects is a `wrong_type` skip.
    #[test]
    fn a_content_list_of_parts_is_read() {
        let parts = json!([{"type": "text", "text": "Hi"}, {"type": "image"}]);
        let r = row(json!({
            "prompt": [{"role": "user", "content": parts}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
            "rejected": [{"role": "assistant", "content": "B"}],
        }))
        .unwrap();
        let Some(Turns::Messages(p)) = r.prompt else {
            panic!("a conversation prompt")
        };
        assert_eq!(
            p[0].content,
            Content::Parts(parts.as_array().unwrap().clone())
        );
        assert_eq!(
            (p[0].content.text(), p[0].content.is_blank()),
            ("Hi".into(), false)
        );
        let bad = row(json!({
            "prompt": [{"role": "user", "content": ["Hi"]}],
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        }));
        assert_eq!(bad.unwrap_err(), SkipReason::WrongType);
    }
}
