//! FQL values as far as the broker's queries need them: equality and ordering, and the codecs of
//! the simple, tagged and decorated formats (`docs/design.md` "Fauna over HTTP › Values").

use std::{cmp::Ordering, collections::BTreeMap};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Map, Value as Json, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// The value formats a request picks with `X-Format` (`docs/design.md` "Fauna over HTTP ›
/// Values").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Simple,
    Tagged,
    Decorated,
}

/// An FQL value, as far as the broker's queries need them.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Double(f64),
    Str(String),
    /// Nanoseconds since the Unix epoch.
    Time(i128),
    Date(String),
    Bytes(Vec<u8>),
    Module(String),
    /// A reference to a document of a collection.
    Ref {
        coll: String,
        id: String,
    },
    /// A reference to a named schema document.
    Named {
        coll: String,
        name: String,
    },
    /// A readable document, rendered in full.
    Doc(Box<Doc>),
    Array(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

/// A document as a query returns it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Doc {
    pub(super) coll: &'static str,
    pub(super) id: String,
    pub(super) ts: i128,
    pub(super) fields: Vec<(&'static str, Value)>,
}

static NULL: Value = Value::Null;

impl Value {
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            Self::Null => "Null",
            Self::Bool(_) => "Boolean",
            Self::Int(_) => "Int",
            Self::Long(_) => "Long",
            Self::Double(_) => "Double",
            Self::Str(_) => "String",
            Self::Time(_) => "Time",
            Self::Date(_) => "Date",
            Self::Bytes(_) => "Bytes",
            Self::Module(_) => "Module",
            Self::Ref { .. } | Self::Named { .. } | Self::Doc(_) => "Ref",
            Self::Array(_) => "Array",
            Self::Object(_) => "Object",
        }
    }

    pub(super) fn field(&self, key: &str) -> &Value {
        match self {
            Self::Object(fields) => fields.get(key).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    fn number(&self) -> Option<f64> {
        match self {
            Self::Int(n) => Some(f64::from(*n)),
            #[allow(clippy::cast_precision_loss)]
            Self::Long(n) => Some(*n as f64),
            Self::Double(n) => Some(*n),
            _ => None,
        }
    }
}

/// FQL `==`: numbers compare by value across Int/Long/Double, everything else structurally.
pub(super) fn fql_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Long(y)) | (Value::Long(y), Value::Int(x)) => i64::from(*x) == *y,
        _ => match (a.number(), b.number()) {
            (Some(x), Some(y)) => x == y,
            _ => match (a, b) {
                (Value::Array(x), Value::Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(x, y)| fql_eq(x, y))
                }
                (Value::Object(x), Value::Object(y)) => {
                    x.len() == y.len()
                        && x.iter()
                            .zip(y)
                            .all(|((kx, vx), (ky, vy))| kx == ky && fql_eq(vx, vy))
                }
                _ => a == b,
            },
        },
    }
}

/// Compares two strings as Fauna (the JVM) does: by UTF-16 code units.
pub(super) fn cmp_strings(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// FQL `<` and friends: values of one kind compare, others are incomparable.
pub(super) fn fql_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => Some(cmp_strings(x, y)),
        (Value::Time(x), Value::Time(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Date(x), Value::Date(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => a.number()?.partial_cmp(&b.number()?),
    }
}

/// Removes null fields from objects, as Fauna does when it stores a document.
pub(super) fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Formats a time as Java's `Instant.toString` does: UTC, `Z`, 0, 3, 6 or 9 fraction digits.
fn format_time(nanos: i128) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .expect("times are kept within years -9999..=9999");
    let fraction = t.nanosecond();
    let fraction = if fraction == 0 {
        String::new()
    } else if fraction.is_multiple_of(1_000_000) {
        format!(".{:03}", fraction / 1_000_000)
    } else if fraction.is_multiple_of(1_000) {
        format!(".{:06}", fraction / 1_000)
    } else {
        format!(".{fraction:09}")
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_time(s: &str) -> Option<i128> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp_nanos)
}

fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Ok(y), Ok(m), Ok(d)) = (s[..4].parse(), s[5..7].parse::<u8>(), s[8..].parse()) else {
        return false;
    };
    time::Month::try_from(m)
        .ok()
        .and_then(|m| time::Date::from_calendar_date(y, m, d).ok())
        .is_some()
}

