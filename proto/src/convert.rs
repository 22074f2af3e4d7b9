//! Conversions between wire types and domain values: milliseconds to `Duration`/`SystemTime`,
//! enum values to the names users see (`Pending`, `cpu`), and small constructors for the session
//! messages.
//!
//! Invariant: an UNSPECIFIED or unknown enum value on the wire is an error here, never silently a
//! default; names round-trip (`parse(name(x)) == x`).

use crate::pb;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a wire value could not become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required message field was absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// An enum field held 0 (UNSPECIFIED) or a number this build does not know.
    #[error("field `{field}` has unknown or unspecified value {value}")]
    BadEnum {
        /// Name of the field.
        field: &'static str,
        /// The number found on the wire.
        value: i32,
    },
    /// A name (e.g. from the CLI or a manifest) is not one of the known ones.
    #[error("unknown {what} `{name}` (expected one of: {expected})")]
    UnknownName {
        /// What kind of name it should have been.
        what: &'static str,
        /// The name given.
        name: String,
        /// The accepted names, comma separated.
        expected: &'static str,
    },
    /// Stored or received bytes are not a valid protobuf encoding of the expected message.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// The record or message that was expected.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
}

/// Milliseconds on the wire to a `Duration`.
pub fn duration_from_ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A `Duration` to milliseconds on the wire (saturating at `u64::MAX`).
pub fn duration_to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Unix milliseconds on the wire to a `SystemTime`.
pub fn time_from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A `SystemTime` to Unix milliseconds (0 for times before the epoch).
pub fn time_to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(duration_to_ms)
        .unwrap_or(0)
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    time_to_unix_ms(SystemTime::now())
}

impl pb::JobPhase {
    /// All phases a job can be in, in lifecycle order.
    pub const ALL: [pb::JobPhase; 7] = [
        pb::JobPhase::Pending,
        pb::JobPhase::Scheduled,
        pb::JobPhase::Running,
        pb::JobPhase::Succeeded,
        pb::JobPhase::Failed,
        pb::JobPhase::Cancelled,
        pb::JobPhase::Recovering,
    ];

    /// The name users see (`Pending`, `Running`, ...).
    pub fn name(self) -> &'static str {
        match self {
            pb::JobPhase::Unspecified => "Unspecified",
            pb::JobPhase::Pending => "Pending",
            pb::JobPhase::Scheduled => "Scheduled",
            pb::JobPhase::Running => "Running",
            pb::JobPhase::Succeeded => "Succeeded",
            pb::JobPhase::Failed => "Failed",
            pb::JobPhase::Cancelled => "Cancelled",
            pb::JobPhase::Recovering => "Recovering",
        }
    }

    /// Parses a name produced by [`pb::JobPhase::name`] (case-insensitive).
    pub fn parse(name: &str) -> Result<Self, ConvertError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| ConvertError::UnknownName {
                what: "job phase",
                name: name.to_owned(),
                expected: "Pending, Scheduled, Running, Succeeded, Failed, Cancelled, Recovering",
            })
    }

    /// Reads the enum number of a wire field.
    pub fn from_wire(field: &'static str, value: i32) -> Result<Self, ConvertError> {
        match pb::JobPhase::try_from(value) {
            Ok(pb::JobPhase::Unspecified) | Err(_) => Err(ConvertError::BadEnum { field, value }),
            Ok(p) => Ok(p),
        }
    }

    /// Whether the job can no longer change (Succeeded, Failed or Cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            pb::JobPhase::Succeeded | pb::JobPhase::Failed | pb::JobPhase::Cancelled
        )
    }
}

impl pb::DeviceKind {
    /// The name used in manifests and on the CLI (`cpu`, `cuda`, `simulated`).
    pub fn name(self) -> &'static str {
        match self {
            pb::DeviceKind::Unspecified => "unspecified",
            pb::DeviceKind::Cpu => "cpu",
            pb::DeviceKind::Cuda => "cuda",
            pb::DeviceKind::Simulated => "simulated",
        }
    }

    /// Parses `cpu`, `cuda` or `simulated` (case-insensitive).
    pub fn parse(name: &str) -> Result<Self, ConvertError> {
        [
            pb::DeviceKind::Cpu,
            pb::DeviceKind::Cuda,
            pb::DeviceKind::Simulated,
        ]
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| ConvertError::UnknownName {
            what: "device kind",
            name: name.to_owned(),
            expected: "cpu, cuda, simulated",
        })
    }

    /// Reads the enum number of a wire field.
    pub fn from_wire(field: &'static str, value: i32) -> Result<Self, ConvertError> {
        match pb::DeviceKind::try_from(value) {
            Ok(pb::DeviceKind::Unspecified) | Err(_) => Err(ConvertError::BadEnum { field, value }),
            Ok(k) => Ok(k),
        }
    }
}

