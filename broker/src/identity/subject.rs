//! Certificate subjects as distinguished names: read from a certificate's DER with a small walk
//! (no X.509 crate), parsed from the RFC 4514 strings of `[[cert_callers]]`, and compared.
//!
//! The string form is RFC 4514's: relative distinguished names (RDNs) most specific first,
//! separated by `,` (`CN=billing,O=Example`), the attributes of a multi-valued RDN joined by `+`,
//! special characters escaped with `\` (`\,` or `\2C`). That is the reverse of the order the
//! certificate stores them in, and what `openssl x509 -noout -subject -nameopt RFC2253` prints.
//!
//! Matching is exact on the whole name: the same RDNs in the same order, each with the same
//! attributes (in any order within one RDN). Attribute types are compared by OID, so `CN`,
//! `cn` and `2.5.4.3` are one type; values are compared exactly, case-sensitively, after
//! unescaping. Whitespace around types and after separators is ignored in the configured
//! string; spaces inside values count.

use std::fmt;

/// Short names of the attribute types RFC 4514 lists, plus `serialNumber` and `emailAddress`
/// (which OpenSSL prints by name), with their OIDs.
const NAMES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
];

/// A distinguished name: RDNs in RFC 4514 order (most specific first).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DistinguishedName(Vec<Rdn>);

/// One relative distinguished name: its attributes, sorted so that order within it is moot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Rdn(Vec<Attribute>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Attribute {
    /// Dotted-decimal OID.
    oid: String,
    value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Value {
    /// A directory string (UTF8String, PrintableString, IA5String, BMPString, ...), decoded.
    Text(String),
    /// Anything else: the DER encoding (tag, length, content), written `#hex`.
    Der(Vec<u8>),
}

/// Why a name could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SubjectError(String);

fn error(message: impl Into<String>) -> SubjectError {
    SubjectError(message.into())
}

impl DistinguishedName {
    /// Parses an RFC 4514 string such as `CN=billing,O=Example`.
    ///
    /// # Errors
    ///
    /// When the string is empty, an attribute lacks `=`, a type is neither a known short name
    /// nor a dotted OID, an escape is malformed, or a `#hex` value is not one DER element.
    pub fn parse(text: &str) -> Result<Self, SubjectError> {
        if text.trim().is_empty() {
            return Err(error("the subject is empty"));
        }
        let mut rdns = Vec::new();
        let mut attributes = Vec::new();
        let mut rest = text;
        loop {
            let (attribute, separator, after) = parse_attribute(rest)?;
            attributes.push(attribute);
            rest = after;
            match separator {
                Some('+') => continue,
                Some(_) => rdns.push(Rdn::new(std::mem::take(&mut attributes))),
                None => {
                    rdns.push(Rdn::new(attributes));
                    return Ok(Self(rdns));
                }
            }
        }
    }

    /// Reads the subject of a DER-encoded X.509 certificate.
    ///
    /// # Errors
    ///
    /// When the DER is not a certificate this walk understands.
    pub fn from_certificate(der: &[u8]) -> Result<Self, SubjectError> {
        let bad = || error("not a DER X.509 certificate");
        let (certificate, _) = expect(der, TAG_SEQUENCE).ok_or_else(bad)?;
        let (mut tbs, _) = expect(certificate, TAG_SEQUENCE).ok_or_else(bad)?;
        // TBSCertificate: [0] version OPTIONAL, serialNumber, signature, issuer, validity,
        // subject, ...
        if tbs.first() == Some(&TAG_VERSION) {
            tbs = tlv(tbs).ok_or_else(bad)?.rest;
        }
        for tag in [TAG_INTEGER, TAG_SEQUENCE, TAG_SEQUENCE, TAG_SEQUENCE] {
            tbs = expect(tbs, tag).ok_or_else(bad)?.1;
        }
        let (subject, _) = expect(tbs, TAG_SEQUENCE).ok_or_else(bad)?;
        Self::from_der_name(subject)
    }