/// Decodes an argument sent in the simple format: plain JSON, numbers as numbers, objects as
/// objects whatever their keys.
pub(super) fn decode_simple(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => i32::try_from(i).map_or(Value::Long(i), Value::Int),
            None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(decode_simple).collect()),
        Json::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), decode_simple(v)))
                .collect(),
        ),
    }
}

/// Modules an `@mod` may name in this database: its collections, its functions, and the
/// standard library's modules.
const MODULES: &[&str] = &[
    "Account",
    "Movie",
    "Token",
    "Key",
    "Credential",
    "Collection",
    "Function",
    "Role",
    "Database",
    "AccessProvider",
    "Time",
    "Date",
    "Math",
    "Query",
    "Object",
    "Array",
    "String",
    "rotateRefreshToken",
    "revokeCurrentToken",
];
/// Modules that are collections of documents with ids.
const ID_COLLECTIONS: &[&str] = &["Account", "Movie", "Token", "Key", "Credential"];
/// Schema collections (documents with names) and their documents in this database.
const SCHEMA: &[(&str, &[&str])] = &[
    ("Collection", &["Account", "Movie"]),
    ("Function", &["rotateRefreshToken", "revokeCurrentToken"]),
    ("Role", &["access", "refresher"]),
];

/// Decodes an argument sent in the tagged format (`UndecidedValue.parseTagged`), with the
/// server's error messages.
pub(super) fn decode_tagged(json: &Json) -> Result<Value, String> {
    match json {
        Json::Number(_) => Err("numbers must be tagged".into()),
        Json::Null => Ok(Value::Null),
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::String(s) => Ok(Value::Str(s.clone())),
        Json::Array(items) => items
            .iter()
            .map(decode_tagged)
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Json::Object(fields) => {
            if !fields.keys().any(|k| k.starts_with('@')) {
                return decode_tagged_object(fields);
            }
            if fields.len() > 1 {
                return Err("too many keys in tagged value".into());
            }
            let (tag, inner) = fields.iter().next().expect("one field");
            decode_tag(tag, inner)
        }
    }
}

fn decode_tagged_object(fields: &Map<String, Json>) -> Result<Value, String> {
    fields
        .iter()
        .map(|(k, v)| decode_tagged(v).map(|v| (k.clone(), v)))
        .collect::<Result<_, _>>()
        .map(Value::Object)
}

fn decode_tag(tag: &str, inner: &Json) -> Result<Value, String> {
    let string = || match inner {
        Json::String(s) => Ok(s.as_str()),
        _ => Err(format!("{tag} requires a string value")),
    };
    match tag {
        "@int" => string()?
            .parse()
            .map(Value::Int)
            .map_err(|_| "invalid integer".into()),
        "@long" => string()?
            .parse()
            .map(Value::Long)
            .map_err(|_| "invalid long".into()),
        "@double" => string()?
            .trim()
            .parse()
            .map(Value::Double)
            .map_err(|_| "invalid double".into()),
        "@object" => match inner {
            Json::Object(fields) => decode_tagged_object(fields),
            _ => Err(format!("{tag} requires an object value")),
        },
        "@time" => parse_time(string()?)
            .map(Value::Time)
            .ok_or_else(|| "invalid time".into()),
        "@date" => {
            let s = string()?;
            if valid_date(s) {
                Ok(Value::Date(s.to_owned()))
            } else {
                Err("invalid date".into())
            }
        }
        "@bytes" => STANDARD
            .decode(string()?)
            .map(Value::Bytes)
            .map_err(|_| "invalid bytes".into()),
        "@mod" => {
            let name = string()?;
            if MODULES.contains(&name) {
                Ok(Value::Module(name.to_owned()))
            } else {
                Err(format!("no such module '{name}'"))
            }
        }
        "@doc" | "@ref" => decode_reference(tag, inner),
        _ => Err(format!("invalid tag '{tag}'")),
    }
}

