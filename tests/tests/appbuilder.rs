//! The appbuilder files: the repository's `ABTaskFile` (development tasks,
//! for `abt`) and `appbuilder/perch-ops-app.yaml` (the operators' app).
//!
//! Each must be a valid appbuilder v1 application (our reading of its
//! schema, `appbuilder/application.schema.json`, and of the checks
//! appbuilder makes on load), every template must name a declared
//! argument or flag, and every command must be one perch has: each
//! `perch`/`perch-bootstrap` invocation's subcommand answers `--help`, and
//! lists every flag the invocation passes and every value its enums offer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(r) => r.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter().map(|(k, v)| (k.as_str().expect("string keys").to_string(), to_json(v))).collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("unsupported YAML: {other:?}"),
    }
}

fn load(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: one YAML document");
    to_json(&docs[0])
}

fn schema_errors(doc: &Value) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("appbuilder/application.schema.json")).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    let v = jsonschema::options().build(&schema).expect("the schema builds");
    v.iter_errors(doc).map(|e| format!("at {}: {e}", e.instance_path())).collect()
}

/// Every command, with the path of names that reaches it.
fn commands(doc: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(prefix: &str, list: &'a Value, out: &mut Vec<(String, &'a Value)>) {
        for c in list.as_array().into_iter().flatten() {
            let path = format!("{prefix} {}", c["name"].as_str().unwrap_or("?")).trim().to_string();
            out.push((path.clone(), c));
            walk(&path, &c["commands"], out);
        }
    }
    let mut out = vec![];
    walk("", &doc["commands"], &mut out);
    out
}

fn names(c: &Value, key: &str) -> BTreeSet<String> {
    c[key].as_array().into_iter().flatten().filter_map(|a| a["name"].as_str().map(String::from)).collect()
}

/// What a command's templates refer to: `.Arguments.X`, `.Flags.X` and
/// `index .Flags "X"`, as (kind, name).
fn references(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for block in text.split("{{").skip(1).map(|b| b.split("}}").next().unwrap_or("")) {
        for (kind, marker) in [("arguments", ".Arguments."), ("flags", ".Flags.")] {
            for part in block.split(marker).skip(1) {
                let name: String =
                    part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.insert((kind.to_string(), name));
            }
        }
        for part in block.split("index .Flags \"").skip(1) {
            out.insert(("flags".to_string(), part.split('"').next().unwrap_or("").to_string()));
        }
    }
    out
}

/// The invocations of one of `programs` in a command or script: the words
/// before the first option, and the options, with templates taken out.
fn invocations(text: &str, programs: &[&str]) -> Vec<(Vec<String>, Vec<String>)> {
    let mut plain = String::new();
    for (i, part) in text.split("{{").enumerate() {
        plain.push_str(if i == 0 { part } else { part.split_once("}}").map_or("", |(_, rest)| rest) });
        plain.push(' ');
    }
    // A folded `command: >-` is one line; a script is several.
    let mut out = vec![];
    for line in plain.lines() {
        let tokens: Vec<String> = line.split_whitespace().map(String::from).collect();
        if !tokens.first().is_some_and(|t| programs.contains(&t.as_str())) {
            continue;
        }
        let words = tokens
            .iter()
            .take_while(|t| !t.starts_with('-'))
            .filter(|t| !t.contains(['$', '"', '\'']))
            .cloned();
        let options = tokens.iter().filter(|t| t.starts_with("--")).cloned();
        out.push((words.collect(), options.collect()));
    }
    out
}

