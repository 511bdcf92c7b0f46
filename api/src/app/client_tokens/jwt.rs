//! Client tokens as JWTs (RFC 7519) signed with HS256, through `jsonwebtoken`: the header names the
//! application's key id (`kid`), the claims say what the token grants. `jsonwebtoken` is built
//! without a crypto backend (see the workspace's Cargo.toml), so HS256, the one algorithm used, is
//! provided here on the `hmac` and `sha2` the workspace already has; every other algorithm is
//! refused.

use std::collections::BTreeSet;

use chatcore::domain::{ClientKeyId, Number, Sender};
use chrono::DateTime;
use hmac::{Hmac, Mac as _};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::grant::{Access, ChatSelection, ClientGrant, EveryChat};

/// `jsonwebtoken`'s process-wide crypto: HS256 only.
static HS256_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: |algorithm, key| {
        Ok(Box::new(HmacSha256::for_algorithm(
            algorithm,
            key.as_bytes(),
        )?))
    },
    verifier_factory: |algorithm, key| {
        Ok(Box::new(HmacSha256::for_algorithm(
            algorithm,
            key.try_get_as_bytes()?,
        )?))
    },
    // JWKs are never read: no key utilities.
    key_utils: KeyUtils::new_unimplemented(),
};

struct HmacSha256(Hmac<Sha256>);

impl HmacSha256 {
    fn for_algorithm(algorithm: &Algorithm, key: &[u8]) -> jsonwebtoken::errors::Result<Self> {
        if *algorithm != Algorithm::HS256 {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        Hmac::new_from_slice(key)
            .map(Self)
            .map_err(|_| ErrorKind::InvalidKeyFormat.into())
    }
}

impl signature::Signer<Vec<u8>> for HmacSha256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(self
            .0
            .clone()
            .chain_update(message)
            .finalize()
            .into_bytes()
            .to_vec())
    }
}

impl signature::Verifier<Vec<u8>> for HmacSha256 {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        // In constant time.
        self.0
            .clone()
            .chain_update(message)
            .verify_slice(signature)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for HmacSha256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for HmacSha256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

/// The claims of a client token. `app`: the application's internal id (never shown elsewhere, but
/// harmless: it opens nothing without a token).
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    app: u64,
    sender: String,
    chats: ChatsClaim,
    scopes: BTreeSet<Access>,
    iat: i64,
    exp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum ChatsClaim {
    Every(EveryChat),
    Listed(BTreeSet<u64>),
}

/// Signs and checks client tokens with the keys derived from the operator's secret.
pub(super) struct TokenSigner {
    secret: Vec<u8>,
}

impl TokenSigner {
    pub(super) fn new(secret: &[u8]) -> Self {
        // Idempotent: refused (and nothing changes) once installed.
        let _ = HS256_ONLY.install_default();
        Self {
            secret: secret.to_vec(),
        }
    }

    /// An application's signing key: HMAC-SHA256(operator secret, key id).
    fn key(&self, key_id: &str) -> [u8; 32] {
        Hmac::<Sha256>::new_from_slice(&self.secret)
            .expect("HMAC takes a key of any length")
            .chain_update(key_id.as_bytes())
            .finalize()
            .into_bytes()
            .into()
    }

    pub(super) fn sign(&self, grant: &ClientGrant, key_id: &ClientKeyId) -> anyhow::Result<String> {
        let claims = Claims {
            app: grant.application_id,
            sender: grant.sender.as_str().to_owned(),
            chats: match &grant.chats {
                ChatSelection::Every => ChatsClaim::Every(EveryChat::Every),
                ChatSelection::Listed(numbers) => {
                    ChatsClaim::Listed(numbers.iter().map(|number| number.get()).collect())
                }
            },
            scopes: grant.scopes.clone(),
            iat: grant.issued_at.timestamp(),
            exp: grant.expires_at.timestamp(),
        };
        let header = Header {
            kid: Some(key_id.as_str().to_owned()),
            ..Header::new(Algorithm::HS256)
        };
        let key = EncodingKey::from_secret(&self.key(key_id.as_str()))?;
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }

