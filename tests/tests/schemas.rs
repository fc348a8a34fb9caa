//! `schemas/`: every file is a valid JSON Schema named by its path, the
//! agent's configurations (shipped, documented, tested) match
//! `config/agent`, what the agent refuses the schema refuses too, and the
//! docs' schema reference lists every schema. Real `--json` outputs and
//! wire records are checked where the tests make them (json_output.rs,
//! service.rs).

use std::path::Path;

use perch_tests::device::{Backend, Device};
use perch_tests::schema::{self, toml_to_json};
use serde_json::{json, Value};

#[test]
fn every_schema_is_a_valid_schema_named_by_its_path() {
    let all = schema::all();
    assert!(all.len() >= 30, "{:?}", all.keys());
    for (name, v) in &all {
        let (area, file) = name.split_once('/').unwrap();
        assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema", "{name}");
        assert_eq!(v["$id"], format!("https://perch.invalid/schemas/{area}/v1/{file}.json"), "{name}");
        for k in ["title", "description"] {
            assert!(v[k].as_str().is_some_and(|t| !t.trim().is_empty()), "{name}: no {k}");
        }
        if let Err(e) = jsonschema::meta::validate(v) {
            panic!("{name}: not a valid JSON Schema: {e}");
        }
        // It builds, with every reference resolved (nothing is fetched).
        let _ = schema::validate(name, &Value::Null);
    }
}

/// The configs a reader meets: shipped with the packages, and written in
/// the docs (a fragment is checked inside a minimal config).
fn documented_configs() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = vec![];
    let shipped =
        std::fs::read_dir(root.join("targets")).unwrap().map(|e| e.unwrap().path().join("agent.toml"));
    for f in shipped.filter(|f| f.exists()) {
        let text = std::fs::read_to_string(&f).unwrap();
        out.push((f.display().to_string(), toml_to_json(&text).unwrap()));
    }
    assert_eq!(out.len(), 3, "one agent.toml per shipped target");
    let base = json!({"target": "t", "trust": "/etc/perch/trust.doc", "slots": {"backend": "dir", "root": "/opt/app"}});
    for page in [
        "reference/agent-config.md",
        "getting-started/_index.md",
        "operations/provisioning.md",
        "operations/field-sites.md",
    ] {
        let text = std::fs::read_to_string(root.join("docs/content").join(page)).unwrap();
        let mut blocks = 0;
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            let Some(indent) = l.find("```toml") else { continue };
            let block: Vec<&str> =
                lines.by_ref().take_while(|l| !l.trim_start().starts_with("```")).collect();
            let block: String =
                block.iter().map(|l| format!("{}\n", l.get(indent..).unwrap_or(""))).collect();
            let mut v = toml_to_json(&block).unwrap_or_else(|e| panic!("{page}: {e}\n{block}"));
            for (k, default) in base.as_object().unwrap() {
                v.as_object_mut().unwrap().entry(k.clone()).or_insert(default.clone());
            }
            out.push((format!("{page}, block {blocks}"), v));
            blocks += 1;
        }
        assert!(blocks > 0, "{page}: no toml block");
    }
    out
}

#[test]
fn every_shipped_documented_and_tested_agent_config_matches_the_schema() {
    for (what, v) in documented_configs() {
        if let Err(e) = schema::validate("config/agent", &v) {
            panic!("{what}: {v} does not match config/agent:\n{}", e.join("\n"));
        }
    }
    // The configs the end-to-end tests run the agent with, one per backend.
    for backend in [Backend::Dir, Backend::Uboot, Backend::Grub, Backend::Hook] {
        let d = Device::new(backend);
        let text = std::fs::read_to_string(d.path("agent.toml")).unwrap();
        schema::check("config/agent", &toml_to_json(&text).unwrap());
        assert_eq!(d.agent(&["status"]).code, 0, "the agent runs with it");
    }
}

#[test]
fn what_the_agent_refuses_in_a_config_the_schema_refuses_too() {
    let d = Device::new(Backend::Uboot);
    let good = std::fs::read_to_string(d.path("agent.toml")).unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("unknown key", "[health]", "[health]\nretries = 3"),
        ("unknown section", "[inhibit]", "[nonsense]\nx = 1\n[inhibit]"),
        ("bootlimit over 9", "bootlimit = 2", "bootlimit = 10"),
        ("bootlimit 0", "bootlimit = 2", "bootlimit = 0"),
        ("duration without a unit", "poll = \"100ms\"", "poll = \"100\""),
        ("duration as a number", "poll = \"100ms\"", "poll = 100"),
        ("unknown backend", "backend = \"uboot\"", "backend = \"floppy\""),
        ("missing fw_env_config", "fw_env_config", "fw_env_configs"),
        ("negative checkpoint", "checkpoint_bytes = ", "checkpoint_bytes = -"),
        ("https health url", "[health]", "[health]\nurls = [\"https://x/\"]"),
        ("bad device id", "[inhibit]", "[device]\nid = \"a.b\"\n[inhibit]"),
        ("bad link url", "[inhibit]", "[link]\nurls = [\"http://x:4222\"]\n[inhibit]"),
        ("no target", "target = ", "targets = "),
    ];
    for (what, from, to) in cases {
        assert!(good.contains(from), "{what}: {from:?} not in\n{good}");
        let text = good.replacen(from, to, 1);
        std::fs::write(d.path("agent.toml"), &text).unwrap();
        let r = d.agent(&["status"]);
        assert_eq!(r.code, 2, "{what}: the agent took\n{text}\n{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        let v = toml_to_json(&text).unwrap();
        assert!(schema::validate("config/agent", &v).is_err(), "{what}: the schema took\n{text}");
    }
}

#[test]
fn the_schema_reference_page_lists_every_schema() {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/content/reference/schemas.md");
    let text = std::fs::read_to_string(&page).unwrap();
    for (name, v) in schema::all() {
        let file = format!("schemas/{name}.json");
        assert!(text.contains(&format!("`{file}`")), "{} does not list {file}", page.display());
        let title = v["title"].as_str().unwrap();
        assert!(text.contains(title), "{} does not give {file}'s title {title:?}", page.display());
    }
    // The agent.toml reference documents every key the schema has.
    let config = std::fs::read_to_string(page.with_file_name("agent-config.md")).unwrap();
    let all = schema::all();
    let agent = &all["config/agent"];
    let mut keys: Vec<String> = vec![];
    for (section, s) in agent["properties"].as_object().unwrap() {
        match s["properties"].as_object() {
            Some(p) => keys.extend(p.keys().map(|k| format!("`{k}`"))),
            None if section != "slots" => keys.push(format!("`{section}`")),
            None => {}
        }
    }
    for variant in agent["properties"]["slots"]["oneOf"].as_array().unwrap() {
        keys.extend(variant["properties"].as_object().unwrap().keys().map(|k| format!("`{k}`")));
    }
    for k in keys.iter().filter(|k| k.as_str() != "`vars`") {
        assert!(config.contains(k.as_str()), "agent-config.md does not document {k}");
    }
}
