//! Pull credentials ([`RegistryAuth`]): ECR tokens from
//! `GetAuthorizationToken` for ECR registries, the Docker config's `auths`
//! for the others ([`ChainAuth`], the docker runtime's default).
//!
//! Secrets never reach a log line or an error message: errors name the file,
//! the registry and the fix, never a value.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_sdk_ecr::config::http::HttpResponse;
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use base64::Engine as _;
use bollard::auth::DockerCredentials;

use super::pull::RegistryAuth;
use crate::platform::AwsErrorKind;
use crate::runtime::RuntimeError;

/// The key the Docker CLI stores Docker Hub's credentials under.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// An ECR token is fetched again this long before it expires, so a pull
/// never starts with a token about to lapse (they last 12 hours).
pub const ECR_REFRESH_MARGIN: Duration = Duration::from_secs(15 * 60);

/// How long a token without `expiresAt` is used (AWS always sends one).
const ECR_FALLBACK_TTL: Duration = Duration::from_secs(60 * 60);

/// Where an image is pulled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry<'a> {
    DockerHub,
    /// `host[:port]` as written in the reference.
    Host(&'a str),
}

impl Registry<'_> {
    /// The registry of an image reference, as the Docker CLI finds it: the
    /// first path component when it looks like a host (it has a `.` or a
    /// `:`, or is `localhost`), else Docker Hub (`busybox`, `team/app`).
    pub fn of(image: &str) -> Registry<'_> {
        let Some((first, _)) = image.split_once('/') else {
            return Registry::DockerHub;
        };
        if !(first.contains('.') || first.contains(':') || first == "localhost") {
            return Registry::DockerHub;
        }
        if is_docker_hub_host(first) {
            Registry::DockerHub
        } else {
            Registry::Host(first)
        }
    }

    /// The registry's address in Docker's terms (`serveraddress`).
    fn address(&self) -> &str {
        match self {
            Registry::DockerHub => DOCKER_HUB_KEY,
            Registry::Host(host) => host,
        }
    }

    /// Whether a Docker config `auths` key names this registry: like the
    /// Docker CLI, a key matches with or without scheme and path
    /// (`https://r.example:5000/v1/` matches `r.example:5000`).
    pub fn matches_key(&self, key: &str) -> bool {
        let host = key_host(key);
        match self {
            Registry::DockerHub => is_docker_hub_host(host),
            Registry::Host(wanted) => host.eq_ignore_ascii_case(wanted),
        }
    }
}

fn is_docker_hub_host(host: &str) -> bool {
    ["docker.io", "index.docker.io", "registry-1.docker.io"]
        .iter()
        .any(|h| host.eq_ignore_ascii_case(h))
}

/// `https://r.example:5000/v1/` → `r.example:5000`.
fn key_host(key: &str) -> &str {
    let key = key.trim();
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest)
}

/// Credentials from the Docker config file (`auths` written by `docker
/// login`). The file is read at every pull, so rotated credentials apply at
/// once; no file means anonymous pulls; a file that cannot be read or parsed
/// is an infra error naming it and the fix. Credential helpers (`credsStore`,
/// `credHelpers`) are not run: such registries are pulled anonymously, with
/// one warning per registry.
pub struct DockerConfigAuth {
    path: Option<PathBuf>,
    warned: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for DockerConfigAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfigAuth")
            .field("path", &self.path)
            .finish()
    }
}

impl Default for DockerConfigAuth {
    fn default() -> Self {
        DockerConfigAuth::from_env()
    }
}

impl DockerConfigAuth {
    /// Where the Docker CLI looks: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`; nowhere (anonymous) without either variable.
    pub fn from_env() -> DockerConfigAuth {
        let path = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
            Some(dir) => Some(PathBuf::from(dir).join("config.json")),
            None => std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".docker").join("config.json")),
        };
        DockerConfigAuth {
            path,
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The config file at `path` (which need not exist).
    pub fn at(path: impl Into<PathBuf>) -> DockerConfigAuth {
        DockerConfigAuth {
            path: Some(path.into()),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The file this reads, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Credentials for `registry`, or `None` (no file, no entry).
    pub async fn credentials_for(
        &self,
        registry: Registry<'_>,
    ) -> Result<Option<DockerCredentials>, RuntimeError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let text = match tokio::fs::read_to_string(path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RuntimeError::Infra(format!(
                    "cannot read the Docker config {}: {e} — make it readable by the agent's user, or point DOCKER_CONFIG at another directory",
                    path.display()
                )))
            }
        };
        let config = DockerConfig::parse(&text).map_err(|why| {
            RuntimeError::Infra(format!(
                "the Docker config {} is malformed: {why} — fix it (`docker login` rewrites it) or remove it for anonymous pulls",
                path.display()
            ))
        })?;
        let found = config.lookup(registry);
        if found.is_none() {
            if let Some(helper) = config.helper_for(registry) {
                let first = self
                    .warned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(registry.address().to_string());
                if first {
                    tracing::warn!(
                        "the Docker config {} leaves {}'s credentials to docker-credential-{helper}, which the agent does not run: pulling anonymously — put them under `auths`",
                        path.display(),
                        registry.address()
                    );
                }
            }
        }
        Ok(found.map(|entry| entry.into_credentials(registry)))
    }
}

