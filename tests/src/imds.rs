//! An IMDSv2 emulator on a loopback port, speaking the real wire format:
//! `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! (1–21600) returns a token (and its TTL header); every GET must carry it in
//! `X-aws-ec2-metadata-token`, else 401. Serves the documented paths the
//! agent reads; a test switches the spot notice, the rebalance
//! recommendation and the ASG target lifecycle state (set by hand, or
//! followed from moto's view of the instance, as AWS does).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use tokio::time::Instant;

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// What the instance is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub instance_id: String,
    pub instance_type: String,
    pub az: String,
    pub region: String,
    pub spot: bool,
    /// The ASG name in instance metadata tags; `None` = tags not enabled
    /// (the agent asks DescribeAutoScalingInstances instead).
    pub asg_tag: Option<String>,
    /// Other instance tags (`tags/instance/<key>`); with `asg_tag` `None`
    /// and no tags here, instance metadata tags are off (404).
    pub tags: std::collections::BTreeMap<String, String>,
}

impl Identity {
    pub fn new(instance_id: &str) -> Identity {
        Identity {
            instance_id: instance_id.to_string(),
            instance_type: "m5.large".into(),
            az: "us-east-1a".into(),
            region: "us-east-1".into(),
            spot: false,
            asg_tag: None,
            tags: Default::default(),
        }
    }
}

#[derive(Debug, Clone)]
enum Lifecycle {
    Fixed(Option<String>),
    /// Asks moto's harness how the group sees the instance.
    FollowMoto(String),
}

struct ImdsState {
    identity: Identity,
    tokens: HashMap<String, Instant>,
    spot_action: Option<String>,
    rebalance: Option<String>,
    lifecycle: Lifecycle,
    last_lifecycle: Option<String>,
    unauthorized: u64,
}

type Shared = Arc<Mutex<ImdsState>>;

