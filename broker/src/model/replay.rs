//! Sealing a minted pair for the idempotency replay of a shared store: AES-256-GCM (aws-lc-rs)
//! under the key of `tokens.replay_key`, so the pair's secrets are never stored in plaintext.
//!
//! A sealed pair is the key's id, a random 96-bit nonce and the ciphertext with its tag. The
//! authenticated data is the row's idempotency digest (caller, key, email and app client), so a
//! sealed pair copied to another row does not open. The key id (a digest of the key, which
//! reveals nothing of it) tells a pair sealed under another key, after the key was changed,
//! from a forged one.
//!
//! The same sealing keeps a rotation's successor pair on a shared store, so that a refresh token
//! presented again within the grace window, on any replica, gets that pair back
//! ([`ReplayKey::seal_successor`]). Its authenticated data is [`successor_row`], a digest of
//! the presented refresh secret.

use std::fmt;

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};
use secrecy::{ExposeSecret as _, SecretString};

use crate::model::{
    AccountId, ConfigError, FamilyId, MintedPair, MintedToken, TokenId, UnixMicros,
    secret::{self, SecretDigest},
};

/// Length of a replay key in bytes (AES-256).
pub const REPLAY_KEY_LEN: usize = 32;

/// The key that seals replayed pairs.
pub struct ReplayKey {
    key: LessSafeKey,
    id: String,
}

impl fmt::Debug for ReplayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A sealed pair, as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedPair {
    /// The id of the key that sealed it.
    pub key_id: String,
    /// The nonce, unique per seal.
    pub nonce: Vec<u8>,
    /// The ciphertext and its tag.
    pub ciphertext: Vec<u8>,
}

/// Why a sealed pair does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// It was sealed under another key (the key was changed within the window).
    OtherKey,
    /// It does not authenticate, or does not hold a pair: corrupt or forged.
    Corrupt,
}

/// The row of a rotation's sealed successor: a digest of the presented refresh secret, labelled
/// so that it is neither the secret's stored digest nor an idempotency row.
///
/// The app client is left out on purpose: the store checks it before it answers a sealed
/// successor, and a second presentation that skips the check (no client id, where that is
/// allowed) must open the pair the first one sealed.
pub fn successor_row(presented: &SecretString) -> SecretDigest {
    let mut labelled = b"tokenbroker rotation successor\n".to_vec();
    labelled.extend_from_slice(presented.expose_secret().as_bytes());
    secret::sha256(&labelled)
}

impl ReplayKey {
    /// Reads a key written as 64 hex digits (surrounding whitespace ignored).
    ///
    /// # Errors
    ///
    /// When it is not 32 bytes of hex; the message never contains the key.
    pub fn from_hex(text: &SecretString) -> Result<Self, ConfigError> {
        let invalid = || {
            ConfigError(format!(
                "tokens.replay_key must be {} hex digits ({REPLAY_KEY_LEN} bytes)",
                REPLAY_KEY_LEN * 2
            ))
        };
        let bytes = hex::decode(text.expose_secret().trim()).map_err(|_| invalid())?;
        if bytes.len() != REPLAY_KEY_LEN {
            return Err(invalid());
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| invalid())?;
        let mut labelled = b"tokenbroker replay key ".to_vec();
        labelled.extend_from_slice(&bytes);
        let id = hex::encode(&secret::sha256(&labelled)[..8]);
        Ok(Self {
            key: LessSafeKey::new(key),
            id,
        })
    }

    /// The key's id: a digest of it, safe to store and log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `pair` (all but its account) for the row `row`.
    ///
    /// # Panics
    ///
    /// When the system's random source or AES-GCM fails, which a working host never does.
    pub fn seal(&self, row: &SecretDigest, pair: &MintedPair) -> SealedPair {
        self.seal_for(row, pair)
    }

    /// Seals `pair` with `aad` as the authenticated data.
    fn seal_for(&self, aad: &[u8], pair: &MintedPair) -> SealedPair {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut data = [
            pair.family_id.as_str(),
            pair.refresh.secret.expose_secret(),
            &pair.refresh.expires_at.0.to_string(),
            pair.access.secret.expose_secret(),
            &pair.access.expires_at.0.to_string(),
        ]
        .join("\n")
        .into_bytes();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .expect("AES-GCM seals any message of this size");
        SealedPair {
            key_id: self.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext: data,
        }
    }

