//! Domain values: ids, emails, token kinds, times and the facts a store keeps about tokens.
//!
//! Every value a client sends is parsed into one of these newtypes at the edge, so the code below
//! the gRPC adapter never sees an unchecked string.

pub mod clock;
pub mod deadline;
pub mod replay;
pub mod secret;

use std::{collections::BTreeMap, fmt, time::Duration};

use rand::RngCore;
use secrecy::SecretString;

/// A value a client sent that is not acceptable; the message says why, for the client, and
/// never repeats a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidArgument(pub String);

impl InvalidArgument {
    /// Returns an error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A setting that cannot be used; the message names the setting and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Longest secret, id or other opaque string the broker accepts from a client.
pub const MAX_SECRET_LEN: usize = 512;
/// Longest app client id, pool id, Cognito `sub` or group name.
pub const MAX_NAME_LEN: usize = 128;
/// Most groups an asserted subject may carry.
pub const MAX_GROUPS: usize = 32;
/// Most metadata entries on a token.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 256;

/// Microseconds since the Unix epoch: the resolution of every stored time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMicros(pub i64);

impl UnixMicros {
    /// Returns this time plus `d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// Returns this time minus `d`, saturating.
    pub fn minus(self, d: Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(micros))
    }
}

/// Defines a string newtype for an opaque id with a constructor that validates it.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Returns a new unique id, ordered by creation time.
            pub fn random() -> Self {
                Self(format!(concat!($prefix, "{}"), ordered_hex()))
            }

            /// Parses an id sent by a client: 1 to 128 characters of `[A-Za-z0-9_-]`.
            ///
            /// # Errors
            ///
            /// `InvalidArgument` naming the field when the id is empty or malformed.
            pub fn parse(value: &str) -> Result<Self, InvalidArgument> {
                if is_opaque_id(value) {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(InvalidArgument::new(concat!(
                        $what,
                        " must be 1 to 128 characters of letters, digits, '_' or '-'"
                    )))
                }
            }

            /// Wraps an id read back from a store, which checked it when it was written.
            pub fn from_stored(value: String) -> Self {
                Self(value)
            }

            /// Returns the id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The id of an account.
    AccountId,
    "acc_",
    "account_id"
);
id_type!(
    /// The public id of a token: safe to log and show.
    TokenId,
    "tok_",
    "token_id"
);
id_type!(
    /// The id of a token family: one sign-in session and every rotation of it.
    FamilyId,
    "fam_",
    "family_id"
);

fn is_opaque_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Returns 32 lowercase hex digits: 48 bits of milliseconds since the epoch, then 80 random
/// bits. Ids made this way sort by creation time, so new rows append to the end of every index
/// keyed by id instead of landing on a random page (the embedded store's inserts touch far
/// fewer pages). Ids are public handles; no secret depends on their randomness.
pub fn ordered_hex() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    format!("{:012x}{}", millis & 0xffff_ffff_ffff, hex::encode(random))
}

/// Returns 32 lowercase hex digits of fresh randomness (128 bits).
pub fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Longest email address, in bytes of its normalised form.
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest local part of an email address, in bytes of its normalised form.
pub const MAX_EMAIL_LOCAL_LEN: usize = 64;

