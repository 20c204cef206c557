//! `refdpo show`: one example as raw messages, rendered chat text and token counts.

use crate::config::Config;
use crate::data;
use crate::error::{Error, Result};
use crate::inputs::Inputs;
use crate::tokenize::pairs::split_conversation;
use std::fmt::Write;

pub fn show(cfg: &Config, split: &str, index: usize) -> Result<String> {
    let (dataset_dir, inputs) = Inputs::with_dataset(cfg, &[split])?;
    let files = data::split_files(&dataset_dir, split)?;
    let rows = data::read_split(&files, index + 1)?;
    let row = rows.get(index).ok_or_else(|| {
        Error::Config(format!(
            "--index {index}: split `{split}` has only {} rows",
            rows.len()
        ))
    })?;
    let mut out = String::new();
    let _ = writeln!(out, "# {split} row {index} (prompt_id {})", row.prompt_id);
    for (side, conv) in [("chosen", &row.chosen), ("rejected", &row.rejected)] {
        let _ = writeln!(
            out,
            "\n## {side} (score {:?})",
            if side == "chosen" {
                row.score_chosen
            } else {
                row.score_rejected
            }
        );
        for m in conv.iter().flatten() {
            let _ = writeln!(out, "[{}] {}", m.role, m.content);
        }
    }
    let tok = &inputs.tokenizer;
    match tok.tokenize(row) {
        Err(reason) => {
            let _ = writeln!(out, "\nskipped: {}", reason.as_str());
        }
        Ok(pair) => {
            let conv = split_conversation(row).expect("tokenized rows are valid");
            let _ = writeln!(
                out,
                "\n## rendered prompt (add_generation_prompt)\n{}",
                tok.template.render(conv.prompt, true)?
            );
            let mut full = conv.prompt.to_vec();
            full.push(conv.chosen.clone());
            let _ = writeln!(
                out,
                "## rendered prompt + chosen\n{}",
                tok.template.render(&full, false)?
            );
            let _ = writeln!(
                out,
                "## tokens\nprompt {}  chosen {}{}  rejected {}{}  (max_length {}, {})",
                pair.prompt_ids.len(),
                pair.chosen_ids.len(),
                if pair.chosen_truncated {
                    " (truncated)"
                } else {
                    ""
                },
                pair.rejected_ids.len(),
                if pair.rejected_truncated {
                    " (truncated)"
                } else {
                    ""
                },
                cfg.tokenize.max_length,
                cfg.tokenize.truncation.as_str()
            );
            let _ = writeln!(out, "prompt_ids   {:?}", pair.prompt_ids);
            let _ = writeln!(out, "chosen_ids   {:?}", pair.chosen_ids);
            let _ = writeln!(out, "rejected_ids {:?}", pair.rejected_ids);
        }
    }
    Ok(out)
}
