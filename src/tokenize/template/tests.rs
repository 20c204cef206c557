use super::*;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chatml_renders_with_and_without_generation_prompt() {
    let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
    let msgs = [Message::new("user", "Hi")];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n"
    );
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// transformers 5.24 gives the template a model's own `*_token` keys and the names of
/// `extra_special_tokens`' map (run on SmolLM2's tokenizer with this template:
/// `[<|endoftext|>|<|im_end|>|]hi`); refdpo had left them undefined (fuzzer).
#[test]
fn a_models_own_named_tokens_reach_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "chat_template": "[{{ image_token }}|{{ sep_think_token }}|{{ boi_token }}]{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "extra_special_tokens": {"image_token": "<|endoftext|>"},
        "sep_think_token": "<|im_end|>",
        "add_bos_token": true,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], false).unwrap(),
        "[<|endoftext|>|<|im_end|>|]hi"
    );
}

/// A null `content` (a tool call's turn) is no key at all to the template, as transformers
/// drops a null key: a template that checks for it renders the call, one that reads it
/// unchecked fails as in transformers (it had rendered an empty answer; fuzzer).
#[test]
fn a_null_content_is_no_content_key() {
    let mut call = Message::new("assistant", "");
    call.content = Content::Null;
    call.extra
        .insert("tool_calls".into(), serde_json::json!([{"name": "f"}]));
    let msgs = [Message::new("user", "Hi"), call];
    let checked = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}:{% if m.content is defined %}[{{ m.content }}]\
         {% endif %}{% if m.tool_calls %}{{ m.tool_calls[0].name }}{% endif %};{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        checked.render(&msgs, false).unwrap(),
        "user:[Hi];assistant:f;"
    );
    let unchecked = ChatTemplate::new(
        "{% for m in messages %}{{ m['content'] + '|' }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert!(unchecked.render(&msgs, false).is_err());
}

/// A special token left out of tokenizer_config.json (not null) while it names a tokenizer
/// class: transformers takes the class's own default, refdpo refuses by key. The EOS token
/// always counts (TRL appends it to plain-text answers); another only if the template uses it.
#[test]
fn a_special_token_left_to_a_class_default_is_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let load = |cfg: serde_json::Value| {
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        ChatTemplate::from_dir(dir.path())
    };
    let err =
        load(serde_json::json!({"tokenizer_class": "GPT2Tokenizer", "chat_template": CHATML}))
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("`eos_token`") && err.contains("GPT2Tokenizer"),
        "{err}"
    );
    let uses_bos = format!("{{{{ bos_token }}}}{CHATML}");
    let err = load(serde_json::json!({"tokenizer_class": "GPT2Tokenizer", "chat_template": uses_bos, "eos_token": "</s>"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`bos_token`"), "{err}");
    // null is "none", and a class without defaults has none to take
    let t = load(serde_json::json!({"tokenizer_class": "GPT2Tokenizer", "chat_template": uses_bos, "eos_token": null, "bos_token": null}))
        .unwrap();
    assert_eq!(t.eos_token(), None);
    assert_eq!(
        t.render(&[Message::new("user", "Hi")], false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n"
    );
    let t = load(serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": uses_bos}))
        .unwrap();
    assert_eq!(t.eos_token(), None);
    // a template of another type is refused by key, not taken for none (fuzzer)
    for wrong in [
        serde_json::json!(5),
        serde_json::json!({"x": 1}),
        serde_json::json!(true),
    ] {
        let err = load(serde_json::json!({"chat_template": wrong}))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`chat_template` in") && err.contains("not a template"),
            "{err}"
        );
    }
    let t = load(serde_json::json!({"chat_template": null})).unwrap();
    let err = t.render(&[Message::new("user", "Hi")], false).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
}

/// transformers renders `{% generation %}` blocks' bodies as is (whitespace control
/// included); printed by transformers 5.24's `apply_chat_template` for this template.
#[test]
fn generation_blocks_render_their_body() {
    let src = "{% for m in messages %}{% if m.role == 'assistant' %}\n{%- generation -%}\n  {{ m.content }}  \n{%- endgeneration %}\nEND{% else %}{{ m.content }}|{% endif %}{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Yo")];
    assert_eq!(t.render(&msgs, false).unwrap(), "Hi|YoEND");
}

/// A division by zero is Python's `ZeroDivisionError` (a `template_error` for the row, as
/// TRL fails on it), where minijinja wrote `inf` or `NaN`; the rest divide as before.
#[test]
fn a_division_by_zero_is_an_error_as_in_python() {
    let msgs = [Message::new("user", "Hi")];
    for src in [
        "{{ 1 / 0 }}",
        "{{ 1.5 / 0.0 }}",
        "{{ 1.5 // 0.0 }}",
        "{{ 1.5 % 0.0 }}",
        "{{ 1 % 0 }}",
    ] {
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&msgs, false).unwrap_err().to_string();
        assert!(
            err.contains("rendering the chat template failed"),
            "{src}: {err}"
        );
    }
    let t =
        ChatTemplate::new("{{ 7 / 2 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 7.5 % 2 }}", "", "").unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "3.5 3 1 1.5");
}

