//! The data stage: preference rows from the user's files (Parquet, JSON Lines, JSON) or the hub in
//! any of TRL's four layouts, mapped to one row type; and the demo generator.

pub mod demo;
pub mod layout;
pub mod records;
pub mod source;
pub mod stamp;

use serde::{Deserialize, Serialize};

pub use layout::Mapping;
pub use source::{for_each_row, read_split, DataSource, ReadSplit};

/// One chat message, as in a conversational dataset's `chosen` / `rejected` / `prompt` columns.
/// Its other keys (`tool_calls`, `name`, `reasoning_content`, …) are kept, and the chat template
/// sees them, as transformers passes each message whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A message's `content` as the source gives it. The chat template sees it as it is, as
/// transformers passes it: text, or the list of parts (a template that prints the list prints
/// Python's `repr` of it, as Jinja2 does); a null `content` is no key at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    /// `[{"type": "text", "text": …}, …]`, as multimodal and OpenAI-style datasets write it.
    Parts(Vec<serde_json::Value>),
    /// Null (a tool call's turn, as OpenAI's exports write it).
    Null,
}

impl Content {
    /// The text a reader sees: the text itself, or the `text` of each `"type": "text"` part.
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("text"))
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect(),
            Content::Null => String::new(),
        }
    }

    /// Nothing to train on: blank text, no parts, or only text parts that are blank (a part of
    /// another type, an image, is something).
    pub fn is_blank(&self) -> bool {
        match self {
            Content::Text(t) => t.trim().is_empty(),
            Content::Parts(parts) => {
                parts
                    .iter()
                    .all(|p| p.get("type").and_then(|t| t.as_str()) == Some("text"))
                    && self.text().trim().is_empty()
            }
            Content::Null => true,
        }
    }
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: Content::Text(content.into()),
            extra: serde_json::Map::new(),
        }
    }
}

/// What a row gives the chat template besides its messages, as TRL 1.16 passes it: the `tools`
/// column (a list, or a JSON string of one) and the `chat_template_kwargs` column (an object of
/// template variables, e.g. Qwen3's `enable_thinking`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateInputs {
    pub tools: Option<serde_json::Value>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A prompt or an answer: plain text (TRL's "standard" layout) or messages ("conversational").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    pub fn messages(&self) -> Option<&[Message]> {
        match self {
            Turns::Messages(m) => Some(m),
            Turns::Text(_) => None,
        }
    }
}

/// One source row, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceRow {
    /// Row index in the source split.
    pub row: u64,
    /// 1-based line of a JSON Lines file, where the row came from one.
    pub line: Option<u64>,
    pub prompt_id: String,
    /// An explicit prompt; `None` when the prompt is implicit in both answers (TRL's
    /// `extract_prompt` then finds it).
    pub prompt: Option<Turns>,
    /// `None` where a value was null (the row is then skipped).
    pub chosen: Option<Turns>,
    pub rejected: Option<Turns>,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
    /// The row's `tools` and `chat_template_kwargs` (conversational rows only).
    pub template: TemplateInputs,
}

impl PreferenceRow {
    /// A conversational row with an implicit prompt (the UltraFeedback-binarized layout).
    pub fn conversation(row: u64, chosen: Vec<Message>, rejected: Vec<Message>) -> Self {
        Self {
            row,
            line: None,
            prompt_id: String::new(),
            prompt: None,
            chosen: Some(Turns::Messages(chosen)),
            rejected: Some(Turns::Messages(rejected)),
            score_chosen: None,
            score_rejected: None,
            template: TemplateInputs::default(),
        }
    }
}

/// Why a row was not kept; counted by name in `report.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// A JSON Lines line that is not a JSON object.
    BadJson,
    /// A mapped column is absent from this row.
    MissingField,
    /// A value of the wrong type: an answer that is neither text nor messages, a message
    /// without string role/content, a prompt and answers of different kinds.
    WrongType,
    /// `chosen` or `rejected` is null, or a message lacks role/content.
    NullValue,
    /// A role other than system, user, assistant or tool (after `dataset.roles`).
    UnknownRole,
    /// The conversation does not end with an assistant turn.
    FinalTurnNotAssistant,
    /// The final assistant turn (or a plain-text answer) is empty or whitespace.
    EmptyAssistantTurn,
    /// No prompt: no turns before the answer, or no common prefix.
    EmptyPrompt,
    /// The turns before the answer differ between chosen and rejected.
    PromptMismatch,
    /// Chosen and rejected answers are the same text.
    IdenticalResponses,
    /// The chat template raised an error for this conversation.
    TemplateError,
    /// With `keep_start`, the prompt alone fills `max_length` (TRL drops these too).
    PromptTooLong,
    /// A JSON Lines line that is not UTF-8 text.
    BadUtf8,
    /// A row larger than [`max_row_bytes`]: never parsed nor tokenized.
    RowTooLarge,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BadJson => "bad_json",
            SkipReason::MissingField => "missing_field",
            SkipReason::WrongType => "wrong_type",
            SkipReason::NullValue => "null_value",
            SkipReason::UnknownRole => "unknown_role",
            SkipReason::FinalTurnNotAssistant => "final_turn_not_assistant",
            SkipReason::EmptyAssistantTurn => "empty_assistant_turn",
            SkipReason::EmptyPrompt => "empty_prompt",
            SkipReason::PromptMismatch => "prompt_mismatch",
            SkipReason::IdenticalResponses => "identical_responses",
            SkipReason::TemplateError => "template_error",
            SkipReason::PromptTooLong => "prompt_too_long",
            SkipReason::BadUtf8 => "bad_utf8",
            SkipReason::RowTooLarge => "row_too_large",
        }
    }
}

/// The most bytes one source row may hold (a JSON Lines line, or a row's text values): 256 bytes
/// per token of `max_length`, at least 1 MiB. A row three texts long (prompt, chosen, rejected)
/// at that bound holds over 20 times more text than `max_length` tokens keep, so a larger one is
/// damage or a scrape gone wrong; it is skipped unread (`row_too_large`), keeping memory bounded
/// by the chunk rather than by the largest row.
pub fn max_row_bytes(max_length: usize) -> usize {
    max_length.saturating_mul(256).max(1 << 20)
}

/// A row that was not kept: where it was and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub row: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub reason: &'static str,
    /// What went wrong, where a message says more than the reason (a template's own error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