#[async_trait]
impl RegistryAuth for DockerConfigAuth {
    async fn credentials(&self, image: &str) -> Result<Option<DockerCredentials>, RuntimeError> {
        self.credentials_for(Registry::of(image)).await
    }
}

/// The parts of `config.json` that matter for pulls.
#[derive(Default)]
pub struct DockerConfig {
    /// Keyed as written (`https://index.docker.io/v1/`, `r.example:5000`).
    auths: Vec<(String, AuthEntry)>,
    creds_store: Option<String>,
    cred_helpers: HashMap<String, String>,
}

/// One `auths` entry. Debug shows which fields are set, never their values.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct AuthEntry {
    pub username: Option<String>,
    pub password: Option<String>,
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AuthEntry {
    fn is_empty(&self) -> bool {
        self.username.is_none() && self.password.is_none() && self.identity_token.is_none()
    }

    fn into_credentials(self, registry: Registry<'_>) -> DockerCredentials {
        DockerCredentials {
            username: self.username,
            password: self.password,
            identitytoken: self.identity_token,
            serveraddress: Some(registry.address().to_string()),
            ..Default::default()
        }
    }
}

impl DockerConfig {
    /// Parses a Docker config. The error says what is wrong and where, but
    /// never quotes a value (it could be a secret).
    pub fn parse(text: &str) -> Result<DockerConfig, String> {
        // Through `Value`, so that serde's messages (which quote values) never
        // appear: a syntax error only names its line and column.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
        let root = value
            .as_object()
            .ok_or("the top level is not a JSON object")?;
        let mut config = DockerConfig::default();
        if let Some(auths) = root.get("auths") {
            let auths = auths.as_object().ok_or("`auths` is not an object")?;
            for (key, entry) in auths {
                let parsed =
                    AuthEntry::parse(entry).map_err(|why| format!("auths.{key:?}: {why}"))?;
                config.auths.push((key.clone(), parsed));
            }
        }
        if let Some(store) = root.get("credsStore") {
            let store = store.as_str().ok_or("`credsStore` is not a string")?;
            config.creds_store = Some(store.to_string()).filter(|s| !s.is_empty());
        }
        if let Some(helpers) = root.get("credHelpers") {
            let helpers = helpers
                .as_object()
                .ok_or("`credHelpers` is not an object")?;
            for (key, helper) in helpers {
                let helper = helper
                    .as_str()
                    .ok_or_else(|| format!("credHelpers.{key:?} is not a string"))?;
                config.cred_helpers.insert(key.clone(), helper.to_string());
            }
        }
        Ok(config)
    }

    /// The entry for `registry`, the Docker CLI's way: the exact key first
    /// (`https://index.docker.io/v1/` for Docker Hub, `host[:port]`), else
    /// the first key naming the same host with a scheme or path. Entries
    /// without credentials (left by a credential helper) do not count.
    pub fn lookup(&self, registry: Registry<'_>) -> Option<AuthEntry> {
        let exact = self
            .auths
            .iter()
            .find(|(key, entry)| key == registry.address() && !entry.is_empty());
        exact
            .or_else(|| {
                self.auths
                    .iter()
                    .find(|(key, entry)| registry.matches_key(key) && !entry.is_empty())
            })
            .map(|(_, entry)| entry.clone())
    }

    /// The credential helper the Docker CLI would ask for `registry`.
    fn helper_for(&self, registry: Registry<'_>) -> Option<&str> {
        self.cred_helpers
            .iter()
            .find(|(key, _)| registry.matches_key(key))
            .map(|(_, helper)| helper.as_str())
            .or(self.creds_store.as_deref())
    }
}

impl AuthEntry {
    fn parse(entry: &serde_json::Value) -> Result<AuthEntry, String> {
        let entry = entry.as_object().ok_or("not an object")?;
        let field = |name: &str| -> Result<Option<String>, String> {
            match entry.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("`{name}` is not a string")),
            }
        };
        let mut parsed = AuthEntry {
            username: field("username")?,
            password: field("password")?,
            identity_token: field("identitytoken")?,
        };
        if let Some(auth) = field("auth")? {
            let (user, password) = decode_user_password(&auth)
                .ok_or("`auth` is not base64 of `user:password` (run `docker login` again)")?;
            parsed.username = Some(user);
            parsed.password = Some(password);
        }
        Ok(parsed)
    }
}

