//! An endpoint's signing secret.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore as _;

/// An endpoint's signing secret, `whsec_` and the base64 of 24 random bytes (the Standard
/// Webhooks form: the key is the decoded bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    const PREFIX: &'static str = "whsec_";
    const KEY_BYTES: usize = 24;

    pub fn generate() -> Self {
        let mut key = [0u8; Self::KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        Self(format!("{}{}", Self::PREFIX, STANDARD.encode(key)))
    }

    /// A secret as stored (written by [`Self::generate`]).
    pub fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The HMAC key: the decoded bytes after the prefix.
    pub fn key(&self) -> Vec<u8> {
        let encoded = self.0.strip_prefix(Self::PREFIX).unwrap_or(&self.0);
        STANDARD
            .decode(encoded)
            .unwrap_or_else(|_| encoded.as_bytes().to_vec())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("WebhookSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_signs_with_its_decoded_key() {
        let secret = WebhookSecret::generate();
        assert!(secret.expose().starts_with("whsec_"));
        assert_eq!(secret.key().len(), 24);
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)");
    }
}
