//! One S3 SDK client per distinct endpoint, region and addressing style,
//! shared by every `S3Storage` of a daemon.
//!
//! Loading the SDK configuration builds an HTTPS client (TLS roots, a
//! connection pool), a credentials chain and its cache. A sidecar that
//! replicates a thousand databases to one bucket needs that once, not a
//! thousand times, and a thousand connection pools hold idle connections
//! that one pool would share. Credentials come from the
//! process-wide AWS chain (environment, profile, web identity), so replicas
//! with the same endpoint, region and addressing style would load the same
//! ones anyway.
//!
//! The client carries no request counter: `S3Storage` adds its own counting
//! interceptor to each request it sends, so request counts stay per replica.
//!
//! The daemon owns one [`S3Clients`] for its lifetime and opens every
//! replica through it. It is not a process-wide cache on purpose: an HTTP
//! client's pooled connections belong to the tokio runtime that opened them,
//! and a command (or a test) that runs several runtimes must not hand one
//! runtime's connections to another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::Client;

use super::url::S3Config;

/// What makes two replicas' clients different.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    /// The `endpoint=` of the replica URL (the environment's
    /// `AWS_ENDPOINT_URL*` is the same for the whole process).
    endpoint: Option<String>,
    /// The `region=` of the replica URL (`None`: the AWS chain's).
    region: Option<String>,
    force_path_style: bool,
}

/// A client and what it resolved to, for messages.
pub(super) struct SharedClient {
    pub client: Client,
    /// The endpoint actually used (URL parameter, else AWS_ENDPOINT_URL[_S3]
    /// / profile); `None` = AWS.
    pub endpoint: Option<String>,
    pub region: String,
}

/// The clients of one daemon, one per endpoint, region and addressing style.
#[derive(Default)]
pub struct S3Clients {
    clients: tokio::sync::Mutex<HashMap<ClientKey, Arc<SharedClient>>>,
}

impl std::fmt::Debug for S3Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Clients").finish_non_exhaustive()
    }
}

impl S3Clients {
    /// How many distinct clients were built so far.
    pub async fn len(&self) -> usize {
        self.clients.lock().await.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// The client for `cfg`'s endpoint, region and addressing style, built
    /// on first use.
    pub(super) async fn get(
        &self,
        cfg: &S3Config,
        attempts: u32,
        timeouts: aws_sdk_s3::config::timeout::TimeoutConfig,
    ) -> Arc<SharedClient> {
        let key = ClientKey::of(cfg);
        // Held while building, so replicas starting together build one client.
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let c = Arc::new(build(&key, attempts, timeouts).await);
        clients.insert(key, c.clone());
        c
    }
}

impl ClientKey {
    fn of(cfg: &S3Config) -> Self {
        ClientKey {
            endpoint: cfg.endpoint.clone(),
            region: cfg.region.clone(),
            force_path_style: cfg.force_path_style,
        }
    }
}

/// A client of `cfg`'s own, for a command that opens one replica.
pub(super) async fn own_client(
    cfg: &S3Config,
    attempts: u32,
    timeouts: aws_sdk_s3::config::timeout::TimeoutConfig,
) -> Arc<SharedClient> {
    Arc::new(build(&ClientKey::of(cfg), attempts, timeouts).await)
}

async fn build(
    key: &ClientKey,
    attempts: u32,
    timeouts: aws_sdk_s3::config::timeout::TimeoutConfig,
) -> SharedClient {
    let region_chain = RegionProviderChain::first_try(key.region.clone().map(Region::new))
        .or_default_provider()
        .or_else(Region::new("us-east-1"));
    let retry = RetryConfig::standard()
        .with_max_attempts(attempts)
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(5));
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(region_chain)
        .timeout_config(timeouts.clone())
        .retry_config(retry.clone())
        .load()
        .await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".to_string());
    let endpoint = key
        .endpoint
        .clone()
        .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
        .or_else(|| sdk.endpoint_url().map(str::to_string));

    let mut b = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(key.force_path_style)
        .timeout_config(timeouts)
        .retry_config(retry);
    if let Some(e) = &key.endpoint {
        b = b.endpoint_url(e);
    }
    if endpoint.is_some() {
        // Self-hosted servers commonly reject the SDK's default streaming
        // CRC trailers (Garage: "Invalid payload signature").
        b = b
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    SharedClient {
        client: Client::from_conf(b.build()),
        endpoint,
        region,
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