/// base64 of `user:password` (`auth` in a Docker config, an ECR token).
fn decode_user_password(encoded: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// An ECR registry, from its host `<account>.dkr.ecr.<region>.amazonaws.com`
/// (or `.amazonaws.com.cn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrRegistry {
    pub account: String,
    pub region: String,
}

impl EcrRegistry {
    /// `None` for any host that is not an ECR registry. A port is ignored.
    pub fn parse(host: &str) -> Option<EcrRegistry> {
        let host = host.split(':').next()?.to_ascii_lowercase();
        let rest = host
            .strip_suffix(".amazonaws.com")
            .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
        let [account, "dkr", "ecr", region] = rest.split('.').collect::<Vec<_>>()[..] else {
            return None;
        };
        let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
        let region_ok = !region.is_empty()
            && !region.starts_with('-')
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        (account_ok && region_ok).then(|| EcrRegistry {
            account: account.to_string(),
            region: region.to_string(),
        })
    }
}

/// A decoded ECR token, used until `refresh_at`.
struct CachedToken {
    password: String,
    refresh_at: SystemTime,
}

/// Pull credentials for ECR registries: a token from `GetAuthorizationToken`
/// in the registry's region (the agent's AWS credentials need
/// `ecr:GetAuthorizationToken`), cached per registry until
/// [`ECR_REFRESH_MARGIN`] before it expires. Failures are infra errors: the
/// job is retried, never failed, for the agent's AWS trouble. Other
/// registries get `None`.
pub struct EcrAuth {
    endpoint: Option<String>,
    /// Loaded on first use; every region's client shares its credentials.
    base: tokio::sync::OnceCell<aws_config::SdkConfig>,
    clients: Mutex<HashMap<String, aws_sdk_ecr::Client>>,
    /// Held across a fetch, so concurrent pulls share one request.
    tokens: tokio::sync::Mutex<HashMap<String, CachedToken>>,
    token_requests: AtomicU64,
    now: fn() -> SystemTime,
}

impl std::fmt::Debug for EcrAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcrAuth")
            .field("endpoint", &self.endpoint)
            .field("token_requests", &self.token_requests())
            .finish()
    }
}

impl EcrAuth {
    /// ECR through the standard AWS credential chain, at `endpoint` when set
    /// (an emulator; `aws_endpoint`, DROVER_AWS_ENDPOINT). Cheap: nothing is
    /// loaded before the first ECR pull.
    pub fn new(endpoint: Option<&str>) -> EcrAuth {
        EcrAuth {
            endpoint: endpoint.map(str::to_string),
            base: tokio::sync::OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
            tokens: tokio::sync::Mutex::new(HashMap::new()),
            token_requests: AtomicU64::new(0),
            now: SystemTime::now,
        }
    }

    /// ECR with a ready SDK configuration (credentials, endpoint, HTTP
    /// client); the region still comes from each registry's host.
    pub fn with_sdk_config(config: aws_config::SdkConfig) -> EcrAuth {
        let auth = EcrAuth::new(config.endpoint_url());
        auth.base.set(config).expect("a fresh OnceCell is empty");
        auth
    }

    /// Replaces the wall clock that token expiry is checked against.
    #[cfg(test)]
    fn with_clock(mut self, now: fn() -> SystemTime) -> EcrAuth {
        self.now = now;
        self
    }

    /// `GetAuthorizationToken` requests made so far.
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    /// Credentials for the ECR registry at `host`.
    pub async fn credentials_for(
        &self,
        host: &str,
        registry: &EcrRegistry,
    ) -> Result<DockerCredentials, RuntimeError> {
        let mut tokens = self.tokens.lock().await;
        let now = (self.now)();
        let password = match tokens.get(host) {
            Some(token) if now < token.refresh_at => token.password.clone(),
            _ => {
                let token = self.fetch(host, registry, now).await?;
                let password = token.password.clone();
                tokens.insert(host.to_string(), token);
                password
            }
        };
        Ok(DockerCredentials {
            username: Some("AWS".to_string()),
            password: Some(password),
            serveraddress: Some(format!("https://{host}")),
            ..Default::default()
        })
    }