impl pb::WorkerState {
    /// The name users see (`Idle`, `Busy`, `Lost`).
    pub fn name(self) -> &'static str {
        match self {
            pb::WorkerState::Unspecified => "Unspecified",
            pb::WorkerState::Idle => "Idle",
            pb::WorkerState::Busy => "Busy",
            pb::WorkerState::Lost => "Lost",
        }
    }
}

impl pb::WorkerMessage {
    /// The first message of a session.
    pub fn register(reg: pb::Register) -> Self {
        Self {
            msg: Some(pb::worker_message::Msg::Register(reg)),
        }
    }

    /// A heartbeat stamped with the current wall-clock time.
    pub fn heartbeat(seq: u64) -> Self {
        Self {
            msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat {
                seq,
                sent_unix_ms: now_unix_ms(),
            })),
        }
    }

    /// An acknowledgement that `rank` of `job` is ready.
    pub fn ready(job: &str, rank: u32) -> Self {
        Self {
            msg: Some(pb::worker_message::Msg::Ack(pb::AssignmentAck {
                job: job.to_owned(),
                rank,
                status: pb::AckStatus::Ready as i32,
                reason: String::new(),
            })),
        }
    }

    /// A refusal of `rank` of `job`, with the reason.
    pub fn rejected(job: &str, rank: u32, reason: impl Into<String>) -> Self {
        Self {
            msg: Some(pb::worker_message::Msg::Ack(pb::AssignmentAck {
                job: job.to_owned(),
                rank,
                status: pb::AckStatus::Rejected as i32,
                reason: reason.into(),
            })),
        }
    }
}

impl pb::RankPlacement {
    /// The wire form of one placed rank; `worker_id` and `data_plane_addr` name the worker that
    /// owns the rank's device (the plan only knows nodes and device indices).
    pub fn from_plan(
        entry: &plan::placement::RankPlacement,
        worker_id: &str,
        data_plane_addr: &str,
    ) -> Self {
        Self {
            rank: entry.rank.0,
            worker_id: worker_id.to_owned(),
            node: entry.node.clone(),
            device_index: entry.device.0,
            pp_idx: entry.pipeline_rank,
            dp_idx: entry.dp,
            ep_idx: entry.ep,
            stages: entry.stages.iter().map(|s| s.0).collect(),
            experts: Some(pb::ExpertRange {
                begin: entry.experts.start,
                end: entry.experts.end,
            }),
            data_plane_addr: data_plane_addr.to_owned(),
        }
    }
}

/// Parses a schedule name from the wire (`dualpipe`, `dualpipev`, `1f1b`).
pub fn schedule_from_name(name: &str) -> Result<plan::schedule::ScheduleKind, ConvertError> {
    plan::schedule::ScheduleKind::from_name(name).ok_or_else(|| ConvertError::UnknownName {
        what: "schedule",
        name: name.to_owned(),
        expected: "dualpipe, dualpipev, 1f1b",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_round_trip() {
        for p in pb::JobPhase::ALL {
            assert_eq!(pb::JobPhase::parse(p.name()), Ok(p));
        }
        assert!(pb::JobPhase::parse("Sleeping").is_err());
    }

    #[test]
    fn unspecified_enums_are_errors() {
        assert_eq!(
            pb::JobPhase::from_wire("phase", 0),
            Err(ConvertError::BadEnum {
                field: "phase",
                value: 0
            })
        );
        assert!(pb::DeviceKind::from_wire("kind", 99).is_err());
        assert_eq!(
            pb::DeviceKind::from_wire("kind", 2),
            Ok(pb::DeviceKind::Cuda)
        );
    }

    #[test]
    fn device_kind_parse() {
        assert_eq!(pb::DeviceKind::parse("CPU"), Ok(pb::DeviceKind::Cpu));
        let err = pb::DeviceKind::parse("tpu").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown device kind `tpu` (expected one of: cpu, cuda, simulated)"
        );
    }

    #[test]
    fn times_round_trip_at_millisecond_precision() {
        let t = time_from_unix_ms(1_700_000_000_123);
        assert_eq!(time_to_unix_ms(t), 1_700_000_000_123);
        assert_eq!(duration_to_ms(duration_from_ms(5000)), 5000);
    }
}
