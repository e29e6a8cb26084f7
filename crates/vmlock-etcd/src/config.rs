//! The etcd backend's configuration, as etcd users expect it: endpoints, prefix, TTL, host name,
//! TLS client certificate/key/CA, user and password.

use crate::Error;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Bound on the rate difference between this host's `CLOCK_BOOTTIME` and the etcd leader's clock
/// (ρ of the timing rule): 10⁻³, far above what NTP-less quartz drifts (≈ 10⁻⁵).
pub const CLOCK_RATE_BOUND: f64 = 1e-3;

/// The etcd configuration of one host. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client URLs of the cluster's members (`http://HOST:PORT`; `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Every key vmlock writes lives under this prefix (default `/vmlock`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This host's name, written into every lock's value so conflicts name it (vmlockd fills in
    /// its own `host_name` when this is left out).
    #[serde(default)]
    pub host: String,
    /// The host lease's TTL in seconds, as asked for (the server may raise it to its minimum,
    /// 2 s at etcd's default election timeout; the granted TTL is what the deadline uses).
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// The keep-alive interval K in milliseconds (default: TTL / 5, 2 s at TTL 10).
    #[serde(default)]
    pub keepalive_interval_ms: Option<u64>,
    /// ε of the timing rule in milliseconds: the fencing deadline is this much earlier than the
    /// earliest moment the cluster may expire the lease (default 1000).
    #[serde(default = "default_margin_ms")]
    pub margin_ms: u64,
    /// T_stop of the timing rule in milliseconds: how long before the fencing deadline vmlockd
    /// starts stopping the guests that use the lease's keys, so that they are gone by it
    /// (default 2000).
    #[serde(default = "default_fence_lead_ms")]
    pub fence_lead_ms: u64,
    /// Bound on one request, retries on other members included (default 5000 ms: long enough to
    /// ride out a leader election at etcd's default 1 s election timeout).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Bound on reaching the cluster when connecting (default 5000 ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// PEM CA certificate that signed the members' certificates (TLS; endpoints `https://`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (TLS client authentication; with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd user (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// The user's password.
    #[serde(default)]
    pub password: Option<String>,
}