    async fn client(&self, region: &str) -> aws_sdk_ecr::Client {
        let base = self
            .base
            .get_or_init(|| crate::platform::sdk_config(region, self.endpoint.as_deref()))
            .await;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_ecr::config::Builder::from(base)
                    .region(aws_config::Region::new(region.to_string()))
                    // Throttling and 5xx are retried here, briefly; what
                    // remains becomes an infra error and the job is retried.
                    .retry_config(RetryConfig::standard().with_max_attempts(3))
                    .build();
                aws_sdk_ecr::Client::from_conf(config)
            })
            .clone()
    }

    async fn fetch(
        &self,
        host: &str,
        registry: &EcrRegistry,
        now: SystemTime,
    ) -> Result<CachedToken, RuntimeError> {
        let client = self.client(&registry.region).await;
        self.token_requests.fetch_add(1, Ordering::Relaxed);
        let output = client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| sdk_error(host, e))?;
        let data = output.authorization_data().first().ok_or_else(|| {
            token_error(host, "GetAuthorizationToken returned no authorization data")
        })?;
        let (_, password) = data
            .authorization_token()
            .and_then(decode_user_password)
            .ok_or_else(|| token_error(host, "the ECR token is not base64 of `AWS:<password>`"))?;
        let refresh_at = match data.expires_at() {
            Some(at) => SystemTime::try_from(*at)
                .map_err(|_| token_error(host, "the ECR token's expiresAt is out of range"))?
                .checked_sub(ECR_REFRESH_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            None => now + ECR_FALLBACK_TTL,
        };
        tracing::debug!(
            registry = host,
            "got an ECR token (refreshed from {})",
            humantime::format_rfc3339_seconds(refresh_at)
        );
        Ok(CachedToken {
            password,
            refresh_at,
        })
    }
}

#[async_trait]
impl RegistryAuth for EcrAuth {
    async fn credentials(&self, image: &str) -> Result<Option<DockerCredentials>, RuntimeError> {
        let Registry::Host(host) = Registry::of(image) else {
            return Ok(None);
        };
        match EcrRegistry::parse(host) {
            Some(registry) => self.credentials_for(host, &registry).await.map(Some),
            None => Ok(None),
        }
    }
}

fn token_error(host: &str, why: &str) -> RuntimeError {
    RuntimeError::Infra(format!("cannot get an ECR token for {host}: {why}"))
}

fn sdk_error<E>(host: &str, err: SdkError<E, HttpResponse>) -> RuntimeError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (status, code, message) = match &err {
        SdkError::ServiceError(ctx) => (
            Some(ctx.raw().status().as_u16()),
            ctx.err().code().map(str::to_string),
            ctx.err().message().map(str::to_string),
        ),
        SdkError::ResponseError(ctx) => (Some(ctx.raw().status().as_u16()), None, None),
        _ => (None, None, None),
    };
    let detail = match (&code, &message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        _ => DisplayErrorContext(&err).to_string(),
    };
    ecr_error(host, status, code.as_deref(), &detail)
}

/// An ECR failure is always an infra error (the agent's AWS access failed,
/// not the job); the message says whether it is passing trouble or needs a
/// fix to the agent's credentials.
pub fn ecr_error(
    host: &str,
    status: Option<u16>,
    code: Option<&str>,
    detail: &str,
) -> RuntimeError {
    let kind = crate::platform::classify(status, code, Some(detail));
    let why = if kind.retryable() {
        format!("AWS or network trouble, will be retried: {detail}")
    } else if kind == AwsErrorKind::Rejected {
        format!(
            "{detail} — the agent's AWS credentials need ecr:GetAuthorizationToken (and ecr:BatchGetImage, ecr:GetDownloadUrlForLayer on the repository)"
        )
    } else {
        detail.to_string()
    };
    token_error(host, &why)
}

/// ECR for ECR registries, the Docker config for the others: the docker
/// runtime's default.
#[derive(Debug)]
pub struct ChainAuth {
    ecr: EcrAuth,
    docker_config: DockerConfigAuth,
}

impl Default for ChainAuth {
    fn default() -> Self {
        ChainAuth::new(None)
    }
}

impl ChainAuth {
    /// ECR at `aws_endpoint` when set (else AWS), the Docker config where
    /// the Docker CLI keeps it.
    pub fn new(aws_endpoint: Option<&str>) -> ChainAuth {
        ChainAuth::from_parts(EcrAuth::new(aws_endpoint), DockerConfigAuth::from_env())
    }

    pub fn from_parts(ecr: EcrAuth, docker_config: DockerConfigAuth) -> ChainAuth {
        ChainAuth { ecr, docker_config }
    }
}

#[async_trait]
impl RegistryAuth for ChainAuth {
    async fn credentials(&self, image: &str) -> Result<Option<DockerCredentials>, RuntimeError> {
        let registry = Registry::of(image);
        if let Registry::Host(host) = registry {
            if let Some(ecr) = EcrRegistry::parse(host) {
                return self.ecr.credentials_for(host, &ecr).await.map(Some);
            }
        }
        self.docker_config.credentials_for(registry).await
    }
}

#[cfg(test)]
mod tests;