    /// Opens a pair sealed for the row `row`, as the pair of `account`.
    ///
    /// # Errors
    ///
    /// See [`OpenError`].
    pub fn open(
        &self,
        row: &SecretDigest,
        account: AccountId,
        sealed: &SealedPair,
    ) -> Result<MintedPair, OpenError> {
        self.open_for(row, account, sealed, |secret| {
            secret::parse(secret).map(|parsed| parsed.id)
        })
    }

    /// Opens a pair sealed with `aad`, naming each token by `id_of` its secret.
    fn open_for(
        &self,
        aad: &[u8],
        account: AccountId,
        sealed: &SealedPair,
        mut id_of: impl FnMut(&SecretString) -> Option<TokenId>,
    ) -> Result<MintedPair, OpenError> {
        if sealed.key_id != self.id {
            return Err(OpenError::OtherKey);
        }
        let nonce =
            Nonce::try_assume_unique_for_key(&sealed.nonce).map_err(|_| OpenError::Corrupt)?;
        let mut data = sealed.ciphertext.clone();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut data)
            .map_err(|_| OpenError::Corrupt)?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| OpenError::Corrupt)?;
        let fields: Vec<&str> = text.split('\n').collect();
        let [family, refresh, refresh_expires, access, access_expires] = fields[..] else {
            return Err(OpenError::Corrupt);
        };
        let mut token = |value: &str, expires: &str| {
            let secret = SecretString::from(value.to_owned());
            let id = id_of(&secret).ok_or(OpenError::Corrupt)?;
            let expires_at = UnixMicros(expires.parse().map_err(|_| OpenError::Corrupt)?);
            Ok(MintedToken {
                id,
                secret,
                expires_at,
            })
        };
        Ok(MintedPair {
            account_id: account,
            family_id: FamilyId::from_stored(family.to_owned()),
            refresh: token(refresh, refresh_expires)?,
            access: token(access, access_expires)?,
        })
    }
}

impl ReplayKey {
    /// Seals `pair` for the row `row`, for a store whose secrets do not name their tokens
    /// (Fauna's): the store keeps the two token ids in the clear beside the sealed pair, and
    /// they are part of the authenticated data, so ids swapped in the store do not open.
    pub fn seal_with_ids(&self, row: &SecretDigest, pair: &MintedPair) -> SealedPair {
        self.seal_for(&ids_aad(row, &pair.refresh.id, &pair.access.id), pair)
    }

    /// Opens a pair sealed by [`ReplayKey::seal_with_ids`], as the pair of `account` with the
    /// token ids `refresh_id` and `access_id` kept beside it.
    ///
    /// # Errors
    ///
    /// See [`OpenError`].
    pub fn open_with_ids(
        &self,
        row: &SecretDigest,
        account: AccountId,
        (refresh_id, access_id): (TokenId, TokenId),
        sealed: &SealedPair,
    ) -> Result<MintedPair, OpenError> {
        let aad = ids_aad(row, &refresh_id, &access_id);
        let mut ids = [refresh_id, access_id].into_iter();
        self.open_for(&aad, account, sealed, |_| ids.next())
    }
}

/// The authenticated data of a pair sealed with its ids: the row, then both ids.
fn ids_aad(row: &SecretDigest, refresh: &TokenId, access: &TokenId) -> Vec<u8> {
    let mut aad = row.to_vec();
    for id in [refresh, access] {
        aad.push(b'\n');
        aad.extend_from_slice(id.as_str().as_bytes());
    }
    aad
}

impl ReplayKey {
    /// Seals a rotation's successor secrets (`refresh`, then `access`) for the presented refresh
    /// secret. The family and expiries are not sealed: the store answers them from the rows it
    /// keeps, and [`ReplayKey::open_successor`] takes them from there.
    pub fn seal_successor(
        &self,
        presented: &SecretString,
        refresh: &MintedToken,
        access: &MintedToken,
    ) -> SealedPair {
        self.seal(&successor_row(presented), &successor_pair(refresh, access))
    }