    /// Reads the content of a DER `Name` (the RDN sequence).
    fn from_der_name(mut name: &[u8]) -> Result<Self, SubjectError> {
        let bad = || error("malformed distinguished name in the certificate");
        let mut rdns = Vec::new();
        while !name.is_empty() {
            let (mut set, rest) = expect(name, TAG_SET).ok_or_else(bad)?;
            name = rest;
            let mut attributes = Vec::new();
            while !set.is_empty() {
                let (pair, rest) = expect(set, TAG_SEQUENCE).ok_or_else(bad)?;
                set = rest;
                let (oid, value) = expect(pair, TAG_OID).ok_or_else(bad)?;
                let value = tlv(value).filter(|v| v.rest.is_empty()).ok_or_else(bad)?;
                attributes.push(Attribute {
                    oid: oid_to_string(oid).ok_or_else(bad)?,
                    value: Value::from_der(&value).ok_or_else(bad)?,
                });
            }
            if attributes.is_empty() {
                return Err(bad());
            }
            rdns.push(Rdn::new(attributes));
        }
        // DER holds the least specific RDN first; RFC 4514 writes it last.
        rdns.reverse();
        Ok(Self(rdns))
    }
}

impl Rdn {
    fn new(mut attributes: Vec<Attribute>) -> Self {
        attributes.sort();
        Self(attributes)
    }
}

/// Parses `type=value` at the start of `text`; returns it, the separator that ended it (`,`,
/// `+` or none at the end) and what follows.
fn parse_attribute(text: &str) -> Result<(Attribute, Option<char>, &str), SubjectError> {
    let (kind, value) = text
        .split_once('=')
        .ok_or_else(|| error(format!("{:?} lacks `=`", text.trim())))?;
    let kind = kind.trim();
    if kind.contains([',', '+']) {
        return Err(error(format!("{kind:?} lacks `=`")));
    }
    let oid = type_oid(kind)?;
    let (value, separator, rest) = if value.trim_start().starts_with('#') {
        let value = value.trim_start();
        let end = value.find([',', '+']).unwrap_or(value.len());
        let hex_text = value[1..end].trim();
        let der =
            hex::decode(hex_text).map_err(|_| error(format!("{kind}: #{hex_text} is not hex")))?;
        let element = tlv(&der)
            .filter(|e| e.rest.is_empty())
            .ok_or_else(|| error(format!("{kind}: #{hex_text} is not one DER element")))?;
        let parsed = Value::from_der(&element)
            .ok_or_else(|| error(format!("{kind}: #{hex_text} is not a valid string")))?;
        (parsed, value[end..].chars().next(), value.get(end + 1..))
    } else {
        let (text, separator, rest) =
            unescape_value(value).map_err(|message| error(format!("{kind}: {message}")))?;
        (Value::Text(text), separator, rest)
    };
    let rest = rest.unwrap_or("");
    if separator.is_some() && rest.trim().is_empty() {
        return Err(error("the subject ends with a separator"));
    }
    Ok((Attribute { oid, value }, separator, rest))
}

/// Reads an escaped value up to an unescaped `,` or `+` (or the end). Unescaped whitespace at
/// either end is dropped; `\ ` keeps a space.
fn unescape_value(text: &str) -> Result<(String, Option<char>, Option<&str>), String> {
    let mut bytes = Vec::new();
    // Length of `bytes` up to the last escaped or non-space byte: trailing spaces past it go.
    let mut keep = 0;
    let mut chars = text.char_indices();
    let mut separator = None;
    let mut rest = None;
    while let Some((at, c)) = chars.next() {
        match c {
            ',' | '+' => {
                separator = Some(c);
                rest = text.get(at + 1..);
                break;
            }
            '\\' => {
                let (_, next) = chars.next().ok_or("a trailing `\\` escapes nothing")?;
                if next.is_ascii_hexdigit() {
                    let (_, low) = chars
                        .next()
                        .filter(|(_, low)| low.is_ascii_hexdigit())
                        .ok_or("`\\` must be followed by a special character or two hex digits")?;
                    let pair: String = [next, low].iter().collect();
                    bytes.push(u8::from_str_radix(&pair, 16).map_err(|e| e.to_string())?);
                } else {
                    let mut buffer = [0; 4];
                    bytes.extend_from_slice(next.encode_utf8(&mut buffer).as_bytes());
                }
                keep = bytes.len();
            }
            c if c.is_whitespace() && bytes.is_empty() => {}
            c => {
                let mut buffer = [0; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                if !c.is_whitespace() {
                    keep = bytes.len();
                }
            }
        }
    }
    bytes.truncate(keep);
    let text = String::from_utf8(bytes).map_err(|_| "escapes do not form UTF-8".to_owned())?;
    Ok((text, separator, rest))
}

fn type_oid(kind: &str) -> Result<String, SubjectError> {
    if let Some((_, oid)) = NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(kind))
    {
        return Ok((*oid).to_owned());
    }
    let dotted = kind.split('.').collect::<Vec<_>>();
    if dotted.len() >= 2
        && dotted
            .iter()
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
    {
        return Ok(kind.to_owned());
    }
    Err(error(format!(
        "unknown attribute type {kind:?}: use CN, O, OU, C, L, ST, STREET, DC, UID, \
         serialNumber, emailAddress or a dotted OID"
    )))
}

