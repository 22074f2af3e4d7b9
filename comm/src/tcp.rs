//! [`TcpDataPlane`]: the CPU data plane between worker processes, over `std::net` TCP.
//!
//! Shape: each rank listens on one socket. The first `send` to a peer spawns that peer's sender
//! thread, which dials the peer's listener (retrying with backoff until `connect_timeout`), says
//! hello (rank, world size, session) and then writes the queued frames in order; so `send` only
//! enqueues and the transfer overlaps the caller's compute. Each accepted connection gets a
//! reader thread that checks the hello, then reads frames and deposits them in the mailbox, where
//! `recv` matches them by (sender, key). Connections are one-way (dialer writes, acceptor reads),
//! so per (sender, key) delivery is FIFO.
//!
//! Failure invariants: a connection that ends, resets, or carries a malformed or corrupted frame
//! marks its peer lost with a sentence saying what happened; a failed dial or write does the same.
//! Receives from a lost peer fail at once (after the messages that did arrive are consumed), and
//! sends to it fail at once. No thread outlives `shutdown`, which flushes queued sends for at most
//! `linger`, then closes every socket and joins every thread.

use std::io::{BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{self, Hello, ReadError};
use crate::mailbox::Mailbox;
use crate::{CommError, DataPlane, Key, Result};

/// Settings of a [`TcpDataPlane`].
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Identifies the job: connections whose hello carries another session are refused, so a
    /// stale process of an earlier job cannot inject messages.
    pub session: u64,
    /// How long a sender thread keeps retrying to connect to its peer before marking it lost.
    pub connect_timeout: Duration,
    /// How long an accepted connection may take to send its hello.
    pub handshake_timeout: Duration,
    /// How long one socket write may block (a peer that stops reading) before the peer is lost.
    pub write_timeout: Duration,
    /// How long `shutdown` waits for queued sends to drain before closing the sockets.
    pub linger: Duration,
    /// The largest payload accepted from a peer, in bytes; a larger announced length is a
    /// malformed frame.
    pub max_frame_bytes: u64,
    /// Whether outgoing frames carry a CRC32 of their payload (incoming frames are checked
    /// whenever their sender says they carry one). Headers are always checksummed.
    pub payload_checksum: bool,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            session: 0,
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            linger: Duration::from_secs(5),
            max_frame_bytes: 16 << 30,
            payload_checksum: true,
        }
    }
}

/// A bound listener waiting for its rank and the peers' addresses (the address table usually
/// exists only after every rank has bound and reported [`TcpBinding::local_addr`]). Connections
/// arriving before [`TcpBinding::start`] wait in the listen backlog.
pub struct TcpBinding {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: TcpConfig,
}