/// A normalised email address: the key accounts are stored by, so two addresses with the same
/// normalised form are one account (docs/design.md "Token model").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// Parses and normalises an email sent by a client.
    ///
    /// The normalisation, in order: trim surrounding whitespace; refuse any character of Unicode
    /// category Cf (zero-width characters, the BOM, the soft hyphen, bidi controls and the
    /// rest), which render as nothing and would let two addresses that look the same be two
    /// accounts; Unicode NFC of the whole address (which also maps singletons such as U+212A
    /// KELVIN SIGN to `K`); lowercase the local part (the broker treats local parts
    /// case-insensitively, as it always has) and NFC it again, since lowercasing may leave a
    /// string that is not NFC; map the domain with IDNA (UTS #46 `domain_to_ascii`), so a
    /// Unicode domain and its punycode are one account. The length limits apply to the result.
    ///
    /// IDNA is the non-strict `domain_to_ascii`: it maps exactly as the strict variant does,
    /// and differs only in refusing less (no STD3 ASCII rules, no DNS length checks). The check
    /// is deliberately shallow (one `@`, non-empty parts, sane lengths, no whitespace or control
    /// characters): the user pool already verified the address, and a stricter parser would
    /// reject addresses Cognito accepts (an `_` or an address literal in the domain).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` saying what is wrong; the message does not repeat the address.
    pub fn parse(value: &str) -> Result<Self, InvalidArgument> {
        let email = value.trim();
        if email.is_empty() {
            return Err(InvalidArgument::new("email is required"));
        }
        if let Some(c) = email.chars().find(|&c| is_format_char(c)) {
            return Err(InvalidArgument::new(if is_bidi_control(c) {
                "email contains a bidirectional text control character"
            } else {
                "email contains an invisible formatting character (such as a zero-width space)"
            }));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidArgument::new(
                "email contains whitespace or control characters",
            ));
        }
        let nfc = icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
        let email = nfc.normalize(email);
        let Some((local, domain)) = email.split_once('@') else {
            return Err(InvalidArgument::new("email has no '@'"));
        };
        if local.is_empty() || domain.is_empty() || domain.contains('@') {
            return Err(shape_error());
        }
        let local = nfc.normalize(&local.to_lowercase()).into_owned();
        let domain = idna::domain_to_ascii(domain).map_err(|_| {
            InvalidArgument::new("email domain is not a valid internationalised domain name")
        })?;
        if domain.is_empty() {
            return Err(shape_error());
        }
        if local.len() > MAX_EMAIL_LOCAL_LEN {
            return Err(shape_error());
        }
        let email = format!("{local}@{domain}");
        if email.len() > MAX_EMAIL_LEN {
            return Err(InvalidArgument::new("email is longer than 254 bytes"));
        }
        Ok(Self(email))
    }

    /// Wraps an email read back from a store, which stored it normalised.
    pub fn from_stored(value: String) -> Self {
        Self(value)
    }

    /// Returns the normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn shape_error() -> InvalidArgument {
    InvalidArgument::new("email must be one local part of 1 to 64 bytes, '@', and a domain")
}

/// Whether `c` is of Unicode general category Cf (format): characters with no glyph of their
/// own, from the zero-width space and the BOM to bidi controls and tag characters.
fn is_format_char(c: char) -> bool {
    use icu_properties::{CodePointMapData, props::GeneralCategory};
    CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
}

/// Whether `c` is one of the bidi controls (marks, embeddings, overrides and isolates), which
/// can make an address display in an order other than the one it is stored in.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{061C}')
}

/// An optional short name sent by a client (app client id, pool id, Cognito `sub`, group).
///
/// # Errors
///
/// `InvalidArgument` naming `field` when the value is over 128 bytes or has control characters.
pub fn parse_name(field: &str, value: &str) -> Result<Option<String>, InvalidArgument> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(format!(
            "{field} must be at most {MAX_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(Some(value.to_owned()))
}

/// Labels stored with a token, shown by ListTokens.
pub type Metadata = BTreeMap<String, String>;

/// Checks metadata sent by a client against the documented limits.
///
/// # Errors
///
/// `InvalidArgument` saying which limit was broken.
pub fn validate_metadata(metadata: &Metadata) -> Result<(), InvalidArgument> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(InvalidArgument::new(format!(
            "metadata has more than {MAX_METADATA_ENTRIES} entries"
        )));
    }
    for (key, value) in metadata {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_METADATA_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !key_ok {
            return Err(InvalidArgument::new(format!(
                "metadata keys must be 1 to {MAX_METADATA_KEY_LEN} characters of letters, digits, '_', '.' or '-'"
            )));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(InvalidArgument::new(format!(
                "metadata values must be at most {MAX_METADATA_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(())
}

/// Access or refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Short-lived; grants access to data.
    Access,
    /// Longer-lived; can only be exchanged for a new pair.
    Refresh,
}

impl TokenKind {
    /// Returns the kind's stable name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::Refresh => "refresh",
        }
    }

    /// Parses a stored kind name.
    pub fn from_stored(value: &str) -> Option<Self> {
        match value {
            "access" => Some(Self::Access),
            "refresh" => Some(Self::Refresh),
            _ => None,
        }
    }
}

/// The state of a stored token at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Usable now.
    Active,
    /// Its lifetime is over.
    Expired,
    /// Revoked by id, family, cascade, reuse detection or the account watermark.
    Revoked,
    /// A refresh token consumed by rotation.
    Rotated,
}

/// A token just minted, with the only copy of its secret the broker will ever hand out.
pub struct MintedToken {
    /// The public id.
    pub id: TokenId,
    /// The secret.
    pub secret: SecretString,
    /// When it stops being active.
    pub expires_at: UnixMicros,
}

impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A refresh token and the access token minted with it.
#[derive(Debug)]
pub struct MintedPair {
    /// The account both belong to.
    pub account_id: AccountId,
    /// The session both belong to.
    pub family_id: FamilyId,
    /// The refresh token.
    pub refresh: MintedToken,
    /// The access token; its parent is `refresh`.
    pub access: MintedToken,
}

/// An IssueTokens idempotency key, as a shared store keeps its replay.
#[derive(Debug, Clone)]
pub struct ReplayClaim {
    /// The digest of (caller, key, email, app client): the replay's row.
    pub row: secret::SecretDigest,
    /// How long the row replays its pair.
    pub window: std::time::Duration,
    /// The key the pair is sealed with.
    pub key: std::sync::Arc<replay::ReplayKey>,
}

/// What a store needs to start a session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The account's normalised email; the account is created if none has it.
    pub email: Email,
    /// The account, when a cache already knows it; the store then skips the lookup.
    pub known_account: Option<AccountId>,
    /// The Cognito `sub`, recorded on a new account.
    pub cognito_sub: Option<String>,
    /// The app client the tokens are for.
    pub client_id: Option<String>,
    /// Lifetime of the access token.
    pub access_ttl: Duration,
    /// Lifetime of the refresh token.
    pub refresh_ttl: Duration,
    /// Lifetime of the session the pair starts: no rotation extends a token of its family past
    /// it. At least `refresh_ttl`.
    pub session_ttl: Duration,
    /// Labels stored with both tokens.
    pub metadata: Metadata,
}

/// Which app client a presented token must belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCheck {
    /// Exactly this one: a token issued for a client needs its id, and a token issued for none
    /// matches only `None`.
    Exactly(Option<String>),
    /// Any (`tokens.require_client_id = false` and no client id given).
    Any,
}

impl ClientCheck {
    /// Whether a token issued for `client` passes.
    pub fn allows(&self, client: Option<&str>) -> bool {
        match self {
            Self::Exactly(expected) => expected.as_deref() == client,
            Self::Any => true,
        }
    }

    /// The client id that was given, if any.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Self::Exactly(expected) => expected.as_deref(),
            Self::Any => None,
        }
    }
}

/// What a store needs to rotate a refresh token.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The app client the refresh token must belong to.
    pub client: ClientCheck,
    /// Lifetime of the new access token, cut short at the session's end.
    pub access_ttl: Duration,
    /// Lifetime of the new refresh token, cut short at the session's end.
    pub refresh_ttl: Duration,
    /// The session lifetime of a family stored before sessions had an end: its end is then
    /// counted from this rotation.
    pub session_ttl: Duration,
    /// How long after a rotation the consumed token may be presented again.
    pub grace: Duration,
    /// Seals the successor pair for a shared store, which then answers a repeated presentation
    /// within `grace` with that same pair ([`RefreshOutcome::Replayed`]) instead of superseding
    /// it, whichever broker sharing the store the presentation reaches. `None`: the store
    /// keeps no sealed successors (stores that are not shared ignore it anyway).
    pub replay: Option<std::sync::Arc<replay::ReplayKey>>,
}

/// The outcome of presenting a refresh secret.
#[derive(Debug)]
pub enum RefreshOutcome {
    /// A new pair in the same family.
    Rotated(MintedPair),
    /// A consumed refresh token presented again within the grace window, on a shared store
    /// with [`Rotation::replay`]: the successor that the first presentation minted, opened from
    /// its sealed copy, still the family's current refresh token. Nothing changed.
    Replayed {
        /// The successor pair, as the first presentation got it.
        pair: MintedPair,
        /// When the presented token was rotated (the grace window's start).
        rotated_at: UnixMicros,
    },
    /// Unknown, malformed, expired, revoked, or not a refresh token. Nothing changed.
    Inactive,
    /// An active refresh token of another app client. Nothing changed.
    WrongClient,
    /// A consumed refresh token presented outside the grace rule: its family was revoked.
    ReuseDetected {
        /// The revoked family.
        family_id: FamilyId,
        /// How many tokens the revocation turned inactive.
        revoked: u64,
    },
}

/// The facts about an active token, as introspection reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The token's id.
    pub id: TokenId,
    /// Access or refresh.
    pub kind: TokenKind,
    /// The owner.
    pub account_id: AccountId,
    /// The owner's email.
    pub email: Email,
    /// The owner's Cognito `sub`, if known.
    pub cognito_sub: Option<String>,
    /// The session.
    pub family_id: FamilyId,
    /// The app client it was issued for.
    pub client_id: Option<String>,
    /// When it was minted.
    pub issued_at: UnixMicros,
    /// When it expires.
    pub expires_at: UnixMicros,
}

