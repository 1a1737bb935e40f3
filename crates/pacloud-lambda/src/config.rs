//! The function's configuration, read only from environment variables (the
//! CloudFormation template sets them). Parsing is a pure function of a
//! variable lookup, so every rule is unit-tested without touching the
//! process environment.
//!
//! | variable | meaning |
//! |---|---|
//! | `PACLOUD_TABLE` | DynamoDB table of build records (required) |
//! | `PACLOUD_QUEUE_URL` | SQS job queue URL (required) |
//! | `PACLOUD_BUCKET` | S3 artifact bucket (required) |
//! | `PACLOUD_DLQ_URL` | dead-letter queue URL (optional) |
//! | `PACLOUD_SCALER_EVENTS_URL` | the fleet scaler's events queue: a nudge after each job made visible (optional) |
//! | `PACLOUD_URL_TTL_SECS` | presigned URL lifetime, 1..=3600, default 900 |
//! | `PACLOUD_TOKENS` | comma-separated bearer tokens that may start builds; empty = everyone may |
//! | `PACLOUD_BASE_PATH` | link prefix such as an API Gateway stage `/prod`; also stripped from incoming paths |
//! | `PACLOUD_TARGETS` | JSON `{"default": name, "targets": {name: TargetSpec}}`; absent = the built-in target |
//! | `PACLOUD_MAX_ATTEMPTS` | claims after which an abandoned build is failed, not queued again; the queue's maxReceiveCount, default 5 |
//! | `PACLOUD_REQUEUE_AFTER_SECS` | re-send a `queued` record's message after this long, default 900 |
//! | `PACLOUD_POLL_AFTER_SECS` | `Retry-After` advised to pending clients, default 5 |
//! | `PACLOUD_READY_CACHE_ENTRIES` | ready records kept in memory per instance, default 10000 (0 = off) |
//! | `PACLOUD_S3_FORCE_PATH_STYLE` | path-style S3 URLs (moto, S3-compatible stores), default false |
//!
//! The AWS endpoint, region and credentials are not pacloud settings: the
//! SDK's default chain reads `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` (set by Lambda) and
//! `AWS_ENDPOINT_URL` (tests point it at moto).

use std::collections::BTreeMap;
use std::time::Duration;

use pacloud_aws::AwsConfig;
use pacloud_domain::service::ServiceConfig;
use pacloud_domain::target::TargetSpec;
use pacloud_domain::{Target, TargetName, TargetSet};
use serde::Deserialize;

/// Longest presigned URL lifetime (S3 presigning with Lambda's temporary
/// credentials cannot outlive them anyway).
pub const MAX_URL_TTL_SECS: u64 = 3600;

/// Everything the function is configured with.
#[derive(Debug, Clone)]
pub struct LambdaConfig {
    pub aws: AwsConfig,
    /// Bearer tokens that may start builds; empty means every caller may.
    pub tokens: Vec<String>,
    /// `""` or `/stage`: prefixed to every link, stripped from request paths.
    pub base_path: String,
    pub targets: TargetSet,
    pub service: ServiceConfig,
}

/// A configuration mistake; the message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: &'static str },
    #[error("{name}={value:?} is not valid: expected {expected}")]
    Invalid { name: &'static str, value: String, expected: String },
}

fn invalid(name: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    // Values can be long JSON; keep messages readable.
    let shown: String = value.chars().take(200).collect();
    ConfigError::Invalid { name, value: shown, expected: expected.into() }
}

/// The `PACLOUD_TARGETS` document.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetsDoc {
    #[serde(default)]
    default: Option<String>,
    targets: BTreeMap<String, TargetSpec>,
}

