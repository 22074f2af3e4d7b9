//! A located YAML tree: the document as parsed by serde-saphyr, with the line and column of every
//! mapping key and value, plus the `--set path=value` overrides grafted onto it.
//!
//! Invariant: every node knows where it came from (a file position or an override argument), so
//! any error about a field — a type error during deserialization or a cross-field rule checked
//! afterwards — can name its path, line and column.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::error::{Location, ManifestError};

/// A scalar as YAML's core schema resolved it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
}

/// The shape of a node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A mapping entry: the key's text and position, and the value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_at: Location,
    pub(crate) value: Node,
}

/// A value and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) at: Location,
}

impl Node {
    /// Parses one YAML document; an empty document is an empty mapping.
    pub(crate) fn parse(src: &str, origin: &str) -> Result<Node, ManifestError> {
        if src.trim().is_empty() {
            return Ok(Node {
                value: Value::Map(Vec::new()),
                at: Location::File { line: 1, column: 1 },
            });
        }
        let raw: Spanned<Raw> =
            serde_saphyr::from_str(src).map_err(|err| syntax_error(origin, &err))?;
        Ok(into_node(raw, None))
    }

    /// Parses the value of `--set path=value` as a YAML scalar or flow collection.
    fn parse_override(text: &str, at: &Location, arg: &str) -> Result<Node, ManifestError> {
        if text.trim().is_empty() {
            return Ok(Node {
                value: Value::Scalar(Scalar::Null),
                at: at.clone(),
            });
        }
        let raw: Spanned<Raw> =
            serde_saphyr::from_str(text).map_err(|err| ManifestError::Override {
                arg: arg.to_string(),
                message: format!(
                    "the value is not valid YAML: {}",
                    first_line(&err.to_string())
                ),
            })?;
        Ok(into_node(raw, Some(at)))
    }

    /// Applies `--set a.b.c=value` arguments in order, creating missing mappings on the way.
    pub(crate) fn apply_overrides(&mut self, overrides: &[String]) -> Result<(), ManifestError> {
        for (index, arg) in overrides.iter().enumerate() {
            let Some((path, text)) = arg.split_once('=') else {
                return Err(ManifestError::Override {
                    arg: arg.clone(),
                    message: "expected path.to.field=value".to_string(),
                });
            };
            let segments: Vec<&str> = path.split('.').collect();
            if segments.iter().any(|s| s.is_empty()) {
                return Err(ManifestError::Override {
                    arg: arg.clone(),
                    message: format!("`{path}` is not a dotted field path"),
                });
            }
            let at = Location::Override {
                index,
                arg: arg.clone(),
            };
            let value = Node::parse_override(text, &at, arg)?;
            self.set(&segments, value, &at, arg)?;
        }
        Ok(())
    }

    fn set(
        &mut self,
        segments: &[&str],
        value: Node,
        at: &Location,
        arg: &str,
    ) -> Result<(), ManifestError> {
        let mut node = self;
        for (depth, segment) in segments.iter().enumerate() {
            // An empty value (`data:` with nothing under it) becomes a mapping to set fields in.
            if node.value == Value::Scalar(Scalar::Null) {
                node.value = Value::Map(Vec::new());
            }
            let Value::Map(entries) = &mut node.value else {
                return Err(ManifestError::Field {
                    origin: String::new(),
                    at: at.clone(),
                    path: segments[..depth].join("."),
                    message: format!(
                        "is not a mapping, so `--set {arg}` cannot set a field inside it"
                    ),
                });
            };
            let position = match entries.iter().position(|e| e.key == *segment) {
                Some(position) => position,
                None => {
                    entries.push(Entry {
                        key: (*segment).to_string(),
                        key_at: at.clone(),
                        value: Node {
                            value: Value::Map(Vec::new()),
                            at: at.clone(),
                        },
                    });
                    entries.len() - 1
                }
            };
            let entry = &mut entries[position];
            if depth + 1 == segments.len() {
                entry.key_at = at.clone();
                entry.value = value;
                return Ok(());
            }
            node = &mut entry.value;
        }
        Ok(())
    }

