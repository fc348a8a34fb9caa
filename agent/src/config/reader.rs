//! Typed reading of a parsed TOML document, naming the key and its line in
//! every error.
//!
//! agent.toml used to be read with serde derive; the derived visitors and
//! toml's serde deserializer cost the agent about 120 KB of its 3 MB budget
//! (docs: operations/benchmarks). This reads toml's own span-carrying tree
//! instead. Every key must be taken before [`Table::finish`], so a typo is an
//! error rather than a silently ignored setting.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// What is wrong, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub line: usize,
    pub message: String,
}

type Value<'a> = Spanned<DeValue<'a>>;

/// Parses a whole document; a syntax error names its line.
pub fn parse(text: &str) -> Result<Spanned<DeTable<'_>>, FieldError> {
    DeTable::parse(text).map_err(|e| FieldError {
        line: line_of(text, e.span().map_or(0, |s| s.start)),
        message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// One table being read.
pub struct Table<'a> {
    text: &'a str,
    /// Dotted name ("" for the document itself).
    name: String,
    line: usize,
    rest: BTreeMap<&'a str, (&'a Spanned<Cow<'a, str>>, &'a Value<'a>)>,
}

impl<'a> Table<'a> {
    /// The document's top level.
    pub fn root(text: &'a str, doc: &'a Spanned<DeTable<'a>>) -> Self {
        Self::new(text, String::new(), 1, doc.get_ref())
    }

    fn new(text: &'a str, name: String, line: usize, t: &'a DeTable<'a>) -> Self {
        let rest = t.iter().map(|(k, v)| (k.get_ref().as_ref(), (k, v))).collect();
        Self { text, name, line, rest }
    }

    fn key(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn error(&self, at: usize, key: &str, what: impl Display) -> FieldError {
        FieldError { line: line_of(self.text, at), message: format!("{}: {what}", self.key(key)) }
    }

    fn wrong(&self, v: &Value<'_>, key: &str, expected: &str) -> FieldError {
        self.error(v.span().start, key, format!("expected {expected}, found {}", v.get_ref().type_str()))
    }

    fn take(&mut self, key: &str) -> Option<&'a Value<'a>> {
        self.rest.remove(key).map(|(_, v)| v)
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        match v.get_ref() {
            DeValue::String(s) => Ok(Some(s.to_string())),
            _ => Err(self.wrong(v, key, "a string")),
        }
    }

    pub fn path(&mut self, key: &str) -> Result<Option<PathBuf>, FieldError> {
        Ok(self.string(key)?.map(PathBuf::from))
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        v.get_ref().as_bool().map(Some).ok_or_else(|| self.wrong(v, key, "true or false"))
    }

    /// A whole number that fits `T` (u32, u64, usize).
    pub fn number<T: TryFrom<u64>>(&mut self, key: &str) -> Result<Option<T>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        let DeValue::Integer(i) = v.get_ref() else { return Err(self.wrong(v, key, "a whole number")) };
        u64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .and_then(|n| T::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.error(v.span().start, key, format!("{i} is out of range")))
    }

    /// A duration written as a string: "90s", "5m", "1h 30m".
    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        let DeValue::String(s) = v.get_ref() else { return Err(self.wrong(v, key, "a duration string")) };
        humantime::parse_duration(s)
            .map(Some)
            .map_err(|e| self.error(v.span().start, key, format!("'{s}' is not a duration ({e})")))
    }

    pub fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        let Some(items) = v.get_ref().as_array() else {
            return Err(self.wrong(v, key, "an array of strings"));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(s.to_string()),
                _ => return Err(self.wrong(item, key, "a string")),
            }
        }
        Ok(Some(out))
    }

    pub fn table(&mut self, key: &str) -> Result<Option<Table<'a>>, FieldError> {
        let Some(v) = self.take(key) else { return Ok(None) };
        match v.get_ref() {
            DeValue::Table(t) => {
                Ok(Some(Table::new(self.text, self.key(key), line_of(self.text, v.span().start), t)))
            }
            _ => Err(self.wrong(v, key, "a table")),
        }
    }

    /// The line the table starts on.
    pub fn line(&self) -> usize {
        self.line
    }

    /// A key with no default.
    pub fn required<T>(&self, value: Option<T>, key: &str) -> Result<T, FieldError> {
        value.ok_or_else(|| FieldError {
            line: self.line,
            message: if self.name.is_empty() {
                format!("missing key `{key}`")
            } else {
                format!("{}: missing key `{key}`", self.name)
            },
        })
    }

    /// Sets `slot` if the key is there; keeps the default otherwise.
    pub fn set<T>(
        &mut self,
        key: &str,
        slot: &mut T,
        read: fn(&mut Self, &str) -> Result<Option<T>, FieldError>,
    ) -> Result<(), FieldError> {
        if let Some(v) = read(self, key)? {
            *slot = v;
        }
        Ok(())
    }

    /// Every key must have been read: anything left is unknown.
    pub fn finish(self) -> Result<(), FieldError> {
        match self.rest.into_iter().next() {
            None => Ok(()),
            Some((k, (ks, _))) => Err(FieldError {
                line: line_of(self.text, ks.span().start),
                message: if self.name.is_empty() {
                    format!("unknown key `{k}`")
                } else {
                    format!("{}: unknown key `{k}`", self.name)
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_ranges_and_leftovers_are_named_with_their_line() {
        let text = "a = 1\n[t]\nn = -1\nbig = 0x1_0000_0000\nd = \"2s\"\nlist = [\"x\", 2]\nzz = true\n";
        let doc = parse(text).unwrap();
        let mut root = Table::root(text, &doc);
        assert_eq!(root.string("a").unwrap_err().message, "a: expected a string, found integer");
        let mut t = root.table("t").unwrap().unwrap();
        let e = t.number::<u64>("n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (3, "t.n: -1 is out of range"));
        assert!(t.number::<u32>("big").unwrap_err().message.contains("out of range"));
        assert_eq!(t.duration("d").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(t.strings("list").unwrap_err().line, 6);
        assert_eq!(t.required(None::<u8>, "missing").unwrap_err().message, "t: missing key `missing`");
        let e = t.finish().unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (7, "t: unknown key `zz`"));
        root.finish().unwrap();
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let e = parse("a = 1\nb = = 2\n").err().unwrap();
        assert_eq!(e.line, 2, "{e:?}");
        assert!(!e.message.contains('\n'));
    }
}
