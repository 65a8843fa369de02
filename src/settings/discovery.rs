//! `[discovery]`: tracking checkouts created anywhere, found with Search Checkouts.
//!
//! Owns: the section's plain data, its defaults and its checks (types, ranges).
//! Must never: search (the discovery source does).

use std::time::Duration;

use serde::Deserialize;

use super::reconcile::MAX_PAGE_SIZE;
use super::reconcile::default_page_size;
use super::{PaymenntSettings, SettingsError, err};

/// `[discovery]`: tracking checkouts created anywhere, found with Search Checkouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySettings {
    /// On or off; unset means on when paymennt credentials are configured.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Checkout types to track (paymennt's `type`: QR, WEB, MOBILE, LINK, TERMINAL): a TOML
    /// array, or comma-separated text (as an environment variable gives it).
    #[serde(
        default = "default_discovery_types",
        deserialize_with = "list_or_comma_separated"
    )]
    pub types: Vec<String>,
    /// Time between searches.
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How far back a first round (no complete round stored) looks.
    #[serde(default = "default_discovery_lookback", with = "humantime_serde")]
    pub lookback: Duration,
    /// How far before the last complete round's start the next round searches again, for
    /// checkouts that became visible late and for clocks that disagree.
    #[serde(default = "default_discovery_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Checkouts per Search Checkouts page.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_discovery_types() -> Vec<String> {
    vec!["LINK".to_owned()]
}

fn default_discovery_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_discovery_lookback() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_discovery_overlap() -> Duration {
    Duration::from_secs(10 * 60)
}

/// A list of strings given as an array, or as one comma-separated string (the form an
/// environment variable has); blanks around items and empty items are dropped.
fn list_or_comma_separated<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(deserializer)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            enabled: None,
            types: default_discovery_types(),
            interval: default_discovery_interval(),
            lookback: default_discovery_lookback(),
            overlap: default_discovery_overlap(),
            page_size: default_page_size(),
        }
    }
}

impl DiscoverySettings {
    /// Whether discovery runs: as configured, else when paymennt credentials are set.
    pub fn is_enabled(&self, paymennt: &PaymenntSettings) -> bool {
        self.enabled
            .unwrap_or_else(|| paymennt.credentials().is_ok())
    }
}

impl DiscoverySettings {
    /// Checks the ranges and the checkout types.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        let ranges = [
            (
                "discovery.interval",
                self.interval,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            ),
            (
                "discovery.lookback",
                self.lookback,
                Duration::ZERO,
                Duration::from_secs(366 * 24 * 3600),
            ),
            (
                "discovery.overlap",
                self.overlap,
                Duration::ZERO,
                Duration::from_secs(24 * 3600),
            ),
        ];
        for (key, value, low, high) in ranges {
            if value < low || value > high {
                return Err(err(format!(
                    "{origin}: '{key}' value '{}' is out of range ({} to {})",
                    humantime::format_duration(value),
                    humantime::format_duration(low),
                    humantime::format_duration(high)
                )));
            }
        }
        for (key, value) in [("discovery.page_size", self.page_size)] {
            if !(1..=MAX_PAGE_SIZE).contains(&value) {
                return Err(err(format!(
                    "{origin}: '{key}' value '{value}' is out of range (1 to {MAX_PAGE_SIZE})"
                )));
            }
        }
        if self.types.is_empty() {
            return Err(err(format!(
                "{origin}: 'discovery.types' is empty\n\nlist at least one of {}, or set discovery.enabled = false",
                crate::domain::CHECKOUT_TYPES.join(", ")
            )));
        }
        for kind in &self.types {
            if !crate::domain::CHECKOUT_TYPES.contains(&kind.as_str()) {
                return Err(err(format!(
                    "{origin}: 'discovery.types' has unknown type '{}'\n\nknown types: {}",
                    crate::domain::printable(kind),
                    crate::domain::CHECKOUT_TYPES.join(", ")
                )));
            }
        }
        Ok(())
    }
}