    /// Where the field at `path` (dotted, as the error paths print) was written: the key of the
    /// deepest entry along the path that exists, or the document start.
    pub(crate) fn locate(&self, path: &str) -> Location {
        let mut node = self;
        let mut found = self.at.clone();
        for segment in path.split('.').filter(|s| !s.is_empty()) {
            let (key, index) = split_index(segment);
            let Value::Map(entries) = &node.value else {
                break;
            };
            let Some(entry) = entries.iter().find(|e| e.key == key) else {
                break;
            };
            found = entry.key_at.clone();
            node = &entry.value;
            if let Some(index) = index {
                match &node.value {
                    Value::Seq(items) if index < items.len() => {
                        node = &items[index];
                        found = node.at.clone();
                    }
                    _ => break,
                }
            }
        }
        found
    }
}

fn split_index(segment: &str) -> (&str, Option<usize>) {
    if let Some(open) = segment.find('[')
        && let Some(inner) = segment[open + 1..].strip_suffix(']')
        && let Ok(index) = inner.parse()
    {
        return (&segment[..open], Some(index));
    }
    (segment, None)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

fn syntax_error(origin: &str, err: &serde_saphyr::Error) -> ManifestError {
    let (line, column) = err
        .location()
        .map(|loc| (loc.line(), loc.column()))
        .unwrap_or((0, 0));
    // saphyr's text is "error: line L column C: what" plus a source snippet; keep only "what".
    let text = err.to_string();
    let first = first_line(&text);
    let what = first
        .strip_prefix("error: ")
        .and_then(|rest| rest.split_once(": "))
        .filter(|(place, _)| place.starts_with("line "))
        .map_or(first, |(_, what)| what);
    let what = what
        .strip_suffix(", set DuplicateKeyPolicy in Options if acceptable")
        .unwrap_or(what);
    ManifestError::Syntax {
        origin: origin.to_string(),
        line,
        column,
        message: what.to_string(),
    }
}

/// The serde-facing mirror of `Value`, with saphyr's spans on every key and value.
enum Raw {
    Scalar(Scalar),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<RawKey>, Spanned<Raw>)>),
}

/// A mapping key; non-string scalar keys are kept as their text.
struct RawKey(String);

fn into_node(raw: Spanned<Raw>, fixed: Option<&Location>) -> Node {
    {
        let this = raw;
        let at = match fixed {
            Some(at) => at.clone(),
            None => Location::File {
                line: this.referenced.line(),
                column: this.referenced.column(),
            },
        };
        let value = match this.value {
            Raw::Scalar(scalar) => Value::Scalar(scalar),
            Raw::Seq(items) => Value::Seq(items.into_iter().map(|i| into_node(i, fixed)).collect()),
            Raw::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(key, value)| Entry {
                        key_at: match fixed {
                            Some(at) => at.clone(),
                            None => Location::File {
                                line: key.referenced.line(),
                                column: key.referenced.column(),
                            },
                        },
                        key: key.value.0,
                        value: into_node(value, fixed),
                    })
                    .collect(),
            ),
        };
        Node { value, at }
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Null))
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        Raw::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Int(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::UInt(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Str(v.to_string())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Scalar(Scalar::Str(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<RawKey>>()? {
            let value = map.next_value::<Spanned<Raw>>()?;
            entries.push((key, value));
        }
        Ok(Raw::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Raw::deserialize(deserializer)? {
            Raw::Scalar(Scalar::Str(s)) => Ok(RawKey(s)),
            Raw::Scalar(Scalar::Int(i)) => Ok(RawKey(i.to_string())),
            Raw::Scalar(Scalar::UInt(u)) => Ok(RawKey(u.to_string())),
            Raw::Scalar(Scalar::Bool(b)) => Ok(RawKey(b.to_string())),
            Raw::Scalar(Scalar::Float(f)) => Ok(RawKey(f.to_string())),
            Raw::Scalar(Scalar::Null) => Ok(RawKey("null".to_string())),
            Raw::Seq(_) | Raw::Map(_) => Err(de::Error::custom("mapping keys must be scalars")),
        }
    }
}
