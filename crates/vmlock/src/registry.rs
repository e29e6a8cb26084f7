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

/// Refuses keys of `config` outside `known`; drivers call this first so a typo is an error, not a
/// silently ignored option.
pub fn check_config_keys(driver: &str, config: &DriverConfig, known: &[&str]) -> Result<()> {
    for key in config.keys() {
        if !known.contains(&key.as_str()) {
            return Err(Error::Config {
                source_name: format!("{driver} driver configuration"),
                reason: format!(
                    "unknown key \"{key}\" (known: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(e.to_string().contains("colour"), "{e}");
        let e = r.load_with_toml("nop", "nop.toml", "=").unwrap_err();
        assert!(e.to_string().contains("nop.toml"), "{e}");
    }
}