    /// The grant of a token signed with the key of the id its header names, unexpired, with
    /// that key id; None for anything else (malformed, tampered, expired, another algorithm).
    /// Whether the key id is still the application's is the caller's to check.
    pub(super) fn verify(&self, token: &str) -> Option<(ClientGrant, ClientKeyId)> {
        let key_id = jsonwebtoken::decode_header(token).ok()?.kid?;
        let key = DecodingKey::from_secret(&self.key(&key_id)).ok()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .ok()?
            .claims;
        let chats = match claims.chats {
            ChatsClaim::Every(EveryChat::Every) => ChatSelection::Every,
            ChatsClaim::Listed(numbers) => ChatSelection::Listed(
                numbers
                    .into_iter()
                    .map(Number::new)
                    .collect::<Option<_>>()?,
            ),
        };
        let grant = ClientGrant {
            application_id: claims.app,
            sender: Sender::parse(&claims.sender).ok()?,
            chats,
            scopes: claims.scopes,
            issued_at: DateTime::from_timestamp(claims.iat, 0)?,
            expires_at: DateTime::from_timestamp(claims.exp, 0)?,
        };
        Some((grant, ClientKeyId::from_stored(key_id)))
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use chrono::Utc;

    use super::*;

    fn grant(expires_in: i64) -> ClientGrant {
        ClientGrant {
            application_id: 7,
            sender: Sender::parse("u42").expect("sender"),
            chats: ChatSelection::Listed([1, 2].into_iter().filter_map(Number::new).collect()),
            scopes: [Access::Read].into(),
            issued_at: Utc::now(),
            expires_at: Utc::now() + chrono::Duration::seconds(expires_in),
        }
    }

    #[test]
    fn a_token_carries_its_grant_and_key_id() {
        let signer = TokenSigner::new(b"an operator secret of enough length");
        let key_id = ClientKeyId::generate();
        let token = signer.sign(&grant(60), &key_id).expect("signed");
        let (verified, verified_key) = signer.verify(&token).expect("valid");
        assert_eq!(verified_key, key_id);
        assert_eq!(verified.application_id, 7);
        assert_eq!(verified.sender.as_str(), "u42");
        assert_eq!(verified.scopes, [Access::Read].into());
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).expect("claims"))
                .expect("base64"),
        )
        .expect("json");
        assert_eq!(claims["chats"], serde_json::json!([1, 2]));
        assert_eq!(claims["scopes"], serde_json::json!(["read"]));
    }

    #[test]
    fn expired_tampered_foreign_or_unsigned_tokens_are_refused() {
        let signer = TokenSigner::new(b"an operator secret of enough length");
        let key_id = ClientKeyId::generate();
        let expired = signer.sign(&grant(-1), &key_id).expect("signed");
        assert!(signer.verify(&expired).is_none(), "expired");

        let token = signer.sign(&grant(60), &key_id).expect("signed");
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).expect("b64")).expect("json");
        claims["chats"] = serde_json::json!("*");
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        assert!(signer.verify(&parts.join(".")).is_none(), "a claim changed");

        let mut signature = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(2).expect("sig"))
            .expect("b64");
        signature[0] ^= 1;
        let flipped = format!(
            "{}.{}",
            token.rsplit_once('.').expect("parts").0,
            URL_SAFE_NO_PAD.encode(signature)
        );
        assert!(
            signer.verify(&flipped).is_none(),
            "a signature byte flipped"
        );

        let other = TokenSigner::new(b"another operator secret, as long");
        assert!(other.verify(&token).is_none(), "another secret");

        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"x"}"#),
            token.split('.').nth(1).expect("claims")
        );
        assert!(signer.verify(&unsigned).is_none(), "alg none");
        assert!(signer.verify("junk").is_none());
    }
}