/// A model without a chat template still tokenizes plain-text rows (TRL needs none there);
/// rendering a conversation fails with the fix, a `template_error` for that row.
#[test]
fn no_template_is_an_error_only_for_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({"eos_token": "</s>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.eos_token(), Some("</s>"));
    let e = t
        .render(&[Message::new("user", "Hi")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no chat template") && e.contains("chat_template.jinja"),
        "{e}"
    );
}

#[test]
fn python_methods_and_exceptions_work() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  hey ")], false).unwrap(),
        "HEY"
    );
    let err = t.render(&[Message::new("system", "x")], false).unwrap_err();
    assert!(err.to_string().contains("first must be user"), "{err}");
}

#[test]
fn tojson_writes_like_python() {
    let t = ChatTemplate::new(
        "{{ {'a': [1, 'x<y'], 'b': none, 'c': {}} | tojson }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        r#"{"a": [1, "x<y"], "b": null, "c": {}}"#
    );
    // json.dumps({"a": [1, "é"], "b": {"c": None}}, indent=2, ensure_ascii=False)
    let t = ChatTemplate::new(
        "{{ {'a': [1, 'é'], 'b': {'c': none}} | tojson(indent=2) }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        "{\n  \"a\": [\n    1,\n    \"é\"\n  ],\n  \"b\": {\n    \"c\": null\n  }\n}"
    );
}

#[test]
fn runaway_templates_stop_with_an_error_naming_the_limit() {
    let msgs = [Message::new("user", &"Hi".repeat(500))];
    let writes = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap()
    .limit_output(1 << 20);
    let e = writes.render(&msgs, false).unwrap_err().to_string();
    assert!(e.contains("more than 1048576 bytes"), "{e}");
    let spins = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = spins.render(&msgs, false).unwrap_err().to_string();
    assert!(e.contains("ran out of its 2000000 instructions"), "{e}");
    let recurses = ChatTemplate::new(
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "",
        "",
    )
    .unwrap();
    let e = recurses.render(&msgs, false).unwrap_err().to_string();
    assert!(
        e.contains("recurses without end") || e.contains("recursion"),
        "{e}"
    );
}

/// Jinja2 features chat templates use, each against the text transformers 5.24 renders, or its
/// error (tests/fixtures/template_features.json, made by gen_template_features_fixtures.py).
/// Every mismatch is listed at once.
#[test]
fn jinja2_features_render_as_transformers() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/template_features.json"
    );
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let m = &fx["messages"][0];
    let msgs = [Message::new(
        m["role"].as_str().unwrap(),
        m["content"].as_str().unwrap(),
    )];
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut wrong = Vec::new();
    for case in cases {
        let src = case["template"].as_str().unwrap();
        let got = ChatTemplate::new(src, "", "").and_then(|t| t.render(&msgs, false));
        match (case.get("rendered").and_then(|r| r.as_str()), &got) {
            (Some(want), Ok(text)) if text == want => {}
            (None, Err(_)) => {}
            (want, _) => wrong.push(format!(
                "{src}\n  transformers: {}\n  refdpo:       {got:?}",
                want.map_or_else(|| case["error"].to_string(), |w| format!("{w:?}"))
            )),
        }
    }
    // what refdpo does not read as Jinja2 yet: an HTML entity beyond the XML five in
    // `striptags` (an error, where Python unescapes it)
    const KNOWN_GAPS: [&str; 1] = ["{{ 'Main &raquo;\t<em>About</em>'|striptags }}"];
    let gaps: Vec<&str> = wrong
        .iter()
        .map(|w| w.lines().next().unwrap_or_default())
        .collect();
    assert_eq!(
        gaps,
        KNOWN_GAPS,
        "{} of {} differ from transformers:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}
