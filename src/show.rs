//! `refdpo show`: one example as raw messages, rendered chat text and token counts.

use crate::config::Config;
use crate::data;
use crate::data::Turns;
use crate::error::{Error, Result};
use crate::inputs::Inputs;
use crate::tokenize::pairs::{prompt_id, split_pair, Pair};
use std::fmt::Write;

pub fn show(cfg: &Config, split: &str, index: usize) -> Result<String> {
    let (source, inputs) = Inputs::with_dataset(cfg, &[split])?;
    // Without a held-out split, reading up to the row is enough; with one, the whole split
    // decides which rows are held out.
    let limit = if cfg.dataset.test_size > 0.0 {
        cfg.dataset.limit
    } else {
        index.saturating_add(1)
    };
    let read = data::read_split(&source, split, limit)?;
    let Some(row) = read.rows.iter().find(|r| r.row == index as u64) else {
        if let Some(s) = read.skipped.iter().find(|s| s.row == index as u64) {
            let line = s.line.map(|l| format!(" (line {l})")).unwrap_or_default();
            return Ok(format!(
                "# {split} row {index}{line}
skipped: {}
",
                s.reason
            ));
        }
        return Err(Error::Config(format!(
            "--index {index}: split `{split}` has no row {index} ({} rows read)",
            read.rows_read
        )));
    };
    let mut out = String::new();
    // the cache's: the source's, or the prompt's SHA-256 where the source has none
    let prompt_id = prompt_id(row).unwrap_or_else(|| "none: not a preference pair".into());
    let _ = writeln!(out, "# {split} row {index} (prompt_id {prompt_id})");
    if let Some(p) = &row.prompt {
        let _ = writeln!(out, "\n## prompt");
        write_turns(&mut out, p);
    }
    for (side, turns) in [("chosen", &row.chosen), ("rejected", &row.rejected)] {
        let score = if side == "chosen" {
            row.score_chosen
        } else {
            row.score_rejected
        };
        match score {
            Some(score) => {
                let _ = writeln!(out, "\n## {side} (score {score})");
            }
            None => {
                let _ = writeln!(out, "\n## {side}");
            }
        }
        if let Some(t) = turns {
            write_turns(&mut out, t);
        }
    }
    let tok = &inputs.tokenizer;
    match tok.tokenize(row) {
        Err(reason) => {
            let _ = writeln!(out, "\nskipped: {}", reason.as_str());
        }
        Ok(pair) => {
            match split_pair(row, tok.template.eos_token()).expect("tokenized rows are valid") {
                Pair::Chat(conv) => {
                    let _ = writeln!(
                        out,
                        "\n## rendered prompt (add_generation_prompt)\n{}",
                        tok.template.render_with(conv.prompt, true, &row.template)?
                    );
                    let full = [conv.prompt, conv.chosen].concat();
                    let _ = writeln!(
                        out,
                        "## rendered prompt + chosen\n{}",
                        tok.template.render_with(&full, false, &row.template)?
                    );
                }
                Pair::Text { prompt, chosen, .. } => {
                    let _ = writeln!(
                        out,
                        "\n## prompt text (standard layout; tokenized with special tokens)\n{prompt}\n## prompt + chosen text\n{prompt}{chosen}"
                    );
                }
            }
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

fn write_turns(out: &mut String, turns: &Turns) {
    match turns {
        Turns::Text(t) => {
            let _ = writeln!(out, "{t}");
        }
        Turns::Messages(ms) => {
            for m in ms {
                let _ = writeln!(out, "[{}] {}", m.role, m.content.text());
            }
        }
    }
}
