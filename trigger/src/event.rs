//! The Pre Token Generation event (V1, V2 and V3), parsed leniently, and the replies.
//!
//! These are our own types rather than `aws_lambda_events`'s, because that crate's fail or
//! mislead on real events (`docs/design.md` "Cognito › Event shapes and traps"): a V2 event
//! without `request.scopes`, the V3 `TokenGeneration_ClientCredentials` source, and a missing
//! `callerContext`, `request` or `response` are parse errors there, and its `Default` replies
//! (an empty `groupOverrideDetails`) remove every user's groups.
//! Here every field has a default, `null` reads as absent, unknown fields are ignored, the
//! trigger source is an open set and `version` may be a string or a number. The handler never
//! re-serialises the event: it answers with the event it received (unknown fields included) and
//! only replaces `response`.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Where Cognito's call comes from: the `triggerSource` field, an open set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TriggerSource {
    /// `TokenGeneration_HostedAuth`: a sign-in through the Hosted UI (managed login).
    HostedAuth,
    /// `TokenGeneration_Authentication`: a user authentication flow completed.
    Authentication,
    /// `TokenGeneration_NewPasswordChallenge`: an admin-created user set their password.
    NewPasswordChallenge,
    /// `TokenGeneration_AuthenticateDevice`: device authentication completed.
    AuthenticateDevice,
    /// `TokenGeneration_RefreshTokens`: a user refreshed their ID and access tokens.
    RefreshTokens,
    /// `TokenGeneration_ClientCredentials` (V3 only): a machine-to-machine grant, no user.
    ClientCredentials,
    /// No `triggerSource`, or an empty one.
    #[default]
    Missing,
    /// A value this trigger does not know yet.
    Unknown(String),
}

impl TriggerSource {
    /// Returns the wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::HostedAuth => "TokenGeneration_HostedAuth",
            Self::Authentication => "TokenGeneration_Authentication",
            Self::NewPasswordChallenge => "TokenGeneration_NewPasswordChallenge",
            Self::AuthenticateDevice => "TokenGeneration_AuthenticateDevice",
            Self::RefreshTokens => "TokenGeneration_RefreshTokens",
            Self::ClientCredentials => "TokenGeneration_ClientCredentials",
            Self::Missing => "",
            Self::Unknown(other) => other,
        }
    }

    /// Whether Cognito documents this source (every one but `Missing` and `Unknown`).
    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Missing | Self::Unknown(_))
    }
}

impl From<String> for TriggerSource {
    fn from(value: String) -> Self {
        match value.as_str() {
            "TokenGeneration_HostedAuth" => Self::HostedAuth,
            "TokenGeneration_Authentication" => Self::Authentication,
            "TokenGeneration_NewPasswordChallenge" => Self::NewPasswordChallenge,
            "TokenGeneration_AuthenticateDevice" => Self::AuthenticateDevice,
            "TokenGeneration_RefreshTokens" => Self::RefreshTokens,
            "TokenGeneration_ClientCredentials" => Self::ClientCredentials,
            "" => Self::Missing,
            _ => Self::Unknown(value),
        }
    }
}

impl<'de> Deserialize<'de> for TriggerSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Option::<String>::deserialize(deserializer)?
            .map(Self::from)
            .unwrap_or_default())
    }
}

/// The shape of reply an event expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyShape {
    /// `claimsOverrideDetails`: the ID token only (`V1_0`).
    V1,
    /// `claimsAndScopeOverrideDetails`: ID and access tokens (`V2_0`, `V3_0`).
    V2,
}

/// A Pre Token Generation event, every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PreTokenGenEvent {
    /// The pool's configured trigger version as sent: `"1"`, `"2"`, `"3"` (a number is
    /// accepted too).
    #[serde(deserialize_with = "version")]
    pub version: Option<String>,
    /// Why Cognito calls.
    pub trigger_source: TriggerSource,
    /// The AWS region.
    #[serde(deserialize_with = "nullable")]
    pub region: String,
    /// The user pool id.
    #[serde(deserialize_with = "nullable")]
    pub user_pool_id: String,
    /// The user's `cognito:username` (absent for client-credentials grants).
    #[serde(deserialize_with = "nullable")]
    pub user_name: String,
    /// Who called Cognito.
    #[serde(deserialize_with = "nullable")]
    pub caller_context: CallerContext,
    /// What Cognito is about to put into the tokens.
    #[serde(deserialize_with = "nullable")]
    pub request: TokenRequest,
    /// The incoming response (always empty from Cognito); only its key is looked at.
    pub response: Option<Value>,
}

/// `callerContext`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CallerContext {
    /// The AWS SDK version of the caller.
    #[serde(deserialize_with = "nullable")]
    pub aws_sdk_version: String,
    /// The app client id.
    #[serde(deserialize_with = "nullable")]
    pub client_id: String,
}

