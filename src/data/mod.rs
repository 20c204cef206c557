//! The data stage: preference rows in the UltraFeedback-binarized layout, and the demo generator.

pub mod demo;
pub mod ultrafeedback;

use serde::{Deserialize, Serialize};

/// One chat message, as in the dataset's `chosen` / `rejected` / `messages` columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// One source row, before validation: both conversations end with their assistant answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceRow {
    /// Row index in the source split.
    pub row: u64,
    pub prompt_id: String,
    /// `None` where a value was null (the row is then skipped as malformed).
    pub chosen: Option<Vec<Message>>,
    pub rejected: Option<Vec<Message>>,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
}

pub use ultrafeedback::{read_split, split_files};
