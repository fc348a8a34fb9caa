//! perch's JSON Schemas (`schemas/` at the workspace root), for tests to
//! check real outputs against.
//!
//! Every file is registered under its `$id`, so a `$ref` from one to another
//! resolves offline; a schema is named by its path below `schemas/` without
//! `.json` (`"cli/perch-bundle-build"`, `"wire/report"`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// Every schema file: its name (`area/file` without `.json`) and content.
pub fn all() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut areas: Vec<_> = std::fs::read_dir(dir()).expect("schemas/").map(|e| e.unwrap().path()).collect();
    areas.sort();
    for area in areas.iter().filter(|p| p.is_dir()) {
        for f in std::fs::read_dir(area).unwrap().map(|e| e.unwrap().path()) {
            if f.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&f).unwrap();
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                let name = format!(
                    "{}/{}",
                    area.file_name().unwrap().to_string_lossy(),
                    f.file_stem().unwrap().to_string_lossy()
                );
                out.insert(name, v);
            }
        }
    }
    out
}

/// Checks `doc` against schema `name`; panics listing every violation.
pub fn check(name: &str, doc: &Value) {
    if let Err(errors) = validate(name, doc) {
        panic!("{name}: {doc} does not match its schema:\n{}", errors.join("\n"));
    }
}

/// Checks `doc` against schema `name`: each violation, with where it is.
pub fn validate(name: &str, doc: &Value) -> Result<(), Vec<String>> {
    let validator = validator(name);
    let errors: Vec<String> =
        validator.iter_errors(doc).map(|e| format!("  at {}: {e}", e.instance_path())).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Schema `name`, built once per test process (a test may check thousands
/// of reports).
fn validator(name: &str) -> Arc<jsonschema::Validator> {
    static BUILT: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = built.get(name) {
        return v.clone();
    }
    let schemas = all();
    let schema = schemas.get(name).unwrap_or_else(|| panic!("no schema {name} in {}", dir().display()));
    let mut registry = jsonschema::Registry::new();
    for v in schemas.values() {
        let id = v["$id"].as_str().expect("every schema has an $id");
        registry = registry.add(id, v.clone()).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let registry = registry.prepare().unwrap_or_else(|e| panic!("schemas: {e}"));
    let validator = jsonschema::options()
        .with_registry(&registry)
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("{name}: the schema does not build: {e}"));
    let v = Arc::new(validator);
    built.insert(name.to_string(), v.clone());
    v
}

/// A TOML document as the JSON value it decodes to, for checking
/// `agent.toml` against `config/agent`. Integers stay integers (a TOML
/// integer out of the u64/i64 range is a string, which no schema accepts).
pub fn toml_to_json(text: &str) -> Result<Value, String> {
    use toml::de::{DeTable, DeValue};
    fn table(t: &DeTable<'_>) -> Value {
        Value::Object(t.iter().map(|(k, v)| (k.get_ref().to_string(), value(v.get_ref()))).collect())
    }
    fn value(v: &DeValue<'_>) -> Value {
        match v {
            DeValue::String(s) => Value::String(s.to_string()),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(i.as_str().to_string())),
            DeValue::Float(f) => f.as_str().parse::<f64>().map(Value::from).unwrap_or(Value::Null),
            DeValue::Boolean(b) => Value::Bool(*b),
            DeValue::Datetime(d) => Value::String(d.to_string()),
            DeValue::Array(a) => Value::Array(a.iter().map(|v| value(v.get_ref())).collect()),
            DeValue::Table(t) => table(t),
        }
    }
    let doc = DeTable::parse(text).map_err(|e| e.to_string())?;
    Ok(table(doc.get_ref()))
}

/// Checks what `program args` printed with `--json` against its schema in
/// `schemas/cli/`: the schema named by the longest run of the command's
/// words (`perch bundle inspect FILE` is `perch-bundle-inspect`). Commands
/// that print JSON lines have each line checked. A `--json` command with
/// no schema fails the test: every `--json` output has one.
pub fn check_cli_output(program: &str, args: &[&str], stdout: &str) {
    if !args.contains(&"--json") || stdout.trim().is_empty() {
        return;
    }
    let words: Vec<&str> = args.iter().copied().take_while(|a| !a.starts_with('-')).collect();
    let schemas = all();
    let name = (1..=words.len())
        .rev()
        .map(|n| format!("cli/{program}-{}", words[..n].join("-")))
        .find(|n| schemas.contains_key(n))
        // `perch deploy --bundle ...` is `deploy start`'s older form.
        .or_else(|| (program == "perch" && words == ["deploy"]).then(|| "cli/perch-deploy-start".into()))
        .unwrap_or_else(|| panic!("no schema in schemas/cli/ for {program} {args:?}"));
    if let Ok(doc) = serde_json::from_str::<Value>(stdout) {
        return check(&name, &doc);
    }
    // JSON lines (deploy start/resume): each line is a document. With
    // --qr (token issue), the document is followed by the QR code.
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty()).peekable();
    if args.contains(&"--qr") {
        let first = lines.next().unwrap_or_default();
        let doc = serde_json::from_str(first).unwrap_or_else(|e| panic!("{program} {args:?}: {e}: {first}"));
        return check(&name, &doc);
    }
    assert!(lines.peek().is_some(), "{program} {args:?} --json printed nothing");
    for line in lines {
        let doc = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{program} {args:?}: not JSON ({e}): {line}"));
        check(&name, &doc);
    }
}
