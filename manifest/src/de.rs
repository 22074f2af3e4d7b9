//! A serde `Deserializer` over the located tree, so typed deserialization of a manifest reports
//! every type error, unknown field, bad enum value and missing field with its dotted path and the
//! line and column (or `--set` argument) it came from.
//!
//! Invariant: an error is located once, by the innermost node it arose in; outer nodes pass it on
//! unchanged.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};
use serde::forward_to_deserialize_any;

use crate::error::{Location, ManifestError};
use crate::tree::{Entry, Node, Scalar, Value};

/// A deserialization error with the place it arose.
#[derive(Debug)]
pub(crate) struct DeError {
    message: String,
    located: Option<(String, Location)>,
}

impl DeError {
    fn locate(mut self, path: &str, at: &Location) -> Self {
        if self.located.is_none() {
            self.located = Some((path.to_string(), at.clone()));
        }
        self
    }

    /// The error as the crate reports it.
    pub(crate) fn into_manifest_error(self, origin: &str) -> ManifestError {
        let (path, at) = self.located.unwrap_or((String::new(), Location::Unknown));
        ManifestError::Field {
            origin: origin.to_string(),
            at,
            path: display_path(&path),
            message: self.message,
        }
    }
}

/// The path as errors print it; the document root has none of its own.
pub(crate) fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(document)".to_string()
    } else {
        path.to_string()
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            located: None,
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Deserializes one node; `path` and `at` are what its errors report.
pub(crate) struct NodeDe<'a> {
    node: &'a Node,
    path: String,
    at: Location,
}

impl<'a> NodeDe<'a> {
    /// The document root.
    pub(crate) fn root(node: &'a Node) -> Self {
        NodeDe {
            node,
            path: String::new(),
            at: node.at.clone(),
        }
    }

    fn entry(entry: &'a Entry, parent: &str) -> Self {
        NodeDe {
            node: &entry.value,
            path: join(parent, &entry.key),
            at: entry.key_at.clone(),
        }
    }

    fn any<'de, V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(Scalar::Null) => visitor.visit_unit(),
            Value::Scalar(Scalar::Bool(b)) => visitor.visit_bool(*b),
            Value::Scalar(Scalar::Int(i)) => visitor.visit_i64(*i),
            Value::Scalar(Scalar::UInt(u)) => visitor.visit_u64(*u),
            Value::Scalar(Scalar::Float(f)) => visitor.visit_f64(*f),
            Value::Scalar(Scalar::Str(s)) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
                path: &self.path,
            }),
            Value::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                pending: None,
                path: &self.path,
            }),
        }
    }

    fn enumeration<'de, V: Visitor<'de>>(
        &self,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(Scalar::Str(s)) => {
                visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(s.as_str()))
            }
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(EnumDe {
                entry: &entries[0],
                path: &self.path,
            }),
            Value::Map(_) => Err(de::Error::custom(format!(
                "expected a mapping with exactly one key naming the variant, one of {}",
                quoted_list(variants)
            ))),
            _ => Err(de::Error::custom(format!(
                "expected one of {}",
                quoted_list(variants)
            ))),
        }
    }
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.any(visitor)
            .map_err(|e| e.locate(&self.path, &self.at))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Scalar(Scalar::Null) => visitor.visit_none(),
            _ => visitor.visit_some(NodeDe {
                node: self.node,
                path: self.path.clone(),
                at: self.at.clone(),
            }),
        };
        result.map_err(|e| e.locate(&self.path, &self.at))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (path, at) = (self.path.clone(), self.at.clone());
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.locate(&path, &at))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.enumeration(variants, visitor)
            .map_err(|e| e.locate(&self.path, &self.at))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct SeqDe<'a, 'p> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
    path: &'p str,
}

impl<'de> SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDe {
            node: item,
            path,
            at: item.at.clone(),
        })
        .map(Some)
    }
}

struct MapDe<'a, 'p> {
    entries: std::slice::Iter<'a, Entry>,
    pending: Option<&'a Entry>,
    path: &'p str,
}

impl<'de> MapAccess<'de> for MapDe<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some(entry);
        let path = join(self.path, &entry.key);
        seed.deserialize(KeyDe { key: &entry.key })
            .map(Some)
            .map_err(|e| e.locate(&path, &entry.key_at))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.pending.take() {
            Some(entry) => seed.deserialize(NodeDe::entry(entry, self.path)),
            None => Err(de::Error::custom("a mapping value was read before its key")),
        }
    }
}

/// A mapping key: deserializes as the key's text.
struct KeyDe<'a> {
    key: &'a str,
}

impl<'de> de::Deserializer<'de> for KeyDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str(self.key)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct EnumDe<'a, 'p> {
    entry: &'a Entry,
    path: &'p str,
}

impl<'de, 'a> EnumAccess<'de> for EnumDe<'a, '_> {
    type Error = DeError;
    type Variant = NodeDe<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'a>), DeError> {
        let path = join(self.path, &self.entry.key);
        let value = seed
            .deserialize(KeyDe {
                key: &self.entry.key,
            })
            .map_err(|e| e.locate(&path, &self.entry.key_at))?;
        Ok((value, NodeDe::entry(self.entry, self.path)))
    }
}

impl<'de> VariantAccess<'de> for NodeDe<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match &self.node.value {
            Value::Scalar(Scalar::Null) => Ok(()),
            Value::Map(entries) if entries.is_empty() => Ok(()),
            _ => Err(
                <DeError as de::Error>::custom("this variant takes no settings")
                    .locate(&self.path, &self.at),
            ),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            // `synthetic:` with nothing under it means "all defaults".
            Value::Scalar(Scalar::Null) => {
                let empty = Node {
                    value: Value::Map(Vec::new()),
                    at: self.node.at.clone(),
                };
                let inner = NodeDe {
                    node: &empty,
                    path: self.path.clone(),
                    at: self.at.clone(),
                };
                de::Deserializer::deserialize_any(inner, visitor)
            }
            _ => de::Deserializer::deserialize_any(self, visitor),
        }
    }
}
