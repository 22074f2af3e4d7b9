//! What a worker daemon is told at start: where the coordinator is, who it is (node name and a
//! stable worker id), which devices it offers and where its data plane listens.
//!
//! Invariant: [`WorkerConfig::validate`] accepts only configurations the daemon can honour — a
//! non-empty node and id, at least one device, unique device indices, and device kinds this build
//! can run (CUDA is refused until the GPU backend exists, instead of registering devices it cannot
//! drive).

use crate::{Error, RetryPolicy};
use proto::pb;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// One device the worker offers, as registered with the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// cpu, simulated (or cuda, refused for now).
    pub kind: pb::DeviceKind,
    /// Index on the node: unique among all workers of the same node.
    pub index: u32,
    /// Memory the device offers; 0 means unknown (CPU devices share host memory).
    pub memory_bytes: u64,
    /// The device's data-plane address as registered (filled when its listener is bound).
    pub data_plane_addr: Option<String>,
}

impl Device {
    /// `count` devices of `kind` with consecutive indices starting at `first_index`.
    pub fn uniform(kind: pb::DeviceKind, count: u32, first_index: u32) -> Vec<Device> {
        (0..count)
            .map(|i| Device {
                kind,
                index: first_index + i,
                memory_bytes: 0,
                data_plane_addr: None,
            })
            .collect()
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::Device {
        pb::Device {
            kind: self.kind as i32,
            index: self.index,
            memory_bytes: self.memory_bytes,
            data_plane_addr: self.data_plane_addr.clone().unwrap_or_default(),
        }
    }
}

/// Everything `worker::run` needs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    /// Node (host) name; workers with the same node share fast links.
    pub node: String,
    /// Stable id, kept across reconnects and daemon restarts so the coordinator resumes the
    /// registration (default `NODE/FIRST_DEVICE_INDEX` in the CLI).
    pub worker_id: String,
    /// Devices offered.
    pub devices: Vec<Device>,
    /// Where to bind the data-plane listener (`127.0.0.1:0` picks a free port).
    pub data_plane_listen: SocketAddr,
    /// Address peers should use, when it differs from the bound one (e.g. behind NAT or when
    /// bound to `0.0.0.0`). `None` advertises the bound address.
    pub data_plane_advertise: Option<String>,
    /// Heartbeat period used until the coordinator's `Registered` says otherwise.
    pub heartbeat_interval: Duration,
    /// How long the worker waits for the coordinator to say anything before it declares the
    /// session dead, used until `Registered` supplies the coordinator's failure timeout.
    pub silence_timeout: Duration,
    /// Deadline of the TCP/HTTP2 connect.
    pub connect_timeout: Duration,
    /// Deadline of every other single wait on the coordinator (opening the stream, `Registered`,
    /// queueing an outgoing message).
    pub rpc_timeout: Duration,
    /// Reconnect pacing.
    pub retry: RetryPolicy,
    /// How long the shutdown path may take to tell the coordinator before the daemon exits anyway.
    pub shutdown_grace: Duration,
    /// Compute threads per rank; `None` divides the machine's cores evenly over the devices.
    pub threads: Option<usize>,
    /// Longest wait of one data-plane receive (a peer's activation or gradient, a collective
    /// takes twice this); also how long a starting rank keeps dialing peers that are not up yet.
    pub recv_timeout: Duration,
}

impl WorkerConfig {
    /// A configuration with the default timings.
    pub fn new(
        coordinator: impl Into<String>,
        node: impl Into<String>,
        worker_id: impl Into<String>,
        devices: Vec<Device>,
    ) -> Self {
        Self {
            coordinator: coordinator.into(),
            node: node.into(),
            worker_id: worker_id.into(),
            devices,
            data_plane_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_plane_advertise: None,
            heartbeat_interval: Duration::from_secs(1),
            silence_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            shutdown_grace: Duration::from_secs(2),
            threads: None,
            recv_timeout: Duration::from_secs(60),
        }
    }

    /// Compute threads each rank uses: the configured number, else the cores divided evenly
    /// over the devices (at least one).
    pub fn threads_per_device(&self) -> usize {
        self.threads
            .unwrap_or_else(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                cores / self.devices.len().max(1)
            })
            .max(1)
    }

    /// Checks the invariants listed in the module doc.
    pub fn validate(&self) -> Result<(), Error> {
        if self.node.trim().is_empty() {
            return Err(Error::Config("node name is empty".into()));
        }
        if self.worker_id.trim().is_empty() {
            return Err(Error::Config("worker id is empty".into()));
        }
        if self.devices.is_empty() {
            return Err(Error::Config(
                "no devices: give at least one (--devices N)".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for d in &self.devices {
            if !seen.insert(d.index) {
                return Err(Error::Config(format!(
                    "device index {} listed twice",
                    d.index
                )));
            }
            match d.kind {
                pb::DeviceKind::Cpu | pb::DeviceKind::Simulated => {}
                pb::DeviceKind::Cuda => {
                    return Err(Error::Config(
                        "device kind cuda is not supported by this build yet; use cpu or simulated"
                            .into(),
                    ));
                }
                pb::DeviceKind::Unspecified => {
                    return Err(Error::Config(format!("device {} has no kind", d.index)));
                }
            }
        }
        for (name, d) in [
            ("heartbeat interval", self.heartbeat_interval),
            ("silence timeout", self.silence_timeout),
            ("connect timeout", self.connect_timeout),
            ("rpc timeout", self.rpc_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(devices: Vec<Device>) -> WorkerConfig {
        WorkerConfig::new("http://127.0.0.1:1", "node0", "node0/0", devices)
    }

    #[test]
    fn accepts_cpu_and_simulated() {
        cfg(Device::uniform(pb::DeviceKind::Cpu, 4, 0))
            .validate()
            .unwrap();
        cfg(Device::uniform(pb::DeviceKind::Simulated, 1, 3))
            .validate()
            .unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let msg = |c: WorkerConfig| c.validate().unwrap_err().to_string();
        assert!(msg(cfg(vec![])).contains("no devices"));
        assert!(
            msg(cfg(Device::uniform(pb::DeviceKind::Cuda, 1, 0))).contains("cuda is not supported")
        );
        let mut dup = Device::uniform(pb::DeviceKind::Cpu, 2, 0);
        dup[1].index = 0;
        assert!(msg(cfg(dup)).contains("device index 0 listed twice"));
        let mut c = cfg(Device::uniform(pb::DeviceKind::Cpu, 1, 0));
        c.node = " ".into();
        assert!(msg(c).contains("node name is empty"));
    }
}
