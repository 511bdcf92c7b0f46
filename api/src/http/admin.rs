//! The operator's credential: `Authorization: Bearer <admin token>` opens the listing of every
//! application. It comes from `CHAT_ADMIN_TOKEN`, or is generated on first start and kept in
//! `CHAT_DATA_DIR/admin-token` (mode 600); the token itself is never logged.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use chatcore::Config;
use chatcore::config::AdminToken;
use rand::Rng as _;
use rand::distr::Alphanumeric;
use subtle::ConstantTimeEq as _;

use crate::http::error::ApiError;
use crate::http::state::AppState;

const TOKEN_FILE: &str = "admin-token";
const GENERATED_TOKEN_LENGTH: usize = 40;

/// The admin token of this process: configured, or read from (or first written to) its file.
pub fn load_or_create(config: &Config) -> anyhow::Result<AdminToken> {
    if let Some(token) = &config.api.admin_token {
        return Ok(token.clone());
    }
    let path = config.data_dir.join(TOKEN_FILE);
    let token = match std::fs::read_to_string(&path) {
        Ok(contents) => contents
            .parse()
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => create(&path)?,
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
    };
    tracing::info!(
        path = %absolute(&path).display(),
        "admin token (Authorization: Bearer) for listing applications is in this file"
    );
    Ok(token)
}

fn create(path: &Path) -> anyhow::Result<AdminToken> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let token: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(GENERATED_TOKEN_LENGTH)
        .map(char::from)
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode of create_new is masked by the umask; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(file, "{token}").with_context(|| format!("writing {}", path.display()))?;
    token
        .parse()
        .map_err(|reason: String| anyhow::anyhow!(reason))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Proof that the request carries the admin token: 401 without a bearer token, 403 with a wrong one.
pub struct AdminAccess;

impl AdminAccess {
    pub fn verify(headers: &HeaderMap, state: &AppState) -> Result<Self, ApiError> {
        let presented = crate::http::tenant::bearer(headers).ok_or(ApiError::Unauthorized)?;
        let expected = state.admin_token.expose().as_bytes();
        // Constant time: the answer must not tell how much of a guess was right.
        if bool::from(presented.as_bytes().ct_eq(expected)) {
            return Ok(Self);
        }
        Err(ApiError::Forbidden)
    }
}

impl FromRequestParts<AppState> for AdminAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::verify(&parts.headers, state)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_generated_token_is_kept_private_and_reused() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("admin-token-{}", std::process::id()));
        let config = Config::from_map(&HashMap::from([(
            "CHAT_DATA_DIR".to_owned(),
            dir.display().to_string(),
        )]))?;
        let first = load_or_create(&config)?;
        let mode = std::fs::metadata(dir.join(TOKEN_FILE))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(first.expose().len(), GENERATED_TOKEN_LENGTH);
        assert_eq!(load_or_create(&config)?, first, "the second start reads it");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_configured_token_wins_and_a_short_one_is_refused() {
        let token = "a".repeat(AdminToken::MIN_LENGTH);
        let config = Config::from_map(&HashMap::from([(
            "CHAT_ADMIN_TOKEN".to_owned(),
            token.clone(),
        )]))
        .expect("valid");
        assert_eq!(load_or_create(&config).expect("token").expose(), token);
        assert!(
            Config::from_map(&HashMap::from([(
                "CHAT_ADMIN_TOKEN".to_owned(),
                "short".to_owned()
            )]))
            .is_err()
        );
    }
}