impl LambdaConfig {
    /// Reads the configuration through `env` (`std::env::var` in the
    /// binary). Empty values count as unset.
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Result<LambdaConfig, ConfigError> {
        let get = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let required = |name: &'static str| get(name).ok_or(ConfigError::Missing { name });
        let secs = |name: &'static str, default: u64, max: u64| -> Result<Duration, ConfigError> {
            match get(name) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(Duration::from_secs(n)),
                    _ => Err(invalid(name, &v, format!("whole seconds from 1 to {max}"))),
                },
            }
        };

        let table = required("PACLOUD_TABLE")?;
        let queue_url = required("PACLOUD_QUEUE_URL")?;
        let bucket = required("PACLOUD_BUCKET")?;
        let dlq_url = get("PACLOUD_DLQ_URL");
        let scaler_events_url = get("PACLOUD_SCALER_EVENTS_URL");
        let url_ttl = secs("PACLOUD_URL_TTL_SECS", 900, MAX_URL_TTL_SECS)?;
        let requeue_after = secs("PACLOUD_REQUEUE_AFTER_SECS", 900, u64::from(u32::MAX))?;
        let poll_after = secs("PACLOUD_POLL_AFTER_SECS", 5, 3600)?;
        let max_attempts = match get("PACLOUD_MAX_ATTEMPTS") {
            None => 5,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(invalid("PACLOUD_MAX_ATTEMPTS", &v, "a whole number of at least 1")),
            },
        };
        let ready_cache_entries = match get("PACLOUD_READY_CACHE_ENTRIES") {
            None => 10_000,
            Some(v) => v.parse::<usize>().map_err(|_| invalid("PACLOUD_READY_CACHE_ENTRIES", &v, "a whole number"))?,
        };
        let force_path_style = match get("PACLOUD_S3_FORCE_PATH_STYLE") {
            None => false,
            Some(v) => parse_bool(&v).ok_or_else(|| invalid("PACLOUD_S3_FORCE_PATH_STYLE", &v, "true or false"))?,
        };
        let tokens = get("PACLOUD_TOKENS")
            .map(|v| v.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let base_path = match get("PACLOUD_BASE_PATH") {
            None => String::new(),
            Some(v) => parse_base_path(&v).ok_or_else(|| {
                invalid("PACLOUD_BASE_PATH", &v, "a path such as /prod (letters, digits, - _ . ~ / only)")
            })?,
        };
        let targets = match get("PACLOUD_TARGETS") {
            None => TargetSet::builtin(),
            Some(v) => parse_targets(&v)?,
        };

        Ok(LambdaConfig {
            aws: AwsConfig {
                table,
                queue_url,
                dlq_url,
                bucket,
                // The SDK's default chain: AWS_ENDPOINT_URL, AWS_REGION and
                // the credential variables Lambda sets.
                endpoint_url: None,
                region: None,
                static_credentials: None,
                force_path_style,
                url_ttl,
                scaler_events_url,
            },
            tokens,
            base_path,
            targets,
            service: ServiceConfig { url_ttl, requeue_after, poll_after, ready_cache_entries, max_attempts },
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `/prod`, `/prod/` -> `/prod`; `/` -> ``; anything not a plain absolute
/// path -> None.
fn parse_base_path(v: &str) -> Option<String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '/');
    if !v.starts_with('/') || !v.chars().all(ok_char) || v.contains("//") {
        return None;
    }
    let trimmed = v.trim_end_matches('/');
    if trimmed.split('/').any(|seg| seg == "." || seg == "..") {
        return None;
    }
    Some(trimmed.to_owned())
}

/// The targets document: the built-in `default` target is kept unless a
/// target of that name is given (as in `pacloud serve`'s settings file);
/// `default` names the default target (`"default"` when omitted).
fn parse_targets(v: &str) -> Result<TargetSet, ConfigError> {
    const NAME: &str = "PACLOUD_TARGETS";
    let doc: TargetsDoc = serde_json::from_str(v)
        .map_err(|e| invalid(NAME, v, format!("JSON {{\"default\": name, \"targets\": {{name: target}}}} ({e})")))?;
    let mut targets: Vec<Target> = TargetSet::builtin().iter().cloned().collect();
    for (name, spec) in doc.targets {
        let tn: TargetName =
            name.parse().map_err(|e| invalid(NAME, v, format!("a valid target name ({name:?}: {e})")))?;
        targets.retain(|t| t.name != tn);
        targets.push(Target::new(tn, spec).map_err(|e| invalid(NAME, v, format!("valid targets ({e})")))?);
    }
    let default = doc.default.unwrap_or_else(|| "default".into());
    let dn: TargetName =
        default.parse().map_err(|e| invalid(NAME, v, format!("a valid default target name ({default:?}: {e})")))?;
    TargetSet::new(dn, targets).map_err(|e| invalid(NAME, v, format!("a default that names a target ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    const BASE: [(&str, &str); 3] =
        [("PACLOUD_TABLE", "t"), ("PACLOUD_QUEUE_URL", "https://sqs/q"), ("PACLOUD_BUCKET", "b")];

    fn with(extra: &[(&str, &str)]) -> Result<LambdaConfig, ConfigError> {
        let mut all = BASE.to_vec();
        all.extend_from_slice(extra);
        LambdaConfig::from_lookup(lookup(&all))
    }

    #[test]
    fn defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c.aws.table, "t");
        assert_eq!(c.aws.queue_url, "https://sqs/q");
        assert_eq!(c.aws.bucket, "b");
        assert_eq!(c.aws.dlq_url, None);
        assert_eq!(c.aws.endpoint_url, None, "the SDK reads AWS_ENDPOINT_URL itself");
        assert!(!c.aws.force_path_style);
        assert_eq!(c.service.url_ttl, Duration::from_secs(900));
        assert_eq!(c.aws.url_ttl, Duration::from_secs(900));
        assert_eq!(c.service.requeue_after, Duration::from_secs(900));
        assert!(c.tokens.is_empty());
        assert_eq!(c.base_path, "");
        assert_eq!(c.targets.default_name().as_str(), "default");
    }

    #[test]
    fn each_required_variable_is_named() {
        for name in ["PACLOUD_TABLE", "PACLOUD_QUEUE_URL", "PACLOUD_BUCKET"] {
            let rest: Vec<_> = BASE.iter().copied().filter(|(k, _)| *k != name).collect();
            let e = LambdaConfig::from_lookup(lookup(&rest)).unwrap_err();
            assert!(matches!(e, ConfigError::Missing { name: n } if n == name), "{e}");
            assert!(e.to_string().contains(name));
            // Blank counts as unset.
            let mut blank = rest.clone();
            blank.push((name, "  "));
            assert!(matches!(LambdaConfig::from_lookup(lookup(&blank)), Err(ConfigError::Missing { .. })));
        }
    }

    #[test]
    fn url_ttl_bounds() {
        assert_eq!(with(&[("PACLOUD_URL_TTL_SECS", "3600")]).unwrap().service.url_ttl, Duration::from_secs(3600));
        assert_eq!(with(&[("PACLOUD_URL_TTL_SECS", "60")]).unwrap().aws.url_ttl, Duration::from_secs(60));
        for bad in ["3601", "0", "-5", "soon", "1.5"] {
            let e = with(&[("PACLOUD_URL_TTL_SECS", bad)]).unwrap_err();
            assert!(e.to_string().contains("PACLOUD_URL_TTL_SECS"), "{e}");
        }
    }

    #[test]
    fn tokens_dlq_path_style_requeue() {
        let c = with(&[
            ("PACLOUD_TOKENS", " a, b ,,c "),
            ("PACLOUD_DLQ_URL", "https://sqs/dlq"),
            ("PACLOUD_S3_FORCE_PATH_STYLE", "TRUE"),
            ("PACLOUD_REQUEUE_AFTER_SECS", "30"),
            ("PACLOUD_READY_CACHE_ENTRIES", "0"),
        ])
        .unwrap();
        assert_eq!(c.tokens, ["a", "b", "c"]);
        assert_eq!(c.aws.dlq_url.as_deref(), Some("https://sqs/dlq"));
        assert!(c.aws.force_path_style);
        assert_eq!(c.service.requeue_after, Duration::from_secs(30));
        assert_eq!(c.service.ready_cache_entries, 0);
        assert!(with(&[("PACLOUD_TOKENS", " , ")]).unwrap().tokens.is_empty());
        assert!(with(&[("PACLOUD_S3_FORCE_PATH_STYLE", "maybe")]).is_err());
        assert!(with(&[("PACLOUD_REQUEUE_AFTER_SECS", "0")]).is_err());
    }

    #[test]
    fn base_path() {
        for (v, want) in [("/prod", "/prod"), ("/prod/", "/prod"), ("/", ""), ("/a/b-c_d.e", "/a/b-c_d.e")] {
            assert_eq!(with(&[("PACLOUD_BASE_PATH", v)]).unwrap().base_path, want, "{v}");
        }
        for bad in ["prod", "/pr od", "/a?b", "//x", "/a/../b", "/é"] {
            assert!(with(&[("PACLOUD_BASE_PATH", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_json() {
        let spec = serde_json::to_value(&Target::builtin_default().spec).unwrap();
        let mut arm = spec.clone();
        arm["chost"] = "aarch64-unknown-linux-gnu".into();
        let doc = serde_json::json!({"default": "arm64", "targets": {"arm64": arm}}).to_string();
        let c = with(&[("PACLOUD_TARGETS", &doc)]).unwrap();
        assert_eq!(c.targets.default_name().as_str(), "arm64");
        assert!(c.targets.get(&"default".parse().unwrap()).is_some(), "built-in target kept");
        assert_eq!(c.targets.get(&"arm64".parse().unwrap()).unwrap().spec.chost, "aarch64-unknown-linux-gnu");

        // Without "default", the built-in name stays the default.
        let doc = serde_json::json!({"targets": {"arm64": arm}}).to_string();
        assert_eq!(with(&[("PACLOUD_TARGETS", &doc)]).unwrap().targets.default_name().as_str(), "default");

        for bad in [
            "not json".to_owned(),
            serde_json::json!({"default": "nope", "targets": {}}).to_string(),
            serde_json::json!({"targets": {"Bad Name": spec}}).to_string(),
            serde_json::json!({"targets": {"x": {"profile": "p"}}}).to_string(),
            serde_json::json!({"targets": {}, "extra": 1}).to_string(),
        ] {
            let e = with(&[("PACLOUD_TARGETS", &bad)]).unwrap_err();
            assert!(e.to_string().contains("PACLOUD_TARGETS"), "{e}");
        }
    }
}
