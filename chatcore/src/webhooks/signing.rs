//! Standard Webhooks signatures: `webhook-signature: v1,<base64 of HMAC-SHA256(key,
//! "{webhook-id}.{webhook-timestamp}.{body}")>`, one per secret that signs (space-separated while
//! a rotated secret overlaps), so a receiver verifies with either.

use super::WebhookSecret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The `webhook-signature` header of one delivery.
pub fn signature_header(
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
    secrets: &[WebhookSecret],
) -> String {
    secrets
        .iter()
        .map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&secret.key())
                .expect("HMAC takes a key of any length");
            mac.update(webhook_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries' tests.
    #[test]
    fn signs_as_the_specification_s_example() {
        let secret = WebhookSecret::from_stored("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
        let header = signature_header(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &[secret],
        );
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_signing_secret_adds_a_signature() {
        let header = signature_header(
            "msg_1",
            1,
            b"{}",
            &[WebhookSecret::generate(), WebhookSecret::generate()],
        );
        assert_eq!(header.split(' ').count(), 2);
        assert!(
            header
                .split(' ')
                .all(|signature| signature.starts_with("v1,"))
        );
    }
}