    /// Opens a successor sealed by [`ReplayKey::seal_successor`] for `presented`, completed with
    /// what the store keeps beside it.
    ///
    /// # Errors
    ///
    /// See [`OpenError`].
    pub fn open_successor(
        &self,
        presented: &SecretString,
        stored: StoredSuccessor,
        sealed: &SealedPair,
    ) -> Result<MintedPair, OpenError> {
        let mut pair = self.open(&successor_row(presented), stored.account_id, sealed)?;
        pair.family_id = stored.family_id;
        pair.refresh.expires_at = stored.refresh_expires;
        pair.access.expires_at = stored.access_expires;
        Ok(pair)
    }
}

impl ReplayKey {
    /// [`ReplayKey::seal_successor`] for a store whose secrets do not name their tokens, as
    /// [`ReplayKey::seal_with_ids`]: the store keeps both token ids beside the sealed pair.
    pub fn seal_successor_with_ids(
        &self,
        presented: &SecretString,
        refresh: &MintedToken,
        access: &MintedToken,
    ) -> SealedPair {
        self.seal_with_ids(&successor_row(presented), &successor_pair(refresh, access))
    }

    /// Opens a successor sealed by [`ReplayKey::seal_successor_with_ids`] for `presented`,
    /// completed with what the store keeps beside it, the token ids among it.
    ///
    /// # Errors
    ///
    /// See [`OpenError`].
    pub fn open_successor_with_ids(
        &self,
        presented: &SecretString,
        stored: StoredSuccessor,
        ids: (TokenId, TokenId),
        sealed: &SealedPair,
    ) -> Result<MintedPair, OpenError> {
        let mut pair =
            self.open_with_ids(&successor_row(presented), stored.account_id, ids, sealed)?;
        pair.family_id = stored.family_id;
        pair.refresh.expires_at = stored.refresh_expires;
        pair.access.expires_at = stored.access_expires;
        Ok(pair)
    }
}

/// A successor's secrets as a pair to seal: the family, account and expiries are left empty,
/// since the store keeps them in the clear ([`StoredSuccessor`]).
fn successor_pair(refresh: &MintedToken, access: &MintedToken) -> MintedPair {
    let bare = |token: &MintedToken| MintedToken {
        id: token.id.clone(),
        secret: token.secret.clone(),
        expires_at: UnixMicros(0),
    };
    MintedPair {
        account_id: AccountId::from_stored(String::new()),
        family_id: FamilyId::from_stored(String::new()),
        refresh: bare(refresh),
        access: bare(access),
    }
}

/// What a store keeps in the clear beside a sealed successor (see
/// [`ReplayKey::open_successor`]).
#[derive(Debug, Clone)]
pub struct StoredSuccessor {
    /// The family's account.
    pub account_id: AccountId,
    /// The family.
    pub family_id: FamilyId,
    /// When the successor refresh token expires.
    pub refresh_expires: UnixMicros,
    /// When the successor's access token expires.
    pub access_expires: UnixMicros,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TokenKind;

    fn key(byte: u8) -> ReplayKey {
        ReplayKey::from_hex(&SecretString::from(hex::encode([byte; 32]))).unwrap()
    }

    fn pair() -> MintedPair {
        let token = |kind| {
            let (id, secret, _) = secret::mint(kind);
            MintedToken {
                id,
                secret,
                expires_at: UnixMicros(1_700_000_000_000_000),
            }
        };
        MintedPair {
            account_id: AccountId::random(),
            family_id: FamilyId::random(),
            refresh: token(TokenKind::Refresh),
            access: token(TokenKind::Access),
        }
    }

