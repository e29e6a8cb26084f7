//! The driver registry: drivers loaded by name with their configuration (the seed's
//! `virLockManagerPluginLoad`/`Unload`). `nop` is built in; other crates add their drivers with
//! [`Registry::register`].

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::nop::NopDriver;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A driver's configuration: a TOML table (empty when no file was given).
pub type DriverConfig = toml::Table;

/// Builds a driver from its configuration, refusing unknown keys and bad values.
pub type DriverFactory = fn(&DriverConfig) -> Result<Arc<dyn Driver>>;

/// Knows every driver by name and loads them.
pub struct Registry {
    factories: BTreeMap<&'static str, DriverFactory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("drivers", &self.factories.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry with the built-in `nop` driver.
    pub fn new() -> Self {
        let mut r = Registry {
            factories: BTreeMap::new(),
        };
        r.register("nop", NopDriver::from_config);
        r
    }

    /// Adds (or replaces) a driver.
    pub fn register(&mut self, name: &'static str, factory: DriverFactory) {
        self.factories.insert(name, factory);
    }

    /// Names of the registered drivers.
    pub fn names(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }

    /// Loads driver `name` with `config`.
    pub fn load(&self, name: &str, config: &DriverConfig) -> Result<Plugin> {
        let factory = self
            .factories
            .get(name)
            .ok_or_else(|| Error::UnknownDriver {
                name: name.to_owned(),
                available: self.names().join(", "),
            })?;
        Ok(Plugin {
            driver: factory(config)?,
        })
    }

    /// Loads driver `name` with the TOML text of its configuration file.
    pub fn load_with_toml(&self, name: &str, source_name: &str, text: &str) -> Result<Plugin> {
        let config: DriverConfig = text.parse().map_err(|e: toml::de::Error| Error::Config {
            source_name: source_name.to_owned(),
            reason: e.message().to_owned(),
        })?;
        self.load(name, &config)
    }
}

/// A loaded driver. Cloning shares it; [`Plugin::unload`] ends it.
#[derive(Debug, Clone)]
pub struct Plugin {
    driver: Arc<dyn Driver>,
}

impl Plugin {
    /// A plugin around a driver built by hand (tests, embedding).
    pub fn from_driver(driver: Arc<dyn Driver>) -> Self {
        Plugin { driver }
    }

    /// The driver.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// Unloads the driver (the seed's `PluginUnload`). Managers already created keep working
    /// until they are dropped, since they share the driver.
    pub fn unload(self) -> Result<()> {
        self.driver.unload()
    }
}

/// Reads a driver's configuration into its serde struct. Drivers declare that struct with
/// `#[serde(deny_unknown_fields)]`, so a typo is an error naming the key, not a silently ignored
/// option; a value of the wrong type names the key too.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    driver: &str,
    config: &DriverConfig,
) -> Result<T> {
    let source_name = format!("{driver} driver configuration");
    // Through the text rather than the table: toml's errors then carry a span (see parse_toml).
    let text = toml::to_string(config).map_err(|e| Error::Config {
        source_name: source_name.clone(),
        reason: e.to_string(),
    })?;
    parse_toml(&source_name, &text)
}

/// Parses TOML `text` (from `source_name`) into `T`; an error names the key at fault, since the
/// span's line names the key of a bad value, which a type error's message alone does not.
pub fn parse_toml<T: serde::de::DeserializeOwned>(source_name: &str, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let message = e.message().to_owned();
        let key = e.span().and_then(|span| {
            let line_start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
            let (key, _) = text.get(line_start..)?.split_once('=')?;
            Some(key.trim().trim_matches('"').to_owned())
        });
        let reason = match key {
            Some(key) if !key.is_empty() && !message.contains(&format!("`{key}`")) => {
                format!("{key}: {message}")
            }
            _ => message,
        };
        Error::Config {
            source_name: source_name.to_owned(),
            reason,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read only through Debug
    struct Example {
        path: Option<String>,
        count: Option<u32>,
    }

    #[test]
    fn parse_config_names_unknown_keys_and_bad_values() {
        let table = |t: &str| t.parse::<DriverConfig>().unwrap();
        let e = parse_config::<Example>("ex", &table("path = \"/a\"\npaht = 1")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("ex driver configuration") && text.contains("unknown field `paht`"),
            "{text}"
        );
        let e = parse_config::<Example>("ex", &table("count = \"x\"")).unwrap_err();
        assert!(e.to_string().contains("count"), "{e}");
        let ok: Example = parse_config("ex", &table("count = 3")).unwrap();
        assert_eq!(ok.count, Some(3));
    }

    #[test]
    fn loads_nop_and_refuses_unknown_driver() {
        let r = Registry::new();
        let p = r.load("nop", &DriverConfig::new()).unwrap();
        assert_eq!(p.driver().name(), "nop");
        p.unload().unwrap();
        let e = r.load("sync-manager", &DriverConfig::new()).unwrap_err();
        assert!(
            e.to_string().contains("sync-manager") && e.to_string().contains("nop"),
            "{e}"
        );
    }

    #[test]
    fn refuses_unknown_config_keys_and_bad_toml() {
        let r = Registry::new();
        let e = r
            .load_with_toml("nop", "nop.toml", "colour = 1")
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown field `colour`"),
            "the error names the key: {e}"
        );
        let e = r.load_with_toml("nop", "nop.toml", "=").unwrap_err();
        assert!(e.to_string().contains("nop.toml"), "{e}");
    }
}