fn type_name(oid: &str) -> &str {
    NAMES
        .iter()
        .find(|(_, known)| *known == oid)
        .map_or(oid, |(name, _)| match *name {
            "SERIALNUMBER" => "serialNumber",
            "EMAILADDRESS" => "emailAddress",
            name => name,
        })
}

impl Value {
    fn from_der(element: &Tlv<'_>) -> Option<Self> {
        let content = element.content;
        let text = match element.tag {
            TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING | TAG_NUMERIC_STRING
            | TAG_VISIBLE_STRING => String::from_utf8(content.to_vec()).ok()?,
            // TeletexString: in practice Latin-1.
            TAG_TELETEX_STRING => content.iter().map(|&b| char::from(b)).collect(),
            TAG_BMP_STRING => {
                if !content.len().is_multiple_of(2) {
                    return None;
                }
                let units = content
                    .chunks_exact(2)
                    .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
                char::decode_utf16(units)
                    .collect::<Result<String, _>>()
                    .ok()?
            }
            TAG_UNIVERSAL_STRING => {
                if !content.len().is_multiple_of(4) {
                    return None;
                }
                content
                    .chunks_exact(4)
                    .map(|quad| {
                        char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]]))
                    })
                    .collect::<Option<String>>()?
            }
            _ => return Some(Self::Der(element.whole.to_vec())),
        };
        Some(Self::Text(text))
    }
}

impl fmt::Display for DistinguishedName {
    /// Writes the RFC 4514 string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rdn) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            for (j, attribute) in rdn.0.iter().enumerate() {
                if j > 0 {
                    f.write_str("+")?;
                }
                write!(f, "{}=", type_name(&attribute.oid))?;
                match &attribute.value {
                    Value::Der(der) => write!(f, "#{}", hex::encode(der))?,
                    Value::Text(text) => write_escaped(f, text)?,
                }
            }
        }
        Ok(())
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => write!(f, "\\{c}")?,
            '#' if i == 0 => f.write_str("\\#")?,
            ' ' if i == 0 || i == last => f.write_str("\\ ")?,
            // The parser drops bare whitespace at either end, so any other whitespace there
            // (a tab, a no-break space) is written as hex pairs.
            c if c.is_whitespace() && (i == 0 || i == last) => {
                let mut buffer = [0; 4];
                for byte in c.encode_utf8(&mut buffer).bytes() {
                    write!(f, "\\{byte:02X}")?;
                }
            }
            '\0' => f.write_str("\\00")?,
            c => write!(f, "{c}")?,
        }
    }
    Ok(())
}

const TAG_INTEGER: u8 = 0x02;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_NUMERIC_STRING: u8 = 0x12;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_TELETEX_STRING: u8 = 0x14;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_VISIBLE_STRING: u8 = 0x1a;
const TAG_UNIVERSAL_STRING: u8 = 0x1c;
const TAG_BMP_STRING: u8 = 0x1e;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
/// `[0] EXPLICIT Version`.
const TAG_VERSION: u8 = 0xa0;

