//! The tokenize stage: chat templates (minijinja) and TRL's prompt/completion split and truncation.

mod added;
pub mod backend;
pub mod bounds;
pub mod pairs;
mod pystr;
mod python;
pub mod template;
mod vocabulary;

pub use pairs::{window, PairTokenizer, SkipReason, TokenizedPair};
pub use template::ChatTemplate;