/// The checks appbuilder makes on load, and ours on top.
fn check_definition<'a>(rel: &str, doc: &'a Value) -> Vec<(String, &'a Value)> {
    let errors = schema_errors(doc);
    assert!(errors.is_empty(), "{rel} is not a valid appbuilder application:\n{}", errors.join("\n"));
    let all = commands(doc);
    assert!(!all.is_empty());
    for (path, c) in &all {
        // Siblings' names are unique (appbuilder would register one twice).
        let subs: Vec<&str> =
            c["commands"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(
            subs.len(),
            subs.iter().collect::<BTreeSet<_>>().len(),
            "{rel}: {path}: duplicate sub command"
        );
        let text = [&c["command"], &c["script"], &c["banner"]]
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        for (kind, name) in references(&text) {
            assert!(
                names(c, &kind).contains(&name),
                "{rel}: {path}: the template names {kind} {name:?}, which it does not declare"
            );
        }
    }
    all
}

#[test]
fn the_abtaskfile_is_an_appbuilder_application_of_xtask_commands() {
    let doc = load("ABTaskFile");
    let all = check_definition("ABTaskFile", &doc);
    let xtask: String = std::fs::read_dir(root().join("xtask/src"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    let mut seen = BTreeSet::new();
    for (path, c) in all.iter().filter(|(_, c)| c["type"] == "exec") {
        let text = c["command"].as_str().or(c["script"].as_str()).unwrap();
        for (words, options) in invocations(text, &["cargo"]) {
            if words.get(1).map(String::as_str) != Some("xtask") {
                continue;
            }
            let sub = words.get(2).unwrap_or_else(|| panic!("{path}: cargo xtask without a command"));
            assert!(xtask.contains(&format!("Some(\"{sub}\")")), "{path}: no `cargo xtask {sub}`");
            for o in options {
                assert!(xtask.contains(&o), "{path}: cargo xtask {sub} has no {o}");
            }
            for a in c["arguments"].as_array().into_iter().flatten() {
                for v in a["enum"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    assert!(xtask.contains(&format!("\"{v}\"")), "{path}: cargo xtask {sub} has no {v}");
                }
            }
            seen.insert(sub.clone());
        }
    }
    // The development tasks the issue names, at least.
    for t in ["demo", "ci", "bench", "cross", "package", "docs"] {
        assert!(seen.contains(t), "ABTaskFile has no `cargo xtask {t}`: {seen:?}");
    }
}

#[test]
fn the_perch_ops_app_runs_commands_perch_has() {
    let doc = load("appbuilder/perch-ops-app.yaml");
    let all = check_definition("perch-ops", &doc);
    let mut seen = BTreeSet::new();
    for (path, c) in all.iter().filter(|(_, c)| c["type"] == "exec") {
        let text = c["command"].as_str().or(c["script"].as_str()).unwrap();
        let calls = invocations(text, &["perch", "perch-bootstrap"]);
        assert!(!calls.is_empty(), "{path}: runs neither perch nor perch-bootstrap");
        for (words, options) in calls {
            let out = std::process::Command::new(perch_tests::bin(&words[0]))
                .args(&words[1..])
                .arg("--help")
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{path}: `{} --help` failed: {}",
                words.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            for o in &options {
                assert!(
                    help.contains(&format!("{o} ")) || help.contains(&format!("{o}\n")),
                    "{path}: `{}` has no {o}:\n{help}",
                    words.join(" ")
                );
            }
            let enums = ["arguments", "flags"].iter().flat_map(|k| c[*k].as_array().into_iter().flatten());
            for v in enums.flat_map(|a| a["enum"].as_array().into_iter().flatten()).filter_map(Value::as_str)
            {
                assert!(help.contains(v), "{path}: `{}` does not offer {v}:\n{help}", words.join(" "));
            }
            seen.insert(words.join(" "));
        }
    }
    // The flows the issue names: enroll a batch, publish and roll out,
    // watch status, approve pending devices.
    for flow in [
        "perch-bootstrap token issue",
        "perch publish",
        "perch deploy start",
        "perch status",
        "perch-bootstrap approve",
        "perch-bootstrap pending",
    ] {
        assert!(seen.contains(flow), "perch-ops has no `{flow}`: {seen:?}");
    }
}

#[test]
fn a_definition_appbuilder_would_refuse_is_refused() {
    let good = load("appbuilder/perch-ops-app.yaml");
    type Spoil = fn(&mut Value);
    let bad: [(&str, Spoil); 7] = [
        ("no version", |d| drop(d.as_object_mut().unwrap().remove("version"))),
        ("version not semver", |d| d["version"] = json!("1.0")),
        ("a parent with flags", |d| d["commands"][0]["flags"] = json!([{"name": "x", "description": "x"}])),
        ("an exec with command and script", |d| d["commands"][2]["script"] = json!("true")),
        ("a flag with a number default", |d| d["commands"][2]["flags"][1]["default"] = json!(3)),
        ("a misspelt key", |d| d["commands"][2]["flag"] = json!([])),
        ("an unknown type", |d| d["commands"][2]["type"] = json!("rpc")),
    ];
    assert!(schema_errors(&good).is_empty());
    for (what, spoil) in bad {
        let mut d = good.clone();
        spoil(&mut d);
        assert!(!schema_errors(&d).is_empty(), "{what}: accepted");
    }
}