fn decode_reference(tag: &str, inner: &Json) -> Result<Value, String> {
    match decode_tagged(inner)? {
        Value::Object(fields) => match fields.get("coll") {
            Some(Value::Module(coll)) => {
                if let Some((_, names)) = SCHEMA.iter().find(|(c, _)| c == coll) {
                    match fields.get("name") {
                        Some(Value::Str(name)) if names.contains(&name.as_str()) => {
                            Ok(Value::Named {
                                coll: coll.clone(),
                                name: name.clone(),
                            })
                        }
                        Some(Value::Str(name)) => Err(format!("no such schema object '{name}'")),
                        Some(_) => Err(format!("{tag} field 'name' requires a string value")),
                        None => Err(format!("{tag} field 'name' is required")),
                    }
                } else if ID_COLLECTIONS.contains(&coll.as_str()) {
                    match fields.get("id") {
                        Some(Value::Str(id)) => match id.parse::<i64>() {
                            Ok(id) => Ok(Value::Ref {
                                coll: coll.clone(),
                                id: id.to_string(),
                            }),
                            Err(_) => Err(format!("{tag} field 'id' must be an integer")),
                        },
                        Some(_) => Err(format!("{tag} field 'id' requires a string value")),
                        None => Err(format!("{tag} field 'id' is required")),
                    }
                } else {
                    Err(format!("{tag} field 'coll' requires a module value"))
                }
            }
            Some(_) => Err(format!("{tag} field 'coll' requires a module value")),
            None => Err(format!("{tag} field 'coll' is required")),
        },
        Value::Str(doc) => match doc.split(':').collect::<Vec<_>>().as_slice() {
            [coll, id] if ID_COLLECTIONS.contains(coll) => match id.parse::<i64>() {
                Ok(id) => Ok(Value::Ref {
                    coll: (*coll).to_owned(),
                    id: id.to_string(),
                }),
                Err(_) => Err(format!("invalid document id '{id}'")),
            },
            [coll, name] => match SCHEMA.iter().find(|(c, _)| c == coll) {
                Some((_, names)) if names.contains(name) => Ok(Value::Named {
                    coll: (*coll).to_owned(),
                    name: (*name).to_owned(),
                }),
                Some(_) => Err(format!("no such schema definition document '{name}'")),
                None => Err(format!("no such collection '{coll}'")),
            },
            _ => Err("doc id must be in the format <coll>:<id>".into()),
        },
        _ => Err(format!("{tag} requires an object value")),
    }
}

/// Encodes a result value in the request's format.
pub(super) fn encode(value: &Value, format: Format) -> Json {
    match format {
        Format::Simple => encode_simple(value),
        Format::Tagged => encode_tagged(value),
        Format::Decorated => Json::String(fql_text(value)),
    }
}

pub(super) fn encode_simple(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(n) => json!(n),
        Value::Long(n) => json!(n),
        Value::Double(n) => json!(n),
        Value::Str(s) | Value::Date(s) | Value::Module(s) => json!(s),
        Value::Time(t) => json!(format_time(*t)),
        Value::Bytes(b) => json!(STANDARD.encode(b)),
        Value::Ref { coll, id } => json!({ "id": id, "coll": coll }),
        Value::Named { coll, name } => json!({ "name": name, "coll": coll }),
        Value::Doc(doc) => {
            let mut fields = Map::new();
            fields.insert("id".into(), json!(doc.id));
            fields.insert("coll".into(), json!(doc.coll));
            fields.insert("ts".into(), json!(format_time(doc.ts)));
            for (k, v) in &doc.fields {
                fields.insert((*k).into(), encode_simple(v));
            }
            Json::Object(fields)
        }
        Value::Array(items) => Json::Array(items.iter().map(encode_simple).collect()),
        Value::Object(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), encode_simple(v)))
                .collect(),
        ),
    }
}