impl TcpBinding {
    /// Binds a listener on `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr, config: TcpConfig) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| CommError::Io {
            what: format!("binding the data plane on {addr}"),
            source,
        })?;
        Self::from_listener(listener, config)
    }

    /// Uses an already bound listener (e.g. the one whose address a worker registered).
    pub fn from_listener(listener: TcpListener, config: TcpConfig) -> Result<Self> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| CommError::Io { what, source }
        };
        listener
            .set_nonblocking(false)
            .map_err(io("making the data-plane listener blocking"))?;
        let local_addr = listener
            .local_addr()
            .map_err(io("reading the data-plane listener's address"))?;
        Ok(Self {
            listener,
            local_addr,
            config,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts the plane as `rank` of `peers.len()` ranks; `peers[r]` is rank `r`'s listener
    /// address (this rank's own entry is not dialed). Returns at once: peers are dialed on first
    /// send.
    pub fn start(self, rank: usize, peers: Vec<SocketAddr>) -> Result<TcpDataPlane> {
        let world_size = peers.len();
        if rank >= world_size {
            return Err(CommError::InvalidArgument(format!(
                "rank {rank} is out of range for an address table of {world_size}"
            )));
        }
        if u32::try_from(world_size).is_err() {
            return Err(CommError::InvalidArgument(format!(
                "a world of {world_size} ranks is too large"
            )));
        }
        let inner = Arc::new(Inner {
            rank,
            peers,
            config: self.config,
            local_addr: self.local_addr,
            mailbox: Mailbox::new(rank, world_size),
            shutting_down: AtomicBool::new(false),
            force_closed: AtomicBool::new(false),
            writers: Mutex::new((0..world_size).map(|_| None).collect()),
            conns: Mutex::new(Conns {
                closed: false,
                streams: Vec::new(),
            }),
            send_threads: Mutex::new(Vec::new()),
            recv_threads: Mutex::new(Vec::new()),
            acceptor: Mutex::new(None),
            pool: Mutex::new(BufferPool::default()),
        });
        let acceptor_inner = inner.clone();
        let listener = self.listener;
        let handle = std::thread::Builder::new()
            .name(format!("dataplane-accept-{rank}"))
            .spawn(move || accept_loop(acceptor_inner, listener))
            .map_err(|source| CommError::Io {
                what: "spawning the data-plane accept thread".into(),
                source,
            })?;
        *lock(&inner.acceptor) = Some(handle);
        tracing::debug!(target: "dataplane", rank, addr = %inner.local_addr, world_size, "data plane started");
        Ok(TcpDataPlane { inner })
    }
}

/// The TCP implementation of [`DataPlane`]. Dropping it shuts it down.
pub struct TcpDataPlane {
    inner: Arc<Inner>,
}

struct Inner {
    rank: usize,
    peers: Vec<SocketAddr>,
    config: TcpConfig,
    local_addr: SocketAddr,
    mailbox: Mailbox,
    /// Set when shutdown starts: no new sends, lost peers are no longer reported.
    shutting_down: AtomicBool,
    /// Set when shutdown stops waiting for queued sends: dialing stops too.
    force_closed: AtomicBool,
    /// One sender per peer, created on first send.
    writers: Mutex<Vec<Option<Writer>>>,
    /// Every live socket, so that shutdown can unblock the threads using them.
    conns: Mutex<Conns>,
    /// Sender threads, joined by shutdown.
    send_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Reader threads, joined by shutdown.
    recv_threads: Mutex<Vec<JoinHandle<()>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Recycled receive buffers.
    pool: Mutex<BufferPool>,
}

/// Buffers handed back through [`DataPlane::recycle`], reused by the readers for payloads of at
/// least `POOL_MIN_BYTES` (where fresh pages cost more than the copy); bounded in count and bytes.
#[derive(Default)]
struct BufferPool {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

const POOL_MIN_BYTES: usize = 64 * 1024;
const POOL_MAX_BUFFERS: usize = 32;
const POOL_MAX_BYTES: usize = 1 << 30;

impl BufferPool {
    /// The smallest pooled buffer that holds `len` bytes without wasting more than half of
    /// itself, or a new empty one.
    fn take(&mut self, len: usize) -> Vec<u8> {
        if len < POOL_MIN_BYTES {
            return Vec::new();
        }
        let best = (self.buffers.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(index) => {
                let buffer = self.buffers.swap_remove(index);
                self.bytes -= buffer.capacity();
                buffer
            }
            None => Vec::new(),
        }
    }

    fn put(&mut self, mut buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity < POOL_MIN_BYTES
            || self.buffers.len() >= POOL_MAX_BUFFERS
            || self.bytes + capacity > POOL_MAX_BYTES
        {
            return;
        }
        buffer.clear();
        self.bytes += capacity;
        self.buffers.push(buffer);
    }
}

struct Conns {
    closed: bool,
    streams: Vec<TcpStream>,
}

struct Writer {
    queue: Sender<Outgoing>,
}

struct Outgoing {
    key: Key,
    payload: Vec<u8>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded collections stay consistent across a panic elsewhere, so poison is ignored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TcpDataPlane {
    /// The address this rank's listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Messages received and not yet taken by a `recv` (diagnostics: non-zero after a step means
    /// a send had no matching receive).
    pub fn pending_messages(&self) -> usize {
        self.inner.mailbox.pending()
    }

    /// The lowest-numbered peer this rank has lost (its connection closed or broke, a dial or a
    /// write failed) and the reason, while the plane is not shutting down; `None` when every peer
    /// it talked to is fine. Lets a rank that is not receiving (it waits for the coordinator)
    /// notice a dead peer at once instead of at its next receive.
    pub fn lost_peer(&self) -> Option<(usize, String)> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.mailbox.first_lost()
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.inner.peers.len() {
            return Err(CommError::InvalidArgument(format!(
                "rank {peer} is out of range for a world of {}",
                self.inner.peers.len()
            )));
        }
        Ok(())
    }

    fn lost(&self, peer: usize, key: Key, fallback: &str) -> CommError {
        let reason = self
            .inner
            .mailbox
            .lost_reason(peer)
            .unwrap_or_else(|| fallback.to_string());
        CommError::PeerLost {
            rank: self.inner.rank,
            peer,
            key,
            reason,
        }
    }
}

impl DataPlane for TcpDataPlane {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn world_size(&self) -> usize {
        self.inner.peers.len()
    }

    fn send_keyed(&self, peer: usize, key: Key, payload: Vec<u8>) -> Result<()> {
        self.check_peer(peer)?;
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(CommError::ShutDown {
                rank: inner.rank,
                key,
            });
        }
        if peer == inner.rank {
            inner.mailbox.deposit(peer, key, payload);
            return Ok(());
        }
        if let Some(reason) = inner.mailbox.lost_reason(peer) {
            return Err(CommError::PeerLost {
                rank: inner.rank,
                peer,
                key,
                reason,
            });
        }
        let mut writers = lock(&inner.writers);
        if writers[peer].is_none() {
            if inner.shutting_down.load(Ordering::SeqCst) {
                return Err(CommError::ShutDown {
                    rank: inner.rank,
                    key,
                });
            }
            let (queue, rx) = mpsc::channel();
            let thread_inner = inner.clone();
            let handle = std::thread::Builder::new()
                .name(format!("dataplane-send-{}-{peer}", inner.rank))
                .spawn(move || writer_main(thread_inner, peer, rx))
                .map_err(|source| CommError::Io {
                    what: format!("spawning the sender thread for rank {peer}"),
                    source,
                })?;
            lock(&inner.send_threads).push(handle);
            writers[peer] = Some(Writer { queue });
        }
        let Some(writer) = writers[peer].as_ref() else {
            return Err(CommError::ShutDown {
                rank: inner.rank,
                key,
            });
        };
        writer
            .queue
            .send(Outgoing { key, payload })
            .map_err(|_| self.lost(peer, key, "its sender thread has stopped"))
    }

    fn recv_keyed(&self, peer: usize, key: Key, timeout: Duration) -> Result<Vec<u8>> {
        self.check_peer(peer)?;
        self.inner.mailbox.take(peer, key, timeout)
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let _span = tracing::debug_span!("dataplane", rank = inner.rank, op = "shutdown").entered();
        // Closing the queues lets every sender write what it has and exit.
        lock(&inner.writers).iter_mut().for_each(|w| *w = None);
        let linger_end = Instant::now() + inner.config.linger;
        while Instant::now() < linger_end
            && !lock(&inner.send_threads)
                .iter()
                .all(JoinHandle::is_finished)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Then every socket is closed, which unblocks readers and any sender still writing.
        inner.force_closed.store(true, Ordering::SeqCst);
        {
            let mut conns = lock(&inner.conns);
            conns.closed = true;
            for stream in conns.streams.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        inner.mailbox.close();
        if let Some(acceptor) = lock(&inner.acceptor).take() {
            if wake_acceptor(inner.local_addr) {
                let _ = acceptor.join();
            } else {
                tracing::warn!(target: "dataplane", rank = inner.rank, "could not wake the accept thread; leaving it detached");
            }
        }
        // The acceptor is gone and sends are refused, so no thread can be registered after this.
        let mut threads: Vec<_> = lock(&inner.send_threads).drain(..).collect();
        threads.extend(lock(&inner.recv_threads).drain(..));
        for handle in threads {
            let _ = handle.join();
        }
        tracing::debug!(target: "dataplane", rank = inner.rank, "data plane shut down");
    }

    fn recycle(&self, buffer: Vec<u8>) {
        lock(&self.inner.pool).put(buffer);
    }
}

impl Drop for TcpDataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Connects to our own listener so that a blocked `accept` returns and sees the shutdown flag.
fn wake_acceptor(addr: SocketAddr) -> bool {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    TcpStream::connect_timeout(&SocketAddr::new(ip, addr.port()), Duration::from_secs(2)).is_ok()
}

/// Remembers a socket for shutdown; false if shutdown already closed everything.
fn register(inner: &Inner, stream: &TcpStream) -> bool {
    let mut conns = lock(&inner.conns);
    if conns.closed {
        return false;
    }
    match stream.try_clone() {
        Ok(clone) => {
            conns.streams.push(clone);
            true
        }
        Err(e) => {
            tracing::warn!(target: "dataplane", rank = inner.rank, error = %e, "cannot clone a socket for shutdown");
            false
        }
    }
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let _span = tracing::debug_span!("dataplane", rank = inner.rank, role = "accept").entered();
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                if inner.shutting_down.load(Ordering::SeqCst) || !register(&inner, &stream) {
                    return;
                }
                let thread_inner = inner.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("dataplane-recv-{}", inner.rank))
                    .spawn(move || reader_main(thread_inner, stream, remote));
                match spawned {
                    Ok(handle) => lock(&inner.recv_threads).push(handle),
                    Err(e) => {
                        tracing::error!(target: "dataplane", rank = inner.rank, %remote, error = %e, "cannot spawn a reader thread")
                    }
                }
            }
            Err(e) => {
                if inner.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(target: "dataplane", rank = inner.rank, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn reader_main(inner: Arc<Inner>, stream: TcpStream, remote: SocketAddr) {
    let rank = inner.rank;
    let world_size = inner.peers.len();
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.set_read_timeout(Some(inner.config.handshake_timeout)) {
        tracing::warn!(target: "dataplane", rank, %remote, error = %e, "cannot set the handshake timeout");
        return;
    }
    let mut input = BufReader::with_capacity(64 * 1024, stream);
    let hello = match frame::read_hello(&mut input) {
        Ok(hello) => hello,
        Err(e) => {
            if !inner.shutting_down.load(Ordering::SeqCst) {
                tracing::warn!(target: "dataplane", rank, %remote, reason = %describe_hello_error(&e), "refused a connection");
            }
            return;
        }
    };
    let peer = hello.sender as usize;
    let refusal = if hello.session != inner.config.session {
        Some(format!(
            "it belongs to session {:#x}, not {:#x}",
            hello.session, inner.config.session
        ))
    } else if hello.world_size as usize != world_size {
        Some(format!(
            "it says the world has {} ranks, not {world_size}",
            hello.world_size
        ))
    } else if peer >= world_size || peer == rank {
        Some(format!("it claims rank {peer}"))
    } else {
        None
    };
    if let Some(why) = refusal {
        tracing::warn!(target: "dataplane", rank, %remote, "refused a connection: {why}");
        return;
    }
    if let Err(e) = input.get_ref().set_read_timeout(None) {
        inner.mailbox.mark_lost(
            peer,
            format!("cannot clear the handshake timeout on rank {peer}'s connection: {e}"),
        );
        return;
    }
    let _span = tracing::debug_span!("dataplane", rank, peer, role = "recv").entered();
    loop {
        let buffer_for = |len| lock(&inner.pool).take(len);
        match frame::read_frame(
            &mut input,
            hello.sender,
            inner.config.max_frame_bytes,
            buffer_for,
        ) {
            Ok((key, payload)) => inner.mailbox.deposit(peer, key, payload),
            Err(e) => {
                if !inner.shutting_down.load(Ordering::SeqCst) {
                    let reason = match e {
                        ReadError::Closed => {
                            format!("rank {peer} closed its connection ({remote})")
                        }
                        ReadError::Io(m) => {
                            format!("connection from rank {peer} ({remote}) failed: {m}")
                        }
                        ReadError::Malformed(m) => {
                            format!("rank {peer} ({remote}) sent a bad frame: {m}")
                        }
                    };
                    inner.mailbox.mark_lost(peer, reason);
                }
                return;
            }
        }
    }
}

fn describe_hello_error(e: &ReadError) -> String {
    match e {
        ReadError::Closed => "closed before its hello".into(),
        ReadError::Io(m) | ReadError::Malformed(m) => m.clone(),
    }
}

fn dial(inner: &Inner, peer: usize) -> std::result::Result<TcpStream, String> {
    let addr = inner.peers[peer];
    let start = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        if inner.force_closed.load(Ordering::SeqCst) {
            return Err("the plane was shut down before the connection was made".into());
        }
        if let Some(reason) = inner.mailbox.lost_reason(peer) {
            return Err(format!("stopped dialing rank {peer} at {addr}: {reason}"));
        }
        let left = inner.config.connect_timeout.saturating_sub(start.elapsed());
        let attempt = left
            .min(Duration::from_millis(500))
            .max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                let waited = start.elapsed();
                if waited >= inner.config.connect_timeout {
                    return Err(format!(
                        "could not connect to rank {peer} at {addr} within {waited:.3?}: {e}"
                    ));
                }
                std::thread::sleep(
                    backoff.min(inner.config.connect_timeout.saturating_sub(waited)),
                );
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

fn writer_main(inner: Arc<Inner>, peer: usize, queue: Receiver<Outgoing>) {
    let rank = inner.rank;
    let _span = tracing::debug_span!("dataplane", rank, peer, role = "send").entered();
    let addr = inner.peers[peer];
    let fail = |reason: String| {
        if !inner.shutting_down.load(Ordering::SeqCst) {
            inner.mailbox.mark_lost(peer, reason);
        }
    };
    let mut stream = match dial(&inner, peer) {
        Ok(stream) => stream,
        Err(reason) => return fail(reason),
    };
    if !register(&inner, &stream) {
        return;
    }
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.set_write_timeout(Some(inner.config.write_timeout)) {
        return fail(format!(
            "cannot set the write timeout on the connection to rank {peer} at {addr}: {e}"
        ));
    }
    let hello = Hello {
        sender: rank as u32,
        world_size: inner.peers.len() as u32,
        session: inner.config.session,
    };
    if let Err(e) = stream.write_all(&hello.encode()) {
        return fail(format!(
            "sending the hello to rank {peer} at {addr} failed: {e}"
        ));
    }
    for Outgoing { key, payload } in queue {
        if let Err(e) = frame::write_frame(
            &mut stream,
            rank as u32,
            key,
            &payload,
            inner.config.payload_checksum,
        ) {
            return fail(format!(
                "sending {key} ({} bytes) to rank {peer} at {addr} failed: {e}",
                payload.len()
            ));
        }
    }
    // The queue closed (shutdown): everything queued is written; end the stream cleanly.
    let _ = stream.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, Tag};

    fn solo(config: TcpConfig) -> (TcpDataPlane, TcpListener) {
        // Rank 1's "listener" is a raw socket the test controls.
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let binding = TcpBinding::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let peers = vec![binding.local_addr(), fake.local_addr().unwrap()];
        (binding.start(0, peers).unwrap(), fake)
    }

    fn raw_peer(plane: &TcpDataPlane, session: u64) -> TcpStream {
        let mut stream = TcpStream::connect(plane.local_addr()).unwrap();
        stream
            .write_all(
                &Hello {
                    sender: 1,
                    world_size: 2,
                    session,
                }
                .encode(),
            )
            .unwrap();
        stream
    }

    /// A peer whose connection closes is reported by `lost_peer` without any receive pending
    /// (what a rank waiting for the coordinator relies on); a plane shutting down reports none.
    #[test]
    fn a_closed_peer_is_reported_without_a_receive() {
        let (plane, _fake) = solo(TcpConfig::default());
        assert_eq!(plane.lost_peer(), None);
        let stream = raw_peer(&plane, 0);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        let lost = loop {
            if let Some(l) = plane.lost_peer() {
                break l;
            }
            assert!(
                Instant::now() < deadline,
                "the closed peer was never reported"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(lost.0, 1);
        assert!(lost.1.contains("closed its connection"), "{}", lost.1);
        plane.shutdown();
        assert_eq!(plane.lost_peer(), None);
    }

    #[test]
    fn corrupted_frame_is_rejected_with_a_clear_reason() {
        let (plane, _fake) = solo(TcpConfig::default());
        let tag = Tag::new(4, Kind::Combine).backward();
        let mut stream = raw_peer(&plane, 0);
        // One good frame, then one whose payload was damaged in flight.
        frame::write_frame(&mut stream, 1, Key::p2p(tag), b"fine", true).unwrap();
        let mut wire = Vec::new();
        frame::write_frame(&mut wire, 1, Key::p2p(tag.chunk(1)), &[7u8; 100], true).unwrap();
        wire[frame::HEADER_LEN + 10] ^= 0x40;
        stream.write_all(&wire).unwrap();
        assert_eq!(
            plane.recv(1, tag, Duration::from_secs(10)).unwrap(),
            b"fine"
        );
        let err = plane
            .recv(1, tag.chunk(1), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        for want in [
            "rank 1 is lost",
            "sent a bad frame",
            "payload checksum mismatch",
            "step 4 combine bwd mb 0 chunk 1",
        ] {
            assert!(err.contains(want), "`{err}` lacks `{want}`");
        }
    }

    #[test]
    fn malformed_header_and_bad_hello_are_named_not_panics() {
        let (plane, _fake) = solo(TcpConfig {
            session: 5,
            ..TcpConfig::default()
        });
        // A connection from another session is refused without touching rank 1's state.
        let mut stranger = raw_peer(&plane, 6);
        frame::write_frame(
            &mut stranger,
            1,
            Key::p2p(Tag::new(0, Kind::Control)),
            b"x",
            true,
        )
        .unwrap();
        let mut garbage = TcpStream::connect(plane.local_addr()).unwrap();
        garbage.write_all(&[0xff; 64]).unwrap();
        let err = plane
            .recv(1, Tag::new(0, Kind::Control), Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(err, CommError::Timeout { .. }), "{err}");
        // A frame announcing an impossible kind from the right session marks rank 1 lost.
        let mut stream = raw_peer(&plane, 5);
        let key = Key::p2p(Tag::new(0, Kind::Control));
        let mut header = frame::Header {
            sender: 1,
            key,
            len: 0,
            payload_crc: true,
        }
        .encode();
        header[7] = 200;
        let crc = crc32fast::hash(&header[..44]);
        header[44..48].copy_from_slice(&crc.to_le_bytes());
        stream.write_all(&header).unwrap();
        let err = plane
            .recv(1, Tag::new(0, Kind::Control), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown kind 200"), "{err}");
    }

    #[test]
    fn shutdown_wakes_receivers_and_joins_threads() {
        let (plane, _fake) = solo(TcpConfig::default());
        let _peer = raw_peer(&plane, 0);
        let start = Instant::now();
        let err = std::thread::scope(|s| {
            let wait =
                s.spawn(|| plane.recv(1, Tag::new(0, Kind::Control), Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(50));
            plane.shutdown();
            wait.join().unwrap().unwrap_err()
        });
        assert!(matches!(err, CommError::ShutDown { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(lock(&plane.inner.recv_threads).is_empty());
        let err = plane
            .send(1, Tag::new(0, Kind::Control), vec![])
            .unwrap_err();
        assert!(matches!(err, CommError::ShutDown { .. }), "{err}");
    }

    #[test]
    fn pool_reuses_fitting_buffers_within_bounds() {
        let mut pool = BufferPool::default();
        pool.put(Vec::with_capacity(1024));
        pool.put(Vec::with_capacity(1 << 20));
        pool.put(Vec::with_capacity(4 << 20));
        assert_eq!(pool.buffers.len(), 2, "small buffers are not pooled");
        assert_eq!(pool.take(100).capacity(), 0);
        assert_eq!(pool.take(3 << 20).capacity(), 4 << 20);
        assert_eq!(
            pool.take(100 << 10).capacity(),
            0,
            "a 1 MiB buffer is too big for 100 KiB"
        );
        assert_eq!(pool.take(600 << 10).capacity(), 1 << 20);
        assert_eq!((pool.buffers.len(), pool.bytes), (0, 0));
    }

    #[test]
    fn unreachable_peer_is_lost_after_the_connect_timeout() {
        let config = TcpConfig {
            connect_timeout: Duration::from_millis(300),
            ..TcpConfig::default()
        };
        let (plane, fake) = solo(config);
        drop(fake);
        let tag = Tag::new(0, Kind::Activation);
        plane.send(1, tag, vec![1, 2, 3]).unwrap();
        let err = plane
            .recv(1, tag, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("could not connect to rank 1"), "{err}");
    }
}
