//! Reads settings through their declarations ([`super::settings`]) from one source of values.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::SecretUrl;
use super::settings::{Bounds, Setting};

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub(super) name: &'static str,
    pub(super) value: String,
    pub(super) reason: String,
}

impl ConfigError {
    pub(super) fn new(setting: &Setting, value: impl ToString, reason: &str) -> Self {
        Self {
            name: setting.name,
            value: value.to_string(),
            reason: reason.to_owned(),
        }
    }
}

/// Reads settings through their declarations from one source of values.
pub(super) struct Reader<F: Fn(&str) -> Option<String>> {
    pub(super) lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    /// The value set, if any (empty counts as unset: what a chart's empty string means).
    fn raw(&self, setting: &Setting) -> Option<String> {
        (self.lookup)(setting.name).filter(|value| !value.is_empty())
    }

    /// The value set or the declared default value.
    fn raw_or_default(&self, setting: &Setting) -> Result<String, ConfigError> {
        match (self.raw(setting), setting.default_value()) {
            (Some(value), _) => Ok(value),
            (None, Some(default)) => Ok(default.to_owned()),
            (None, None) => Err(ConfigError::new(
                setting,
                "",
                "is declared without a default value, so it must be read as optional",
            )),
        }
    }

    pub(super) fn text(&self, setting: &Setting) -> Result<String, ConfigError> {
        self.raw_or_default(setting)
    }

    pub(super) fn url(&self, setting: &Setting) -> Option<SecretUrl> {
        self.raw(setting).map(SecretUrl::new)
    }

    /// A value of any type that parses from text (addresses, switches, names).
    pub(super) fn parse<T>(&self, setting: &Setting) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let value = self.raw_or_default(setting)?;
        parsed(setting, value)
    }

    pub(super) fn optional<T>(&self, setting: &Setting) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.raw(setting)
            .map(|value| parsed(setting, value))
            .transpose()
    }

    /// As [`Self::optional`], for a secret: a refused value is not repeated in the error (start-up
    /// errors end up in logs).
    pub(super) fn secret<T>(&self, setting: &Setting) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional(setting).map_err(|error| ConfigError {
            value: "(a secret, not shown)".to_owned(),
            ..error
        })
    }

    /// A number within the declared bounds and the range of `T`.
    pub(super) fn number<T: TryFrom<u64>>(&self, setting: &Setting) -> Result<T, ConfigError> {
        let value: u64 = self.parse(setting)?;
        within_bounds(setting, value)
    }

    /// A number whose default is computed from other settings.
    pub(super) fn number_or<T: TryFrom<u64>>(
        &self,
        setting: &Setting,
        derived: u64,
    ) -> Result<T, ConfigError> {
        let value = match self.raw(setting) {
            Some(value) => parsed(setting, value)?,
            None => derived,
        };
        within_bounds(setting, value)
    }

    pub(super) fn millis(&self, setting: &Setting) -> Result<Duration, ConfigError> {
        self.number(setting).map(Duration::from_millis)
    }

    pub(super) fn seconds(&self, setting: &Setting) -> Result<Duration, ConfigError> {
        self.number(setting).map(Duration::from_secs)
    }
}

fn parsed<T>(setting: &Setting, value: String) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    value.parse().map_err(|error: T::Err| ConfigError {
        name: setting.name,
        reason: error.to_string(),
        value,
    })
}

fn within_bounds<T: TryFrom<u64>>(setting: &Setting, value: u64) -> Result<T, ConfigError> {
    let Bounds { min, max } = setting.bounds;
    if value < min {
        return Err(ConfigError::new(
            setting,
            value,
            &format!("must be at least {min}"),
        ));
    }
    if value > max {
        return Err(ConfigError::new(
            setting,
            value,
            &format!("must be at most {max}"),
        ));
    }
    T::try_from(value)
        .map_err(|_| ConfigError::new(setting, value, "is too large for this setting"))
}