/// `request`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenRequest {
    /// The user's attributes (`sub`, `email`, `email_verified`, …). Values are strings on the
    /// wire; anything else is ignored by the accessors.
    #[serde(deserialize_with = "nullable")]
    pub user_attributes: BTreeMap<String, Value>,
    /// The user's groups and roles, kept exactly as sent: the reply copies it into
    /// `groupOverrideDetails` (an absent or empty override would remove the user's groups).
    pub group_configuration: Option<Value>,
    /// What the app passed as `ClientMetadata`, when the API it called accepts it.
    #[serde(deserialize_with = "nullable")]
    pub client_metadata: BTreeMap<String, Value>,
    /// The requested scopes (V2 and V3; may be missing).
    #[serde(deserialize_with = "nullable")]
    pub scopes: Vec<String>,
}

impl PreTokenGenEvent {
    /// Returns a user attribute, if it is a non-empty string.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.request
            .user_attributes
            .get(name)
            .and_then(Value::as_str)
            .filter(|value| !value.trim().is_empty())
    }

    /// Returns the user's email attribute.
    pub fn email(&self) -> Option<&str> {
        self.attribute("email")
    }

    /// Whether Cognito says the email is verified (`email_verified` is `"true"`).
    pub fn email_verified(&self) -> bool {
        match self.request.user_attributes.get("email_verified") {
            Some(Value::String(value)) => value.eq_ignore_ascii_case("true"),
            Some(Value::Bool(value)) => *value,
            _ => false,
        }
    }

    /// Returns the user's `sub` attribute.
    pub fn sub(&self) -> Option<&str> {
        self.attribute("sub")
    }

    /// Returns the user's groups (`groupConfiguration.groupsToOverride`).
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.request
            .group_configuration
            .as_ref()
            .and_then(|config| config.get("groupsToOverride"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    }

    /// Returns the version number in `version` (`"1"`, `"2.0"`, `"V3_0"` and `3` all read),
    /// if there is one.
    pub fn version_number(&self) -> Option<u32> {
        let version = self.version.as_deref()?.trim();
        let version = version.trim_start_matches(['V', 'v']);
        let major = version.split(['.', '_']).next()?;
        major.parse().ok()
    }

    /// Returns the reply shape the event expects: by `version` (`1` → V1, `2` and later → V2),
    /// else by the key of the incoming response, else V1 (which every pool accepts).
    pub fn reply_shape(&self) -> ReplyShape {
        match self.version_number() {
            Some(1) => return ReplyShape::V1,
            Some(2..) => return ReplyShape::V2,
            _ => {}
        }
        let key = |name| {
            self.response
                .as_ref()
                .and_then(Value::as_object)
                .is_some_and(|response| response.contains_key(name))
        };
        if key("claimsAndScopeOverrideDetails") {
            ReplyShape::V2
        } else {
            ReplyShape::V1
        }
    }
}

/// Reads `null` as the type's default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Reads `version` as a string, a number or `null`.
fn version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(deserializer)? {
        Some(Value::String(version)) => Some(version),
        Some(Value::Number(version)) => Some(version.to_string()),
        _ => None,
    })
}

/// Claims to add to one token and claims to remove from it.
#[derive(Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenGeneration {
    /// Claims added or overridden (string values).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub claims_to_add_or_override: Map<String, Value>,
    /// Claims removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claims_to_suppress: Vec<String>,
}

impl fmt::Debug for TokenGeneration {
    // Claim values are the minted secrets: names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let added: Vec<&String> = self.claims_to_add_or_override.keys().collect();
        f.debug_struct("TokenGeneration")
            .field("claims_to_add_or_override", &added)
            .field("claims_to_suppress", &self.claims_to_suppress)
            .finish()
    }
}

impl TokenGeneration {
    fn is_empty(&self) -> bool {
        self.claims_to_add_or_override.is_empty() && self.claims_to_suppress.is_empty()
    }
}

/// The V1 reply: `response.claimsOverrideDetails`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimsOverrideDetails {
    /// Changes to the ID token.
    #[serde(flatten)]
    pub id_token: TokenGeneration,
    /// The request's `groupConfiguration`, copied; left out when the request had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_override_details: Option<Value>,
}

/// The V2/V3 reply: `response.claimsAndScopeOverrideDetails`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimsAndScopeOverrideDetails {
    /// Changes to the ID token.
    #[serde(skip_serializing_if = "TokenGeneration::is_empty")]
    pub id_token_generation: TokenGeneration,
    /// Changes to the access token.
    #[serde(skip_serializing_if = "TokenGeneration::is_empty")]
    pub access_token_generation: TokenGeneration,
    /// The request's `groupConfiguration`, copied; left out when the request had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_override_details: Option<Value>,
}

/// A reply in either shape, serialised as the event's `response` object.
#[derive(Debug, Clone, Serialize)]
pub enum Reply {
    /// `{"claimsOverrideDetails": …}`.
    #[serde(rename = "claimsOverrideDetails")]
    V1(ClaimsOverrideDetails),
    /// `{"claimsAndScopeOverrideDetails": …}`.
    #[serde(rename = "claimsAndScopeOverrideDetails")]
    V2(ClaimsAndScopeOverrideDetails),
}
