//! `CHAT_CORS_ALLOWED_ORIGINS`: the origins whose pages may call the chat routes from a browser.

use std::str::FromStr;

/// The web origins allowed to call the chat routes cross-origin, each as a browser sends it in
/// `Origin` (`https://app.example.com`, `http://localhost:5173`). Empty: no CORS at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the `Origin` of a request is one of them (compared as sent: a browser serializes
    /// an origin one way only).
    pub fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|allowed| allowed == origin)
    }
}

impl FromStr for AllowedOrigins {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut origins = Vec::new();
        for entry in raw
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            // Written exactly as a browser serializes it, or it would never match an `Origin`.
            let serialized = url::Url::parse(entry)
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https"))
                .map(|url| url.origin().ascii_serialization());
            if serialized.as_deref() != Some(entry) {
                return Err(format!(
                    "{entry:?} is not an origin as browsers send it: scheme://host[:port], lower \
                     case, no path (e.g. https://app.example.com)"
                ));
            }
            origins.push(entry.to_owned());
        }
        Ok(Self(origins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_taken_only_as_browsers_send_them() {
        let allowed: AllowedOrigins = "https://app.example.com, http://localhost:5173"
            .parse()
            .expect("valid");
        assert!(allowed.allows("https://app.example.com"));
        assert!(allowed.allows("http://localhost:5173"));
        assert!(!allowed.allows("http://app.example.com"));
        assert!(!allowed.allows("null"));
        for refused in [
            "https://app.example.com/",
            "https://App.example.com",
            "app.example.com",
            "*",
            "ftp://files.example.com",
            "https://app.example.com:443",
        ] {
            assert!(refused.parse::<AllowedOrigins>().is_err(), "{refused}");
        }
        assert!("".parse::<AllowedOrigins>().expect("empty").is_empty());
    }
}
