//! Pairs split as TRL splits them, against hand-worked cases.

use super::*;

fn row(chosen: Option<Vec<(&str, &str)>>, rejected: Option<Vec<(&str, &str)>>) -> PreferenceRow {
    let conv = |v: Vec<(&str, &str)>| {
        Turns::Messages(v.into_iter().map(|(r, c)| Message::new(r, c)).collect())
    };
    PreferenceRow {
        chosen: chosen.map(conv),
        rejected: rejected.map(conv),
        ..PreferenceRow::conversation(0, vec![], vec![])
    }
}

fn text(prompt: Option<&str>, chosen: &str, rejected: &str) -> PreferenceRow {
    PreferenceRow {
        prompt: prompt.map(|p| Turns::Text(p.into())),
        chosen: Some(Turns::Text(chosen.into())),
        rejected: Some(Turns::Text(rejected.into())),
        ..PreferenceRow::conversation(0, vec![], vec![])
    }
}

/// Without an EOS token TRL fails on plain-text answers (it appends the token): such a row is
/// a `template_error`; a conversation needs none.
#[test]
fn standard_rows_without_an_eos_token_are_template_errors() {
    let r = text(Some("Sky?"), " blue", " green");
    assert_eq!(split_pair(&r, None).unwrap_err(), SkipReason::TemplateError);
    let c = row(
        Some(vec![("user", "q"), ("assistant", "a")]),
        Some(vec![("user", "q"), ("assistant", "b")]),
    );
    assert!(split_pair(&c, None).is_ok());
}

#[test]
fn standard_rows_extract_the_prompt_and_get_eos_as_trl_does() {
    let split = |r: &PreferenceRow| match split_pair(r, Some("</s>")).unwrap() {
        Pair::Text {
            prompt,
            chosen,
            rejected,
        } => (prompt, chosen, rejected),
        Pair::Chat(_) => panic!("a text row"),
    };
    // The common prefix ends in a space: the space goes to the answers.
    let (p, c, r) = split(&text(None, "Sky? It is blue", "Sky? It is green"));
    assert_eq!(
        (p.as_str(), c.as_str(), r.as_str()),
        ("Sky? It is", " blue</s>", " green</s>")
    );
    // One side a prefix of the other: the split falls at the last shared index.
    let (p, c, r) = split(&text(None, "ab", "abc"));
    assert_eq!(
        (p.as_str(), c.as_str(), r.as_str()),
        ("a", "b</s>", "bc</s>")
    );
    // An answer that already ends with EOS keeps one.
    let (p, c, _) = split(&text(Some("Q:"), " a</s>", " b"));
    assert_eq!((p.as_str(), c.as_str()), ("Q:", " a</s>"));
    let skip = |r: PreferenceRow| split_pair(&r, Some("</s>")).unwrap_err();
    assert_eq!(
        skip(text(Some("Q"), " ", "b")),
        SkipReason::EmptyAssistantTurn
    );
    assert_eq!(skip(text(None, "a", "b")), SkipReason::EmptyPrompt);
    assert_eq!(
        skip(text(Some("Q"), "a", "a")),
        SkipReason::IdenticalResponses
    );
    let mut mixed = text(None, "a", "b");
    mixed.rejected = Some(Turns::Messages(vec![Message::new("assistant", "b")]));
    assert_eq!(skip(mixed), SkipReason::WrongType);
}

#[test]
fn each_skip_reason() {
    let ok = vec![("user", "q"), ("assistant", "a")];
    let cases = [
        (row(None, Some(ok.clone())), SkipReason::NullValue),
        (
            row(
                Some(vec![("robot", "q"), ("assistant", "a")]),
                Some(ok.clone()),
            ),
            SkipReason::UnknownRole,
        ),
        (
            row(Some(vec![("user", "q")]), Some(ok.clone())),
            SkipReason::FinalTurnNotAssistant,
        ),
        (
            row(Some(vec![]), Some(ok.clone())),
            SkipReason::FinalTurnNotAssistant,
        ),
        (
            row(
                Some(vec![("user", "q"), ("assistant", "  ")]),
                Some(ok.clone()),
            ),
            SkipReason::EmptyAssistantTurn,
        ),
        (
            row(
                Some(vec![("assistant", "a")]),
                Some(vec![("assistant", "b")]),
            ),
            SkipReason::EmptyPrompt,
        ),
        (
            row(
                Some(vec![("user", "q2"), ("assistant", "b")]),
                Some(ok.clone()),
            ),
            SkipReason::PromptMismatch,
        ),
        (
            row(Some(ok.clone()), Some(ok.clone())),
            SkipReason::IdenticalResponses,
        ),
    ];
    for (r, want) in cases {
        assert_eq!(split_pair(&r, Some("</s>")).unwrap_err(), want);
    }
    let good = row(Some(ok), Some(vec![("user", "q"), ("assistant", "b")]));
    let Ok(Pair::Chat(conv)) = split_pair(&good, Some("</s>")) else {
        panic!("a valid conversation")
    };
    assert_eq!(conv.rejected[0].content.text(), "b");
}

#[test]
fn windows_follow_trls_collator() {
    let (p, c) = ([1, 2, 3], [4, 5, 6, 7]);
    assert_eq!(window(&p, &c, 10, Truncation::KeepStart), (&p[..], &c[..]));
    assert_eq!(window(&p, &c, 5, Truncation::KeepStart), (&p[..], &c[..2]));
    assert_eq!(window(&p, &c, 5, Truncation::KeepEnd), (&p[2..], &c[..]));
    // Completion alone longer than max_length: its first kept token is context, not scored.
    assert_eq!(window(&p, &c, 3, Truncation::KeepEnd), (&c[1..2], &c[2..]));
    assert_eq!(kept(&p, &c, 5, Truncation::KeepStart), (vec![4, 5], true));
    assert_eq!(kept(&p, &c, 3, Truncation::KeepEnd), (vec![5, 6, 7], true));
    assert_eq!(kept(&p, &c, 9, Truncation::KeepEnd), (c.to_vec(), false));
}

/// An answer that only calls a tool (empty content, `tool_calls` set) is a turn TRL trains on:
/// the template renders the call. An empty answer without one is still empty.
#[test]
fn an_answer_that_calls_a_tool_is_not_empty() {
    let calls = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    let mut call = Message::new("assistant", "");
    call.extra.insert("tool_calls".into(), calls);
    let r = PreferenceRow {
        prompt: Some(Turns::Messages(vec![Message::new("user", "q")])),
        chosen: Some(Turns::Messages(vec![call])),
        rejected: Some(Turns::Messages(vec![Message::new("assistant", "b")])),
        ..row(None, None)
    };
    assert!(split_pair(&r, None).is_ok());
    let r = PreferenceRow {
        chosen: Some(Turns::Messages(vec![Message::new("assistant", " ")])),
        ..r
    };
    assert_eq!(
        split_pair(&r, None).unwrap_err(),
        SkipReason::EmptyAssistantTurn
    );
}
