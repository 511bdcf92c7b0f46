//! The raw limits of the accept path, measured first: every rate of the accept path is read as a
//! ratio to them.

use chatcore::Config;

use crate::Bench;
use crate::load::Outcome;
use crate::raw;

/// A raw limit measured in the same run, which every rate of the accept path is compared with.
pub struct RawLimit {
    pub short_name: &'static str,
    pub rate: f64,
}

/// The raw limits of the accept path.
#[derive(Debug, Clone, Copy)]
enum RawProbe {
    SqliteCommit,
    RedisIncr,
    ConfirmedPublish,
}

impl RawProbe {
    fn name(self) -> String {
        match self {
            Self::SqliteCommit => format!(
                "sqlite durable one-row commit ({} concurrent)",
                raw::PUBLISHERS
            ),
            Self::RedisIncr => format!("redis INCR ({} concurrent)", raw::REDIS_CLIENTS),
            Self::ConfirmedPublish => format!(
                "rabbitmq confirmed publish ({} concurrent, persistent)",
                raw::PUBLISHERS
            ),
        }
    }

    /// How the ratios name it.
    fn short_name(self) -> &'static str {
        match self {
            Self::SqliteCommit => "durable commit",
            Self::RedisIncr => "INCR",
            Self::ConfirmedPublish => "confirmed publish",
        }
    }

    /// Its column of the CPU table.
    fn column(self) -> &'static str {
        match self {
            Self::SqliteCommit => "raw commit",
            Self::RedisIncr => "raw INCR",
            Self::ConfirmedPublish => "raw publish",
        }
    }

    async fn run(self, config: &Config) -> anyhow::Result<Outcome> {
        match self {
            Self::SqliteCommit => raw::sqlite_commits(config).await,
            Self::RedisIncr => raw::redis_incr(config).await,
            Self::ConfirmedPublish => raw::confirmed_publish(config).await,
        }
    }
}

impl Bench {
    pub async fn measure_raw_limits(&mut self) -> anyhow::Result<()> {
        let probes: &[RawProbe] = if self.settings.embedded() {
            &[RawProbe::SqliteCommit]
        } else {
            &[RawProbe::RedisIncr, RawProbe::ConfirmedPublish]
        };
        for &probe in probes {
            let name = probe.name();
            let (_, measured) = self
                .measure(&format!("measuring raw {name}"), probe.run(&self.config))
                .await?;
            self.raw_limits.push(RawLimit {
                short_name: probe.short_name(),
                rate: measured.rate(),
            });
            let figure = measured.figure(format!("raw: {name}"), "/s", probe.column());
            self.report.figure(figure, "1");
        }
        Ok(())
    }
}