/// What to revoke, other than a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One token; a refresh token takes its access tokens with it.
    Token(TokenId),
    /// Every token of a session.
    Family(FamilyId),
    /// Every token issued to the account until now (a not-before watermark).
    Account(AccountId),
}

/// The outcome of revoking by secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretRevocation {
    /// The secret was an active token; this many tokens were turned inactive (with cascade).
    Revoked(u64),
    /// Unknown, malformed or already inactive: nothing to do.
    NotActive,
    /// An active token of another app client: left alone.
    WrongClient,
}

/// A stored token without its secret, as ListTokens shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The id.
    pub id: TokenId,
    /// Access or refresh.
    pub kind: TokenKind,
    /// The session.
    pub family_id: FamilyId,
    /// For access tokens, the refresh token it was minted with.
    pub parent_id: Option<TokenId>,
    /// The state when listed.
    pub state: TokenState,
    /// When it was minted.
    pub issued_at: UnixMicros,
    /// When its lifetime ends.
    pub expires_at: UnixMicros,
    /// When it was revoked or rotated.
    pub revoked_at: Option<UnixMicros>,
    /// For a rotated refresh token, its successor.
    pub replaced_by: Option<TokenId>,
    /// The app client it was issued for.
    pub client_id: Option<String>,
    /// Labels from issue time.
    pub metadata: Metadata,
}

/// Where a page of ListTokens starts: just after this (issued_at, id), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    /// The last listed token's issue time.
    pub issued_at: UnixMicros,
    /// The last listed token's id.
    pub id: TokenId,
}

/// A ListTokens query.
#[derive(Debug, Clone)]
pub struct PageRequest {
    /// Tokens per page.
    pub size: u32,
    /// Start after this token; `None` for the first page.
    pub after: Option<PageCursor>,
    /// Whether to include expired, revoked and rotated tokens.
    pub include_inactive: bool,
}

/// One page of an account's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPage {
    /// The tokens, newest first.
    pub tokens: Vec<TokenRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

