//! `refdpo judge` (SPEC, "Judging generations"): did DPO help, beyond length? So far the
//! statistics over prompts ([`winrate`]): win rate with its bootstrap interval, the
//! length-controlled win rate, quintiles of the length difference. Scoring generations with a
//! reward model, the command and its report come next.

pub mod winrate;
