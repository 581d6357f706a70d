//! Tokens: generated random, stored and compared as SHA-256 hashes, never logged.

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::{ApiTokenConfig, JoinTokenConfig, Scope};

/// A fresh random token with a short prefix that says what it is for.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The stored hash of a configured token (`sha256:<hex>` is taken as is).
fn configured_hash(token: &str) -> String {
    match token.strip_prefix("sha256:") {
        Some(hex) => hex.to_ascii_lowercase(),
        None => hash_token(token),
    }
}

/// Constant-time comparison of two hex hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The configured tokens, hashed once at start-up.
#[derive(Debug, Clone)]
pub struct Tokens {
    join: Vec<(String, Option<String>)>,
    api: Vec<(String, Vec<Scope>)>,
}

impl Tokens {
    pub fn new(join: &[JoinTokenConfig], api: &[ApiTokenConfig]) -> Tokens {
        Tokens {
            join: join
                .iter()
                .map(|t| (configured_hash(&t.token), t.pool.clone()))
                .collect(),
            api: api
                .iter()
                .map(|t| (configured_hash(&t.token), t.scopes.clone()))
                .collect(),
        }
    }

    /// Whether `token` may register an agent of `pool`.
    pub fn join_allows(&self, token: &str, pool: &str) -> JoinCheck {
        let hash = hash_token(token);
        let mut known = false;
        for (h, scope) in &self.join {
            if hashes_equal(h, &hash) {
                known = true;
                if scope.as_deref().is_none_or(|p| p == pool) {
                    return JoinCheck::Allowed;
                }
            }
        }
        if known {
            JoinCheck::WrongPool
        } else {
            JoinCheck::Unknown
        }
    }

    /// The scopes of an API token, if it is one.
    pub fn api_scopes(&self, token: &str) -> Option<&[Scope]> {
        let hash = hash_token(token);
        self.api
            .iter()
            .find(|(h, _)| hashes_equal(h, &hash))
            .map(|(_, s)| s.as_slice())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinCheck {
    Allowed,
    WrongPool,
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_scoped_join_token_only_admits_its_pool() {
        let tokens = Tokens::new(
            &[JoinTokenConfig {
                token: "cpu-token-0123456789".into(),
                pool: Some("cpu".into()),
            }],
            &[],
        );
        assert_eq!(
            tokens.join_allows("cpu-token-0123456789", "cpu"),
            JoinCheck::Allowed
        );
        assert_eq!(
            tokens.join_allows("cpu-token-0123456789", "gpu"),
            JoinCheck::WrongPool
        );
        assert_eq!(tokens.join_allows("other", "cpu"), JoinCheck::Unknown);
    }

    #[test]
    fn hashed_tokens_in_config_are_accepted() {
        let hash = format!("sha256:{}", hash_token("the-real-token-123"));
        let tokens = Tokens::new(
            &[],
            &[ApiTokenConfig {
                token: hash,
                scopes: vec![Scope::Read],
            }],
        );
        assert_eq!(
            tokens.api_scopes("the-real-token-123"),
            Some(&[Scope::Read][..])
        );
        assert_eq!(tokens.api_scopes("the-real-token-124"), None);
    }
}