impl TokenPage {
    /// Builds a page from up to `size + 1` tokens, newest first: stores fetch one more than
    /// the page holds, and its presence means there is a next page, starting after the last
    /// token kept.
    pub fn from_overfetch(mut tokens: Vec<TokenRecord>, size: u32) -> Self {
        let size = size as usize;
        let next = if tokens.len() > size {
            tokens.truncate(size);
            tokens.last().map(|t| PageCursor {
                issued_at: t.issued_at,
                id: t.id.clone(),
            })
        } else {
            None
        };
        Self { tokens, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_trimmed_and_lowercased() {
        let email = Email::parse("  Alice@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "alice@example.com");
    }

    #[test]
    fn malformed_emails_are_rejected() {
        for bad in [
            "",
            "   ",
            "alice",
            "@example.com",
            "alice@",
            "a@b@c",
            "al ice@x.y",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Email::parse(&format!("{}@x.y", "a".repeat(65))).is_err());
        assert!(Email::parse(&format!("a@{}", "x".repeat(260))).is_err());
    }

    #[test]
    fn ascii_emails_normalise_as_before() {
        for (raw, normalised) in [
            ("alice@example.com", "alice@example.com"),
            (
                "  Bob.Smith+tag@Mail.Example.ORG\t",
                "bob.smith+tag@mail.example.org",
            ),
            ("under_score@my_host.example", "under_score@my_host.example"),
            ("x@[192.0.2.1]", "x@[192.0.2.1]"),
        ] {
            assert_eq!(Email::parse(raw).unwrap().as_str(), normalised, "{raw:?}");
        }
    }

    #[test]
    fn canonically_equivalent_emails_are_one_email() {
        let decomposed = Email::parse("Jose\u{301}@example.com").unwrap();
        let composed = Email::parse("jos\u{e9}@example.com").unwrap();
        assert_eq!(decomposed, composed);
        assert_eq!(composed.as_str(), "jos\u{e9}@example.com");
    }

    #[test]
    fn kelvin_sign_is_k_by_normalisation() {
        // NFC maps U+212A KELVIN SIGN to U+004B, which lowercasing then folds with `k`.
        let kelvin = Email::parse("\u{212A}ate@example.com").unwrap();
        assert_eq!(kelvin.as_str(), "kate@example.com");
        assert_eq!(kelvin, Email::parse("kate@example.com").unwrap());
        // In the domain, IDNA does the same.
        let domain = Email::parse("kate@\u{212A}.example").unwrap();
        assert_eq!(domain.as_str(), "kate@k.example");
    }

    #[test]
    fn unicode_and_punycode_domains_are_one_email() {
        let unicode = Email::parse("Alice@\u{dc}BER.example").unwrap();
        let punycode = Email::parse("alice@xn--ber-goa.example").unwrap();
        assert_eq!(unicode, punycode);
        assert_eq!(unicode.as_str(), "alice@xn--ber-goa.example");
        // Decomposed and fullwidth forms of the domain map to the same labels.
        let decomposed = Email::parse("alice@U\u{308}ber.example").unwrap();
        assert_eq!(decomposed, punycode);
        let fullwidth = Email::parse("alice@\u{fc}ber\u{ff0e}example").unwrap();
        assert_eq!(fullwidth, punycode);
    }

    #[test]
    fn invalid_domains_are_refused_without_echoing_them() {
        for bad in ["a@xn--a.example", "a@\u{301}x.example"] {
            let err = Email::parse(bad).unwrap_err();
            assert!(err.0.contains("domain"), "{bad:?}: {err}");
            assert!(!err.0.contains("example"), "{bad:?} echoed: {err}");
        }
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused() {
        let invisible = [
            '\u{200B}',  // zero-width space
            '\u{200C}',  // zero-width non-joiner
            '\u{200D}',  // zero-width joiner
            '\u{2060}',  // word joiner
            '\u{FEFF}',  // byte order mark
            '\u{00AD}',  // soft hyphen
            '\u{180E}',  // Mongolian vowel separator: Cf, not listed by name
            '\u{E0041}', // tag latin capital letter A: Cf
        ];
        let bidi = [
            '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}',
            '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
        ];
        for (chars, problem) in [(&invisible[..], "invisible"), (&bidi[..], "bidirectional")] {
            for &c in chars {
                for raw in [
                    format!("ali{c}ce@example.com"),
                    format!("alice@exa{c}mple.com"),
                    format!("{c}alice@example.com"),
                    format!("alice@example.com{c}"),
                ] {
                    let err = Email::parse(&raw).expect_err(&format!("{:04X} accepted", c as u32));
                    assert!(err.0.contains(problem), "{:04X}: {err}", c as u32);
                    assert!(!err.0.contains("alice"), "echoed the address: {err}");
                }
            }
        }
    }

    #[test]
    fn length_limits_apply_to_the_normalised_form() {
        let domain = "@example.com";
        // 64 bytes of local part is the limit, counted after normalisation: 32 decomposed
        // "é" are 96 bytes as sent and 64 once composed.
        assert!(Email::parse(&format!("{}{domain}", "a".repeat(64))).is_ok());
        assert!(Email::parse(&format!("{}{domain}", "a".repeat(65))).is_err());
        assert!(Email::parse(&format!("{}{domain}", "e\u{301}".repeat(32))).is_ok());
        assert!(Email::parse(&format!("{}{domain}", "e\u{301}".repeat(33))).is_err());
        // 254 bytes in all, the domain counted as punycode.
        let local = "a".repeat(64);
        let fits = format!("{local}@{}.example", "b".repeat(254 - 64 - 1 - 8));
        assert_eq!(fits.len(), 254);
        assert!(Email::parse(&fits).is_ok());
        assert!(Email::parse(&format!("{fits}x")).is_err());
        // A domain short as sent but over the limit once it is punycode.
        let unicode = format!("{local}@{}example", "\u{fc}.".repeat(60));
        assert!(unicode.len() <= 254);
        let err = Email::parse(&unicode).unwrap_err();
        assert!(err.0.contains("254"), "{err}");
    }

    #[test]
    fn ids_reject_odd_characters() {
        assert!(TokenId::parse("tok_0123abcd").is_ok());
        for bad in ["", "tok 1", "tok/1", "tök", &"a".repeat(129)] {
            assert!(TokenId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let mut m = Metadata::new();
        m.insert("device".into(), "phone".into());
        assert!(validate_metadata(&m).is_ok());
        m.insert("bad key".into(), "x".into());
        assert!(validate_metadata(&m).is_err());
        let mut m = Metadata::new();
        m.insert("k".into(), "v".repeat(257));
        assert!(validate_metadata(&m).is_err());
        let m: Metadata = (0..17).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_metadata(&m).is_err());
    }
}
