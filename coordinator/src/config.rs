//! The coordinator's one typed configuration, built and validated before anything binds.
//!
//! Invariant: every time setting is a `Duration`; the failure timeout never exceeds 5 s by
//! default and is always longer than the heartbeat interval (checked by `Config::check`).

use std::time::Duration;

/// Settings of one coordinator process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// How often workers heartbeat (sent to them in `Registered`).
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is lost, unless its job's manifest sets its own.
    pub failure_timeout: Duration,
    /// How often the liveness check and scheduler run on their own (they also run on events).
    pub tick: Duration,
    /// How long `run` waits for in-flight RPCs and store writes after shutdown begins.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            failure_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Rejects settings that cannot work together, naming the setting.
    pub fn check(&self) -> Result<(), crate::Error> {
        if self.heartbeat_interval.is_zero() {
            return Err(crate::Error::Config(
                "heartbeat interval must be above 0".into(),
            ));
        }
        if self.failure_timeout <= self.heartbeat_interval {
            return Err(crate::Error::Config(format!(
                "failure timeout ({:?}) must be longer than the heartbeat interval ({:?})",
                self.failure_timeout, self.heartbeat_interval
            )));
        }
        if self.tick.is_zero() {
            return Err(crate::Error::Config("tick must be above 0".into()));
        }
        Ok(())
    }
}