fn encode_tagged(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(n) => json!({ "@int": n.to_string() }),
        Value::Long(n) => json!({ "@long": n.to_string() }),
        Value::Double(n) => json!({ "@double": format!("{n:?}") }),
        Value::Str(s) => json!(s),
        Value::Date(s) => json!({ "@date": s }),
        Value::Module(s) => json!({ "@mod": s }),
        Value::Time(t) => json!({ "@time": format_time(*t) }),
        Value::Bytes(b) => json!({ "@bytes": STANDARD.encode(b) }),
        Value::Ref { coll, id } => json!({ "@ref": { "id": id, "coll": { "@mod": coll } } }),
        Value::Named { coll, name } => {
            json!({ "@ref": { "name": name, "coll": { "@mod": coll } } })
        }
        Value::Doc(doc) => {
            let mut fields = Map::new();
            fields.insert("id".into(), json!(doc.id));
            fields.insert("coll".into(), json!({ "@mod": doc.coll }));
            fields.insert("ts".into(), json!({ "@time": format_time(doc.ts) }));
            for (k, v) in &doc.fields {
                fields.insert((*k).into(), encode_tagged(v));
            }
            json!({ "@doc": fields })
        }
        Value::Array(items) => Json::Array(items.iter().map(encode_tagged).collect()),
        Value::Object(fields) => {
            let object: Map<String, Json> = fields
                .iter()
                .map(|(k, v)| (k.clone(), encode_tagged(v)))
                .collect();
            if fields.keys().any(|k| k.starts_with('@')) {
                json!({ "@object": object })
            } else {
                Json::Object(object)
            }
        }
    }
}

/// Renders a value as FQL source text, for the decorated format (an approximation).
pub(super) fn fql_text(value: &Value) -> String {
    let key = |k: &str| {
        let identifier = k
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_alphanumeric() || c == '_');
        if identifier {
            k.to_owned()
        } else {
            Json::String(k.to_owned()).to_string()
        }
    };
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Double(n) => format!("{n:?}"),
        Value::Str(s) => Json::String(s.clone()).to_string(),
        Value::Time(t) => format!("Time(\"{}\")", format_time(*t)),
        Value::Date(d) => format!("Date(\"{d}\")"),
        Value::Bytes(b) => format!("Bytes(\"{}\")", STANDARD.encode(b)),
        Value::Module(m) => m.clone(),
        Value::Ref { coll, id } => format!("{coll}(\"{id}\")"),
        Value::Named { coll, name } => format!("{coll}.byName(\"{name}\")"),
        Value::Doc(doc) => {
            let mut parts = vec![
                format!("id: \"{}\"", doc.id),
                format!("coll: {}", doc.coll),
                format!("ts: Time(\"{}\")", format_time(doc.ts)),
            ];
            parts.extend(
                doc.fields
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", fql_text(v))),
            );
            format!("{{ {} }}", parts.join(", "))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(fql_text).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) if fields.is_empty() => "{}".into(),
        Value::Object(fields) => format!(
            "{{ {} }}",
            fields
                .iter()
                .map(|(k, v)| format!("{}: {}", key(k), fql_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_like_java_instants() {
        let base = 1_777_777_777_000_000_000_i128;
        assert_eq!(format_time(base), "2026-05-03T03:09:37Z");
        assert_eq!(format_time(base + 120_000_000), "2026-05-03T03:09:37.120Z");
        assert_eq!(
            format_time(base + 123_456_000),
            "2026-05-03T03:09:37.123456Z"
        );
        assert_eq!(
            format_time(base + 123_456_789),
            "2026-05-03T03:09:37.123456789Z"
        );
        assert_eq!(
            parse_time("2026-05-03T03:09:37.123456Z"),
            Some(base + 123_456_000)
        );
        assert_eq!(parse_time("2026-05-03T05:09:37+02:00"), Some(base));
    }
}