/// One DER element.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    /// Tag, length and content.
    whole: &'a [u8],
    rest: &'a [u8],
}

/// Splits the first DER element off `input` (single-byte tags, definite lengths up to 4 bytes).
fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut after_length) = after_tag.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || after_length.len() < count {
            return None;
        }
        let (digits, after) = after_length.split_at(count);
        after_length = after;
        digits
            .iter()
            .fold(0usize, |length, &digit| (length << 8) | usize::from(digit))
    };
    if after_length.len() < length {
        return None;
    }
    let header = input.len() - after_length.len();
    Some(Tlv {
        tag,
        content: &after_length[..length],
        whole: &input[..header + length],
        rest: &after_length[length..],
    })
}

/// Splits off the first element if it has `tag`: its content and what follows.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    tlv(input)
        .filter(|element| element.tag == tag)
        .map(|element| (element.content, element.rest))
}

/// Dotted-decimal form of an OID's DER content.
fn oid_to_string(content: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &byte) in content.iter().enumerate() {
        if value > u64::MAX >> 7 {
            return None;
        }
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i + 1 == content.len() {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER-encodes one element (lengths up to 65535).
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    fn attribute(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(TAG_SEQUENCE, &[der(TAG_OID, oid), der(tag, value)].concat())
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];

    /// A certificate shell around `subject` (an encoded Name): enough for the walk.
    fn certificate(subject: &[u8], with_version: bool) -> Vec<u8> {
        let algorithm = der(
            TAG_SEQUENCE,
            &der(TAG_OID, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
        );
        let issuer = der(
            TAG_SEQUENCE,
            &der(TAG_SET, &attribute(CN, TAG_UTF8_STRING, b"Some CA")),
        );
        let validity = der(
            TAG_SEQUENCE,
            &[der(0x17, b"250101000000Z"), der(0x17, b"350101000000Z")].concat(),
        );
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(der(TAG_VERSION, &der(TAG_INTEGER, &[2])));
        }
        tbs.extend(der(TAG_INTEGER, &[0x01, 0x23, 0x45]));
        tbs.extend(&algorithm);
        tbs.extend(issuer);
        tbs.extend(validity);
        tbs.extend_from_slice(subject);
        tbs.extend(der(TAG_SEQUENCE, &[0u8; 200])); // a (fake) public key, long form length
        der(
            TAG_SEQUENCE,
            &[der(TAG_SEQUENCE, &tbs), algorithm, der(0x03, &[0, 1, 2])].concat(),
        )
    }

    #[test]
    fn the_walk_reads_the_subject_most_specific_first() {
        let name = der(
            TAG_SEQUENCE,
            &[
                der(TAG_SET, &attribute(O, TAG_PRINTABLE_STRING, b"Example")),
                der(TAG_SET, &attribute(CN, TAG_UTF8_STRING, b"billing")),
            ]
            .concat(),
        );
        for with_version in [true, false] {
            let subject =
                DistinguishedName::from_certificate(&certificate(&name, with_version)).unwrap();
            assert_eq!(subject.to_string(), "CN=billing,O=Example");
            assert_eq!(
                subject,
                DistinguishedName::parse("CN=billing,O=Example").unwrap()
            );
            assert_ne!(
                subject,
                DistinguishedName::parse("O=Example,CN=billing").unwrap()
            );
            assert_ne!(subject, DistinguishedName::parse("CN=billing").unwrap());
            assert_ne!(
                subject,
                DistinguishedName::parse("CN=Billing,O=Example").unwrap()
            );
        }
    }

    #[test]
    fn a_certificate_without_a_subject_matches_no_configured_name() {
        // Found by the `subject` fuzz target: an empty subject (allowed in X.509 when the
        // names are in subjectAltName) reads as the empty name, the one name without a string
        // form. `parse` refuses the empty string, so no `[[cert_callers]]` entry can equal it.
        let subject =
            DistinguishedName::from_certificate(&certificate(&der(TAG_SEQUENCE, &[]), true))
                .unwrap();
        assert_eq!(subject.to_string(), "");
        assert!(DistinguishedName::parse(&subject.to_string()).is_err());
    }

    #[test]
    fn multi_valued_rdns_bmp_strings_and_unknown_types() {
        let name = der(
            TAG_SEQUENCE,
            &[
                der(
                    TAG_SET,
                    &[
                        attribute(OU, TAG_UTF8_STRING, b"ops"),
                        attribute(CN, TAG_BMP_STRING, &[0, b'j', 0, 0xe9, 0, b'r']),
                    ]
                    .concat(),
                ),
                der(
                    TAG_SET,
                    &attribute(
                        &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x01],
                        TAG_INTEGER,
                        &[7],
                    ),
                ),
            ]
            .concat(),
        );
        let subject = DistinguishedName::from_certificate(&certificate(&name, true)).unwrap();
        // Within an RDN, attributes are kept sorted by OID (2.5.4.11 before 2.5.4.3).
        assert_eq!(
            subject.to_string(),
            "1.3.6.1.4.1.311.1=#020107,OU=ops+CN=jér"
        );
        for same in [
            "1.3.6.1.4.1.311.1=#020107,CN=jér+OU=ops",
            "1.3.6.1.4.1.311.1 = #020107 , ou=ops+cn=jér",
            "1.3.6.1.4.1.311.1=#020107,2.5.4.11=ops+CN=j\\C3\\A9r",
            "1.3.6.1.4.1.311.1=#020107,CN=#0c046ac3a972+OU=ops",
        ] {
            assert_eq!(DistinguishedName::parse(same).unwrap(), subject, "{same}");
        }
    }

    #[test]
    fn escapes_round_trip() {
        let name = DistinguishedName::parse(r"CN=a\,b\+c \\d\ ,O=\#1,OU= spaced out ").unwrap();
        assert_eq!(name.to_string(), r"CN=a\,b\+c \\d\ ,O=\#1,OU=spaced out");
        assert_eq!(DistinguishedName::parse(&name.to_string()).unwrap(), name);
        let name = DistinguishedName::parse("CN=billing, O=Example Corp").unwrap();
        assert_eq!(name.to_string(), "CN=billing,O=Example Corp");
    }

    #[test]
    fn whitespace_at_either_end_of_a_value_round_trips() {
        // A tab (or any whitespace but a space) at an end of a value used to be written bare,
        // which the parser drops there: the name read back without it.
        for text in [
            r"CN=\09x",
            r"CN=x\09",
            r"CN=\C2\A0x\E2\80\83",
            r"CN=\ \09,O=\0A",
        ] {
            let name = DistinguishedName::parse(text).unwrap();
            let again = DistinguishedName::parse(&name.to_string()).unwrap();
            assert_eq!(again, name, "{text:?} displays as {name}");
        }
    }

    #[test]
    fn bad_strings_are_named() {
        for (bad, says) in [
            ("", "empty"),
            ("billing", "lacks `=`"),
            ("CN=a,", "ends with a separator"),
            ("CN=a,billing", "lacks `=`"),
            ("XX=a", "unknown attribute type"),
            ("CN=a\\", "escapes nothing"),
            ("CN=a\\4", "two hex digits"),
            ("CN=#zz", "not hex"),
            ("CN=#0c05ab", "one DER element"),
        ] {
            let err = DistinguishedName::parse(bad).unwrap_err();
            assert!(err.to_string().contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x04\x02ab",
            &[0x30, 0x03, 0x30, 0x01, 0x02],
        ] {
            assert!(DistinguishedName::from_certificate(bad).is_err());
        }
        let truncated_name = der(
            TAG_SEQUENCE,
            &der(TAG_SET, &der(TAG_SEQUENCE, &der(TAG_OID, CN))),
        );
        assert!(DistinguishedName::from_certificate(&certificate(&truncated_name, true)).is_err());
    }

    #[test]
    fn oids_decode() {
        assert_eq!(oid_to_string(&[0x55, 0x04, 0x03]).unwrap(), "2.5.4.3");
        assert_eq!(
            oid_to_string(&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19]).unwrap(),
            "0.9.2342.19200300.100.1.25"
        );
        assert!(oid_to_string(&[0x55, 0x84]).is_none());
    }
}
