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

impl pb::Op {
    /// The wire form of one schedule op (see `Op` in worker.proto for the field meanings).
    pub fn from_plan(op: &plan::schedule::Op) -> Self {
        use plan::schedule::{Op, Payload};
        let compute = |kind: pb::OpKind, c: &plan::schedule::Chunk| pb::Op {
            kind: kind as i32,
            micro_batch: c.mb,
            chunk: u32::from(c.dir),
            ..Default::default()
        };
        let transfer = |kind: pb::OpKind, t: &plan::schedule::Transfer| pb::Op {
            kind: kind as i32,
            micro_batch: t.chunk.mb,
            chunk: u32::from(t.chunk.dir),
            peer_rank: t.peer,
            payload: match t.payload {
                Payload::Activation => pb::Payload::Activation,
                Payload::Gradient => pb::Payload::Gradient,
            } as i32,
            ..Default::default()
        };
        match op {
            Op::Forward(c) => compute(pb::OpKind::Forward, c),
            Op::Backward(c) => compute(pb::OpKind::Backward, c),
            Op::BackwardInput(c) => compute(pb::OpKind::BackwardInput, c),
            Op::Weight(c) => compute(pb::OpKind::BackwardWeight, c),
            Op::ForwardBackward { f, b } => pb::Op {
                micro_batch_b: b.mb,
                chunk_b: u32::from(b.dir),
                ..compute(pb::OpKind::ForwardBackward, f)
            },
            Op::Send(t) => transfer(pb::OpKind::Send, t),
            Op::Recv(t) => transfer(pb::OpKind::Recv, t),
        }
    }

    /// The schedule op this wire op stands for; an unknown kind or payload, or a chunk direction
    /// above 1, is an error naming the field.
    pub fn to_plan(&self) -> Result<plan::schedule::Op, ConvertError> {
        use plan::schedule::{Chunk, Op, Payload, Transfer};
        let dir = |field: &'static str, v: u32| -> Result<u8, ConvertError> {
            if v > 1 {
                return Err(ConvertError::BadEnum {
                    field,
                    value: v as i32,
                });
            }
            Ok(v as u8)
        };
        let chunk = Chunk::new(dir("op.chunk", self.chunk)?, self.micro_batch);
        let kind = pb::OpKind::try_from(self.kind).map_err(|_| ConvertError::BadEnum {
            field: "op.kind",
            value: self.kind,
        })?;
        let transfer = || -> Result<Transfer, ConvertError> {
            let payload = match pb::Payload::try_from(self.payload) {
                Ok(pb::Payload::Activation) => Payload::Activation,
                Ok(pb::Payload::Gradient) => Payload::Gradient,
                _ => {
                    return Err(ConvertError::BadEnum {
                        field: "op.payload",
                        value: self.payload,
                    });
                }
            };
            Ok(Transfer {
                peer: self.peer_rank,
                payload,
                chunk,
            })
        };
        Ok(match kind {
            pb::OpKind::Forward => Op::Forward(chunk),
            pb::OpKind::Backward => Op::Backward(chunk),
            pb::OpKind::BackwardInput => Op::BackwardInput(chunk),
            pb::OpKind::BackwardWeight => Op::Weight(chunk),
            pb::OpKind::ForwardBackward => Op::ForwardBackward {
                f: chunk,
                b: Chunk::new(dir("op.chunk_b", self.chunk_b)?, self.micro_batch_b),
            },
            pb::OpKind::Send => Op::Send(transfer()?),
            pb::OpKind::Recv => Op::Recv(transfer()?),
            pb::OpKind::Unspecified => {
                return Err(ConvertError::BadEnum {
                    field: "op.kind",
                    value: self.kind,
                });
            }
        })
    }
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
    fn every_schedule_op_round_trips_through_the_wire() {
        use plan::schedule::ScheduleKind;
        for kind in [
            ScheduleKind::DualPipe,
            ScheduleKind::DualPipeV,
            ScheduleKind::OneFOneB,
        ] {
            let s = kind.generate(4, 8).unwrap();
            for row in &s.ops {
                for op in row {
                    assert_eq!(pb::Op::from_plan(op).to_plan().unwrap(), *op, "{op}");
                }
            }
        }
        let bad = pb::Op {
            kind: pb::OpKind::Send as i32,
            ..Default::default()
        };
        assert!(
            bad.to_plan()
                .unwrap_err()
                .to_string()
                .contains("op.payload")
        );
        let bad = pb::Op {
            kind: pb::OpKind::Forward as i32,
            chunk: 2,
            ..Default::default()
        };
        assert!(bad.to_plan().unwrap_err().to_string().contains("op.chunk"));
    }

    #[test]
    fn times_round_trip_at_millisecond_precision() {
        let t = time_from_unix_ms(1_700_000_000_123);
        assert_eq!(time_to_unix_ms(t), 1_700_000_000_123);
        assert_eq!(duration_to_ms(duration_from_ms(5000)), 5000);
    }
}
