//! Fauna's wire format (`docs/design.md` "Fauna over HTTP"): tagged argument encoding, decoding of
//! tagged results into plain JSON, times, and the classification of responses by status and
//! error code.

use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{model::UnixMicros, store::metrics::FaunaClass};

/// Encodes an integer argument (`X-Format: tagged` wants every number tagged).
pub(super) fn int(value: u64) -> Value {
    json!({ "@long": value.to_string() })
}

/// Encodes a time argument.
pub(super) fn time(value: UnixMicros) -> Value {
    json!({ "@time": format_time(value) })
}

/// Encodes an optional string argument (`null` when absent).
pub(super) fn opt_str(value: Option<&str>) -> Value {
    value.map_or(Value::Null, |v| Value::String(v.to_owned()))
}

/// Encodes a string map as a tagged object (`@object` keeps keys starting with `@` literal).
pub(super) fn object<'a>(entries: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    let map: Map<String, Value> = entries
        .into_iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({ "@object": map })
}

/// Formats a time as RFC 3339 UTC with microseconds, as Fauna's `@time` expects.
pub(super) fn format_time(value: UnixMicros) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value.0) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "9999-12-31T23:59:59.999999Z".to_owned())
}

/// Parses an RFC 3339 time from a result.
pub(super) fn parse_time(value: &str) -> Option<UnixMicros> {
    let t = OffsetDateTime::parse(value, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000)
        .ok()
        .map(UnixMicros)
}

/// Turns a tagged result into plain JSON: `@int`/`@long`/`@double` become numbers, `@time`,
/// `@date` and `@mod` strings, `@doc`/`@ref`/`@object`/`@set` their contents.
pub(super) fn untag(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(untag).collect()),
        Value::Object(map) => {
            if map.len() == 1 {
                let (key, inner) = map.iter().next().expect("one entry");
                match key.as_str() {
                    "@int" | "@long" => {
                        if let Some(n) = inner.as_str().and_then(|s| s.parse::<i64>().ok()) {
                            return Value::from(n);
                        }
                    }
                    "@double" => {
                        if let Some(n) = inner.as_str().and_then(|s| s.parse::<f64>().ok()) {
                            return Value::from(n);
                        }
                    }
                    "@time" | "@date" | "@mod" => return inner.clone(),
                    // `@object` wraps an object whose keys are literal: `{"@object": {"@int":
                    // "1"}}` is an object with the key `@int`, not the number 1.
                    "@object" => {
                        if let Value::Object(fields) = inner {
                            return untag_fields(fields.clone());
                        }
                    }
                    "@doc" | "@ref" | "@set" => return untag(inner.clone()),
                    _ => {}
                }
            }
            untag_fields(map)
        }
        other => other,
    }
}

/// Untags the values of an object, keeping its keys as they are.
fn untag_fields(fields: Map<String, Value>) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k, untag(v))).collect())
}

/// How a response from Fauna is to be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Class {
    /// 200 with a body: the result (already untagged) and the transaction time.
    Ok {
        /// The `data` field, untagged.
        data: Value,
        /// The `txn_ts` field, if present.
        txn_ts: Option<i64>,
    },
    /// 401: the bearer is not a usable credential.
    Unauthorized,
    /// 409 `contended_transaction`: Fauna's own retries ran out.
    Contended,
    /// 429 `limit_exceeded`.
    Throttled,
    /// 440 or 503 `time_out`, 500 and other 5xx: Fauna could not answer now.
    Transient(String),
    /// A query error (400) with its code, such as `permission_denied` or `document_not_found`.
    QueryError(String),
    /// A response that is not Fauna's protocol: empty, not JSON, or missing `data`.
    Malformed(String),
    /// 403, 410, 413 and other statuses that no retry will fix.
    Refused(String),
}

impl Class {
    /// Returns the class as the metrics' `class` label.
    pub(super) fn label(&self) -> FaunaClass {
        match self {
            Self::Ok { .. } => FaunaClass::Ok,
            Self::Unauthorized => FaunaClass::Unauthorized,
            Self::QueryError(_) => FaunaClass::QueryError,
            Self::Malformed(_) => FaunaClass::Malformed,
            Self::Refused(_) => FaunaClass::Refused,
            Self::Contended => FaunaClass::Contended,
            Self::Throttled => FaunaClass::Throttled,
            Self::Transient(_) => FaunaClass::Transient,
        }
    }
}