pub struct Imds {
    pub endpoint: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Imds {
    pub async fn start(identity: Identity) -> Imds {
        let state = Arc::new(Mutex::new(ImdsState {
            identity,
            tokens: HashMap::new(),
            spot_action: None,
            rebalance: None,
            lifecycle: Lifecycle::Fixed(None),
            last_lifecycle: None,
            unauthorized: 0,
        }));
        let app = Router::new()
            .route("/latest/api/token", put(token))
            .route("/latest/meta-data/{*path}", get(meta))
            .route("/latest/dynamic/instance-identity/document", get(document))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind IMDS emulator");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Imds {
            endpoint,
            state,
            task,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ImdsState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Publishes a spot interruption notice for `time` (AWS gives two
    /// minutes).
    pub fn set_spot_interruption(&self, time: SystemTime) {
        let json = serde_json::json!({
            "action": "terminate",
            "time": humantime_seconds(time),
        })
        .to_string();
        self.with(|s| s.spot_action = Some(json));
    }

    pub fn set_rebalance_recommendation(&self) {
        let json =
            serde_json::json!({ "noticeTime": humantime_seconds(SystemTime::now()) }).to_string();
        self.with(|s| s.rebalance = Some(json));
    }

    /// `autoscaling/target-lifecycle-state`, fixed (`None` = 404).
    pub fn set_target_lifecycle_state(&self, state: Option<&str>) {
        self.with(|s| s.lifecycle = Lifecycle::Fixed(state.map(str::to_string)));
    }

    /// `autoscaling/target-lifecycle-state` from moto's view of the
    /// instance: `Terminated` once it is terminating, `InService` before.
    pub fn follow_moto(&self, moto_endpoint: &str) {
        self.with(|s| s.lifecycle = Lifecycle::FollowMoto(moto_endpoint.to_string()));
    }

    /// GETs refused for a missing or invalid token.
    pub fn unauthorized(&self) -> u64 {
        self.with(|s| s.unauthorized)
    }
}

fn humantime_seconds(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn token(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if headers.contains_key("x-forwarded-for") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(ttl) = ttl.filter(|t| (1..=21_600).contains(t)) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = format!("token-{}", rand_hex());
    state
        .lock()
        .unwrap()
        .tokens
        .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
    ([(TTL_HEADER, ttl.to_string())], token).into_response()
}

fn rand_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

fn authorized(state: &Shared, headers: &HeaderMap) -> bool {
    let mut s = state.lock().unwrap();
    let ok = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| s.tokens.get(t))
        .is_some_and(|expiry| *expiry > Instant::now());
    if !ok {
        s.unauthorized += 1;
    }
    ok
}

fn text(body: String) -> Response {
    ([("content-type", "text/plain")], body).into_response()
}

async fn meta(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if path == "autoscaling/target-lifecycle-state" {
        return lifecycle_state(&state).await;
    }
    let s = state.lock().unwrap();
    let id = &s.identity;
    let value = match path.as_str() {
        "instance-id" => Some(id.instance_id.clone()),
        "instance-type" => Some(id.instance_type.clone()),
        "placement/availability-zone" => Some(id.az.clone()),
        "placement/region" => Some(id.region.clone()),
        "instance-life-cycle" => Some(if id.spot { "spot" } else { "on-demand" }.to_string()),
        "tags/instance" => instance_tags(id).map(|t| t.into_keys().collect::<Vec<_>>().join("\n")),
        _ if path.starts_with("tags/instance/") => {
            instance_tags(id).and_then(|mut t| t.remove(&path["tags/instance/".len()..]))
        }
        "spot/instance-action" => s.spot_action.clone(),
        "events/recommendations/rebalance" => s.rebalance.clone(),
        _ => None,
    };
    match value {
        Some(v) => text(v),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The instance's tags as IMDS shows them; `None` when they are off.
fn instance_tags(id: &Identity) -> Option<std::collections::BTreeMap<String, String>> {
    let mut tags = id.tags.clone();
    if let Some(group) = &id.asg_tag {
        tags.insert("aws:autoscaling:groupName".into(), group.clone());
    }
    (!tags.is_empty()).then_some(tags)
}

async fn lifecycle_state(state: &Shared) -> Response {
    let (lifecycle, instance_id) = {
        let s = state.lock().unwrap();
        (s.lifecycle.clone(), s.identity.instance_id.clone())
    };
    let value = match lifecycle {
        Lifecycle::Fixed(v) => v,
        Lifecycle::FollowMoto(endpoint) => {
            let http = reqwest::Client::new();
            match crate::aws::instance_info(&http, &endpoint, &instance_id).await {
                Ok(Some(info)) if info.lifecycle_state.starts_with("Terminating") => {
                    Some("Terminated".to_string())
                }
                Ok(Some(info)) if info.lifecycle_state == "InService" => Some("InService".into()),
                Ok(Some(info)) => Some(info.lifecycle_state),
                // Gone from the group: terminated (a real IMDS would be gone too).
                Ok(None) => Some("Terminated".to_string()),
                Err(_) => state.lock().unwrap().last_lifecycle.clone(),
            }
        }
    };
    state.lock().unwrap().last_lifecycle = value.clone();
    match value {
        Some(v) => text(v),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn document(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let s = state.lock().unwrap();
    let id = &s.identity;
    axum::Json(serde_json::json!({
        "instanceId": id.instance_id,
        "instanceType": id.instance_type,
        "availabilityZone": id.az,
        "region": id.region,
        "architecture": std::env::consts::ARCH,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000);
        assert_eq!(humantime_seconds(t), "2026-11-23T10:00:00Z");
        assert_eq!(
            humantime_seconds(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }

    #[tokio::test]
    async fn gets_need_a_token_from_put() {
        let imds = Imds::start(Identity::new("i-0123")).await;
        let http = reqwest::Client::new();
        let url = format!("{}/latest/meta-data/instance-id", imds.endpoint);
        assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
        let no_ttl = http
            .put(format!("{}/latest/api/token", imds.endpoint))
            .send()
            .await
            .unwrap();
        assert_eq!(no_ttl.status(), 400);
        let token = http
            .put(format!("{}/latest/api/token", imds.endpoint))
            .header(TTL_HEADER, "60")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let got = http
            .get(&url)
            .header(TOKEN_HEADER, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(got.text().await.unwrap(), "i-0123");
        let spot = http
            .get(format!(
                "{}/latest/meta-data/spot/instance-action",
                imds.endpoint
            ))
            .header(TOKEN_HEADER, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(spot.status(), 404);
        imds.set_spot_interruption(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000));
        let spot = http
            .get(format!(
                "{}/latest/meta-data/spot/instance-action",
                imds.endpoint
            ))
            .header(TOKEN_HEADER, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            spot.text().await.unwrap(),
            r#"{"action":"terminate","time":"2026-11-23T10:00:00Z"}"#
        );
        assert_eq!(imds.unauthorized(), 1);
    }
}