    #[test]
    fn a_sealed_pair_opens_only_for_its_row_and_key_and_holds_no_plaintext() {
        let (sealer, pair, row) = (key(7), pair(), [1u8; 32]);
        let sealed = sealer.seal(&row, &pair);
        for secret in [&pair.refresh.secret, &pair.access.secret] {
            let text = secret.expose_secret().as_bytes();
            assert!(!sealed.ciphertext.windows(text.len()).any(|w| w == text));
        }
        let opened = sealer.open(&row, pair.account_id.clone(), &sealed).unwrap();
        assert_eq!(opened.family_id, pair.family_id);
        assert_eq!(opened.refresh.id, pair.refresh.id);
        assert_eq!(opened.access.expires_at, pair.access.expires_at);
        assert_eq!(
            opened.access.secret.expose_secret(),
            pair.access.secret.expose_secret()
        );
        assert_ne!(sealer.seal(&row, &pair).nonce, sealed.nonce, "fresh nonces");

        assert_eq!(
            sealer
                .open(&[2u8; 32], pair.account_id.clone(), &sealed)
                .unwrap_err(),
            OpenError::Corrupt,
            "another row"
        );
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(
            sealer
                .open(&row, pair.account_id.clone(), &tampered)
                .unwrap_err(),
            OpenError::Corrupt
        );
        assert_eq!(
            key(8).open(&row, pair.account_id, &sealed).unwrap_err(),
            OpenError::OtherKey
        );
    }

    #[test]
    fn a_sealed_successor_opens_only_for_its_presented_secret() {
        let (sealer, pair) = (key(7), pair());
        let (_, presented, _) = secret::mint(TokenKind::Refresh);
        let sealed = sealer.seal_successor(&presented, &pair.refresh, &pair.access);
        let stored = StoredSuccessor {
            account_id: pair.account_id.clone(),
            family_id: pair.family_id.clone(),
            refresh_expires: UnixMicros(5),
            access_expires: UnixMicros(6),
        };
        let opened = sealer
            .open_successor(&presented, stored.clone(), &sealed)
            .unwrap();
        assert_eq!(opened.refresh.id, pair.refresh.id);
        assert_eq!(opened.access.id, pair.access.id);
        assert_eq!(
            opened.refresh.secret.expose_secret(),
            pair.refresh.secret.expose_secret()
        );
        assert_eq!(opened.family_id, pair.family_id);
        assert_eq!(opened.account_id, pair.account_id);
        assert_eq!(
            (opened.refresh.expires_at, opened.access.expires_at),
            (UnixMicros(5), UnixMicros(6))
        );
        let (_, other, _) = secret::mint(TokenKind::Refresh);
        assert_eq!(
            sealer.open_successor(&other, stored, &sealed).unwrap_err(),
            OpenError::Corrupt,
            "another presented secret"
        );
        assert_ne!(
            successor_row(&presented),
            secret::sha256(presented.expose_secret().as_bytes())
        );
    }

    #[test]
    fn a_pair_sealed_with_ids_opens_only_with_those_ids() {
        let (sealer, pair, row) = (key(7), pair(), [1u8; 32]);
        let sealed = sealer.seal_with_ids(&row, &pair);
        let ids = (pair.refresh.id.clone(), pair.access.id.clone());
        let opened = sealer
            .open_with_ids(&row, pair.account_id.clone(), ids.clone(), &sealed)
            .unwrap();
        assert_eq!((opened.refresh.id, opened.access.id), ids.clone());
        assert_eq!(
            opened.refresh.secret.expose_secret(),
            pair.refresh.secret.expose_secret()
        );
        assert_eq!(opened.refresh.expires_at, pair.refresh.expires_at);
        let swapped = (ids.1.clone(), ids.0.clone());
        assert_eq!(
            sealer
                .open_with_ids(&row, pair.account_id.clone(), swapped, &sealed)
                .unwrap_err(),
            OpenError::Corrupt
        );
        assert_eq!(
            sealer
                .open_with_ids(&[2u8; 32], pair.account_id.clone(), ids.clone(), &sealed)
                .unwrap_err(),
            OpenError::Corrupt
        );
        assert_eq!(
            key(8)
                .open_with_ids(&row, pair.account_id, ids, &sealed)
                .unwrap_err(),
            OpenError::OtherKey
        );
    }

    #[test]
    fn a_key_must_be_32_bytes_of_hex_and_is_never_shown() {
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(66)] {
            let err = ReplayKey::from_hex(&SecretString::from(bad.to_owned())).unwrap_err();
            assert!(err.0.contains("64 hex digits"), "{err:?}");
        }
        let text = "ab".repeat(32);
        let key = ReplayKey::from_hex(&SecretString::from(format!(" {text}\n"))).unwrap();
        assert!(!format!("{key:?}").contains(&text));
        assert_eq!(key.id().len(), 16);
    }
}