/// Classifies a response by status first, then by body.
pub(super) fn classify(status: u16, body: &[u8]) -> Class {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/code"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    match status {
        200 => match parsed {
            Some(Value::Object(mut map)) if map.contains_key("data") => Class::Ok {
                txn_ts: map.get("txn_ts").and_then(Value::as_i64),
                data: untag(map.remove("data").expect("checked")),
            },
            Some(_) => Class::Malformed("a 200 answer without data".into()),
            None if body.is_empty() => Class::Malformed("an empty 200 answer".into()),
            None => Class::Malformed("a 200 answer that is not JSON".into()),
        },
        401 => Class::Unauthorized,
        409 => Class::Contended,
        429 => Class::Throttled,
        400 if !code.is_empty() => Class::QueryError(code),
        400 => Class::Malformed("a 400 answer without an error code".into()),
        440 | 500..=599 => Class::Transient(format!("status {status} {code}")),
        _ => Class::Refused(format!("status {status} {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_values_untag_into_plain_json() {
        let tagged = json!({
            "@doc": {
                "id": "412654321987654321",
                "coll": { "@mod": "Token" },
                "ttl": { "@time": "2026-01-01T00:00:00.123456Z" },
                "document": { "@ref": { "id": "1", "coll": { "@mod": "Account" } } },
                "data": { "n": { "@int": "3" }, "m": { "@object": { "@k": "v" } } }
            }
        });
        assert_eq!(
            untag(tagged),
            json!({
                "id": "412654321987654321",
                "coll": "Token",
                "ttl": "2026-01-01T00:00:00.123456Z",
                "document": { "id": "1", "coll": "Account" },
                "data": { "n": 3, "m": { "@k": "v" } }
            })
        );
    }

    #[test]
    fn an_object_wrapper_keeps_its_keys_literal() {
        // Its content used to be untagged as a whole, so a wrapped object whose one key was a
        // tag's name (`@int`, `@time`, `@doc`) came back as that tag's value.
        assert_eq!(
            untag(json!({ "@object": { "@int": "1" } })),
            json!({ "@int": "1" })
        );
        assert_eq!(
            untag(json!({ "@object": { "@time": { "@long": "2" }, "k": { "@int": "3" } } })),
            json!({ "@time": 2, "k": 3 })
        );
        assert_eq!(untag(json!({ "@object": "x" })), json!({ "@object": "x" }));
    }

    #[test]
    fn times_round_trip_with_microseconds() {
        let t = UnixMicros(1_767_225_600_123_456);
        assert_eq!(format_time(t), "2026-01-01T00:00:00.123456Z");
        assert_eq!(parse_time(&format_time(t)), Some(t));
        assert_eq!(
            parse_time("2026-01-01T00:00:00Z"),
            Some(UnixMicros(1_767_225_600_000_000))
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn responses_are_classified_by_status_then_body() {
        assert_eq!(
            classify(200, br#"{"data":{"@int":"1"},"txn_ts":7}"#),
            Class::Ok {
                data: json!(1),
                txn_ts: Some(7)
            }
        );
        assert!(matches!(classify(200, b""), Class::Malformed(_)));
        assert!(matches!(classify(200, b"<html>"), Class::Malformed(_)));
        assert!(matches!(classify(200, b"{}"), Class::Malformed(_)));
        assert_eq!(classify(401, b""), Class::Unauthorized);
        assert_eq!(classify(409, b""), Class::Contended);
        assert_eq!(classify(429, b""), Class::Throttled);
        assert!(matches!(classify(440, b""), Class::Transient(_)));
        assert!(matches!(classify(503, b""), Class::Transient(_)));
        assert_eq!(
            classify(
                400,
                br#"{"error":{"code":"permission_denied","message":"x"}}"#
            ),
            Class::QueryError("permission_denied".into())
        );
        assert!(matches!(classify(403, b""), Class::Refused(_)));
    }
}