fn default_prefix() -> String {
    "/vmlock".to_owned()
}
fn default_ttl() -> u64 {
    10
}
fn default_margin_ms() -> u64 {
    1000
}
fn default_fence_lead_ms() -> u64 {
    2000
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_connect_timeout_ms() -> u64 {
    5000
}

impl Config {
    /// A configuration with every default: endpoints and host name given.
    pub fn new(endpoints: Vec<String>, host: &str) -> Self {
        Config {
            endpoints,
            prefix: default_prefix(),
            host: host.to_owned(),
            ttl: default_ttl(),
            keepalive_interval_ms: None,
            margin_ms: default_margin_ms(),
            fence_lead_ms: default_fence_lead_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password: None,
        }
    }

    /// Parses TOML and validates it.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let c: Config = toml_from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// The keep-alive interval K.
    pub fn keepalive_interval(&self) -> Duration {
        self.keepalive_interval_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| Duration::from_secs(self.ttl) / 5)
    }

    /// ε of the timing rule.
    pub fn margin(&self) -> Duration {
        Duration::from_millis(self.margin_ms)
    }

    /// T_stop: fencing starts this long before the deadline.
    pub fn fence_lead(&self) -> Duration {
        Duration::from_millis(self.fence_lead_ms)
    }

    /// Bound on one request.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Bound on one try of a request: a quarter of the request timeout, at least 500 ms. A try
    /// sent to a member just as its leader died can hang until etcd's own timeout; another try
    /// (maybe on another member) is safe because every operation recognises its own earlier
    /// success.
    pub fn attempt_timeout(&self) -> Duration {
        (self.request_timeout() / 4).max(Duration::from_millis(500))
    }

    /// Bound on reaching the cluster at connect.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The endpoints as one string, for messages.
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    /// Checks what serde cannot: endpoints, prefix, host name, that the timing rule leaves room
    /// for at least one keep-alive before the deadline, credentials given in pairs.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("endpoints: at least one, none empty".into());
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 || self.prefix.ends_with('/') {
            return bad(format!(
                "prefix {:?}: must start with '/', not end with '/', and not be '/'",
                self.prefix
            ));
        }
        // The host name is part of every key (`…/UUID@HOST`) and of a migration's hand-over
        // token (`SECRET~HOST~REVISIONS`): only a host name's own characters.
        let host_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if self.host.is_empty()
            || self.host.len() > 253
            || !self.host.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !self.host.chars().all(host_char)
        {
            return bad(format!(
                "host {:?}: a host name (letters, digits, '.', '-', '_'; at most 253; set `host` \
                 in [etcd] if the kernel's is not one)",
                self.host
            ));
        }
        if self.ttl < 2 {
            return bad(format!("ttl {} s: at least 2 (etcd's minimum)", self.ttl));
        }
        let usable = Duration::from_secs(self.ttl).mul_f64(1.0 - CLOCK_RATE_BOUND);
        let k = self.keepalive_interval();
        if k.is_zero() || self.margin() + k >= usable {
            return bad(format!(
                "keep-alive interval {k:?} + margin {:?} must be below TTL·(1−ρ) = {usable:?}",
                self.margin()
            ));
        }
        if self.fence_lead() + self.margin() + k >= usable {
            return bad(format!(
                "fence lead {:?} + keep-alive interval {k:?} + margin {:?} must be below \
                 TTL·(1−ρ) = {usable:?}: a lease would be fenced before its first renewal",
                self.fence_lead(),
                self.margin()
            ));
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return bad("request_timeout_ms and connect_timeout_ms must be > 0".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("user and password go together".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and key_file go together".into());
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        let https = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if https && !tls {
            return bad("https:// endpoints need ca_file".into());
        }
        if tls && self.endpoints.iter().any(|e| !e.starts_with("https://")) {
            return bad("with TLS every endpoint must be https://".into());
        }
        Ok(())
    }
}

fn toml_from_str(text: &str) -> Result<Config, Error> {
    // serde's own error text names the unknown or missing key and its line.
    toml_parse(text).map_err(Error::Config)
}

fn toml_parse(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = Config::from_toml("endpoints = [\"http://127.0.0.1:2379\"]\nhost = \"a\"\n")
            .expect("parse");
        assert_eq!(c.ttl, 10);
        assert_eq!(c.prefix, "/vmlock");
        assert_eq!(c.keepalive_interval(), Duration::from_secs(2));
        let e = Config::from_toml("endpoints = [\"x:1\"]\nhost = \"a\"\nttl_s = 3\n")
            .expect_err("unknown key");
        assert!(e.to_string().contains("ttl_s"), "{e}");
    }

    #[test]
    fn timing_must_leave_room() {
        let mut c = Config::new(vec!["127.0.0.1:2379".into()], "a");
        c.ttl = 2;
        c.margin_ms = 1700;
        assert!(c.validate().is_err());
        c.margin_ms = 500;
        assert!(
            c.validate().is_err(),
            "2 s fence lead leaves no room at TTL 2"
        );
        c.fence_lead_ms = 800;
        c.validate()
            .expect("2 s TTL, 0.4 s K, 0.5 s margin, 0.8 s fence lead");
        c.user = Some("u".into());
        assert!(c.validate().is_err(), "user without password");
    }

    #[test]
    fn a_host_name_that_would_break_keys_or_tokens_is_refused() {
        for host in ["h1", "node-2.example.org", "a_b"] {
            Config::new(vec!["127.0.0.1:2379".into()], host)
                .validate()
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        for host in [
            "",
            "a~b",
            "a/b",
            "a@b",
            "-a",
            "a b",
            "a\nb",
            &"a".repeat(254),
        ] {
            assert!(
                Config::new(vec!["127.0.0.1:2379".into()], host)
                    .validate()
                    .is_err(),
                "{host:?} accepted"
            );
        }
    }
}
