//! Behaviour of both data planes (TCP over loopback with port 0, and in-process) through the
//! `DataPlane` trait: point-to-point matching, all-to-all-v, fixed-order reductions, timeouts and
//! lost peers (issue 6, acceptance 3 and the data-plane part of the build list).
//!
//! Invariant kept by these tests: every scenario runs on both implementations where it makes
//! sense, so the in-process plane the executor tests use behaves like the real one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use comm::collective::shard_range;
use comm::{
    CommError, DataPlane, Group, Kind, LocalDataPlane, Tag, TcpBinding, TcpConfig, TcpDataPlane,
};
use rand::{Rng, SeedableRng};

const LONG: Duration = Duration::from_secs(20);

fn tcp_world_with(n: usize, config: TcpConfig) -> Vec<TcpDataPlane> {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let bindings: Vec<_> = (0..n)
        .map(|_| TcpBinding::bind(any, config.clone()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = bindings.iter().map(TcpBinding::local_addr).collect();
    bindings
        .into_iter()
        .enumerate()
        .map(|(rank, b)| b.start(rank, peers.clone()).unwrap())
        .collect()
}

fn tcp_world(n: usize) -> Vec<TcpDataPlane> {
    tcp_world_with(
        n,
        TcpConfig {
            session: 42,
            ..TcpConfig::default()
        },
    )
}

/// Runs `f` on every rank's plane, each on its own thread, and returns the results in rank order.
fn on_all<P: DataPlane, T: Send>(planes: &[P], f: impl Fn(&P) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = planes.iter().map(|p| s.spawn(move || f(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

fn p2p_scenario<P: DataPlane>(planes: &[P]) {
    let tag = |mb: u32| Tag::new(3, Kind::Activation).forward().micro_batch(mb);
    for mb in 0..5u32 {
        planes[0]
            .send(1, tag(mb), vec![mb as u8; mb as usize * 1000])
            .unwrap();
    }
    // The same tag twice is delivered in send order.
    planes[0].send(1, tag(9), vec![1]).unwrap();
    planes[0].send(1, tag(9), vec![2]).unwrap();
    for mb in (0..5u32).rev() {
        assert_eq!(
            planes[1].recv(0, tag(mb), LONG).unwrap(),
            vec![mb as u8; mb as usize * 1000]
        );
    }
    assert_eq!(planes[1].recv(0, tag(9), LONG).unwrap(), vec![1]);
    assert_eq!(planes[1].recv(0, tag(9), LONG).unwrap(), vec![2]);
    // The reply goes the other way; a backward tag never matches a forward one.
    planes[1]
        .send(0, tag(0).backward(), b"grad".to_vec())
        .unwrap();
    assert_eq!(planes[0].recv(1, tag(0).backward(), LONG).unwrap(), b"grad");
    let err = planes[0]
        .recv(1, tag(0), Duration::from_millis(20))
        .unwrap_err();
    assert!(matches!(err, CommError::Timeout { .. }), "{err}");
    // Large payloads go through the chunked path; a recycled buffer is reused without leaking
    // its old contents.
    let big: Vec<u8> = (0..3 * (1 << 20) + 5)
        .map(|i: usize| (i % 253) as u8)
        .collect();
    for round in 0..2u32 {
        planes[0]
            .send(1, tag(20 + round), big[round as usize..].to_vec())
            .unwrap();
        let got = planes[1].recv(0, tag(20 + round), LONG).unwrap();
        assert!(
            got == big[round as usize..],
            "large payload {round} differs"
        );
        planes[1].recycle(got);
    }
    // Sending to oneself works.
    planes[1].send(1, tag(1), vec![7]).unwrap();
    assert_eq!(planes[1].recv(1, tag(1), LONG).unwrap(), vec![7]);
}

#[test]
fn p2p_round_trip_and_out_of_order_tags() {
    p2p_scenario(&tcp_world(2));
    p2p_scenario(&LocalDataPlane::create(2));
}

fn all_to_all_scenario<P: DataPlane>(planes: &[P]) {
    // Payload from r to j has (r * 3 + j) % 5 bytes, so some are empty.
    let payload = |r: usize, j: usize| -> Vec<u8> {
        (0..(r * 3 + j) % 5)
            .map(|i| (r * 16 + j + i) as u8)
            .collect()
    };
    let world = Group::world(planes.len()).unwrap();
    let evens = Group::new(vec![2, 0]).unwrap();
    let odds = Group::new(vec![1, 3]).unwrap();
    let tag = Tag::new(5, Kind::Dispatch).forward().chunk(2);
    on_all(planes, |p| {
        let r = p.rank();
        let got = p
            .all_to_all_v(
                &world,
                tag,
                (0..planes.len()).map(|j| payload(r, j)).collect(),
                LONG,
            )
            .unwrap();
        for (src, bytes) in got.iter().enumerate() {
            assert_eq!(bytes, &payload(src, r), "rank {r} from {src}");
        }
        // Two disjoint subgroups with the same tag at the same time do not mix.
        let group = if r % 2 == 0 { &evens } else { &odds };
        let sent: Vec<Vec<u8>> = group
            .ranks()
            .iter()
            .map(|&j| vec![r as u8, j as u8])
            .collect();
        let got = p.all_to_all_v(group, tag, sent, LONG).unwrap();
        for (pos, bytes) in got.iter().enumerate() {
            assert_eq!(bytes, &vec![group.rank_at(pos) as u8, r as u8]);
        }
    });
    let err = planes[0]
        .all_to_all_v(&world, tag, vec![Vec::new()], LONG)
        .unwrap_err();
    assert!(
        err.to_string().contains("got 1 payloads for a group of 4"),
        "{err}"
    );
    let err = planes[0]
        .all_to_all_v(&odds, tag, vec![Vec::new(); 2], LONG)
        .unwrap_err();
    assert!(err.to_string().contains("rank 0 is not a member"), "{err}");
}

#[test]
fn all_to_all_v_uneven_counts_including_zero() {
    all_to_all_scenario(&tcp_world(4));
    all_to_all_scenario(&LocalDataPlane::create(4));
}

/// Inputs whose magnitudes differ enough that the f32 sum depends on the order of addition.
fn reduction_inputs(world: usize, len: usize) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..world)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..5)))
                .collect()
        })
        .collect()
}

fn sequential_sum(inputs: &[Vec<f32>], order: impl Iterator<Item = usize>) -> Vec<f32> {
    let mut order = order;
    let mut acc = inputs[order.next().unwrap()].clone();
    for r in order {
        for (a, x) in acc.iter_mut().zip(&inputs[r]) {
            *a += *x;
        }
    }
    acc
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn reduction_scenario<P: DataPlane>(planes: &[P], run: u64) {
    let world = planes.len();
    let len = 1001;
    let inputs = reduction_inputs(world, len);
    let reference = sequential_sum(&inputs, 0..world);
    assert_ne!(
        bits(&reference),
        bits(&sequential_sum(&inputs, (0..world).rev())),
        "inputs are order-insensitive"
    );
    let group = Group::world(world).unwrap();
    let results = on_all(planes, |p| {
        let r = p.rank();
        let mut rng = rand::rngs::StdRng::seed_from_u64(run * 100 + r as u64);
        let mut delay = || std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        let tag = Tag::new(run, Kind::GradReduceScatter);
        delay();
        let mut all = inputs[r].clone();
        p.all_reduce_sum_f32(&group, Tag::new(run, Kind::MirrorGradSum), &mut all, LONG)
            .unwrap();
        delay();
        let shard = p
            .reduce_scatter_sum_f32(&group, tag, &inputs[r], LONG)
            .unwrap();
        delay();
        let gathered = p
            .all_gather_f32(&group, Tag::new(run, Kind::ParamAllGather), &shard, LONG)
            .unwrap();
        delay();
        p.barrier(&group, Tag::new(run, Kind::Barrier), LONG)
            .unwrap();
        (all, shard, gathered)
    });
    for (r, (all, shard, gathered)) in results.iter().enumerate() {
        assert_eq!(
            bits(all),
            bits(&reference),
            "all-reduce on rank {r}, run {run}"
        );
        assert_eq!(
            bits(shard),
            bits(&reference[shard_range(len, world, r)]),
            "reduce-scatter on rank {r}"
        );
        assert_eq!(bits(gathered), bits(&reference), "all-gather on rank {r}");
    }
}

#[test]
fn reductions_are_bitwise_fixed_order_across_ranks_and_runs() {
    let tcp = tcp_world(4);
    let local = LocalDataPlane::create(3);
    for run in 0..3 {
        reduction_scenario(&tcp, run);
        reduction_scenario(&local, run);
    }
    // A two-rank mirror pair inside a larger world (DualPipe ranks 1 and 2 of 4).
    let pair = Group::new(vec![2, 1]).unwrap();
    let inputs = reduction_inputs(2, 33);
    let out = on_all(&tcp[1..3], |p| {
        let mut data = inputs[p.rank() - 1].clone();
        p.all_reduce_sum_f32(&pair, Tag::new(9, Kind::MirrorGradSum), &mut data, LONG)
            .unwrap();
        data
    });
    assert_eq!(bits(&out[0]), bits(&sequential_sum(&inputs, 0..2)));
    assert_eq!(bits(&out[1]), bits(&out[0]));
    assert_eq!(
        tcp.iter()
            .map(TcpDataPlane::pending_messages)
            .sum::<usize>(),
        0
    );
}

#[test]
fn timeout_names_rank_peer_tag_and_elapsed() {
    let planes = tcp_world(2);
    let tag = Tag::new(9, Kind::Gradient).backward().micro_batch(4);
    let start = Instant::now();
    let err = planes[0]
        .recv(1, tag, Duration::from_millis(200))
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let text = err.to_string();
    assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{text}");
    for want in [
        "rank 0",
        "from rank 1",
        "step 9 gradient bwd mb 4",
        "timed out after",
    ] {
        assert!(text.contains(want), "`{text}` lacks `{want}`");
    }
    // A collective's timeout covers the whole operation and names the missing member.
    let group = Group::world(2).unwrap();
    let err = planes[1]
        .barrier(
            &group,
            Tag::new(10, Kind::Barrier),
            Duration::from_millis(100),
        )
        .unwrap_err();
    assert!(
        matches!(err, CommError::Timeout { elapsed, .. } if elapsed >= Duration::from_millis(100)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("barrier [step 10 barrier mb 0 chunk 0]")
            && err.to_string().contains("from rank 0"),
        "{err}"
    );
}

fn lost_peer_scenario<P: DataPlane>(mut planes: Vec<P>) {
    let group = &Group::world(planes.len()).unwrap();
    // A first barrier connects every pair, as a real step would have.
    on_all(&planes, |p| {
        p.barrier(group, Tag::new(1, Kind::Barrier), LONG).unwrap()
    });
    let victim = planes.remove(1);
    let survivors = planes;
    let start = Instant::now();
    let errors = std::thread::scope(|s| {
        let waits: Vec<_> = survivors
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let mut data = vec![1.0f32; 64];
                    p.all_reduce_sum_f32(
                        group,
                        Tag::new(2, Kind::GradReduceScatter),
                        &mut data,
                        Duration::from_secs(30),
                    )
                })
            })
            .collect();
        // The peer dies while its neighbours wait for it.
        std::thread::sleep(Duration::from_millis(100));
        drop(victim);
        waits
            .into_iter()
            .map(|h| h.join().unwrap().unwrap_err())
            .collect::<Vec<_>>()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    for err in &errors {
        assert!(matches!(err, CommError::PeerLost { peer: 1, .. }), "{err}");
        assert!(err.to_string().contains("rank 1 is lost"), "{err}");
    }
    // Future receives and sends fail at once too.
    let start = Instant::now();
    let err = survivors[0]
        .recv(1, Tag::new(3, Kind::Activation), Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(err, CommError::PeerLost { .. }) && start.elapsed() < Duration::from_secs(1),
        "{err}"
    );
    let err = survivors[0]
        .send(1, Tag::new(3, Kind::Activation), vec![1])
        .unwrap_err();
    assert!(matches!(err, CommError::PeerLost { .. }), "{err}");
}

#[test]
fn dropped_peer_fails_neighbours_promptly() {
    lost_peer_scenario(tcp_world(3));
    lost_peer_scenario(LocalDataPlane::create(3));
}

const CHILD_ENV: &str = "COMM_TEST_CHILD_PARENT_ADDR";

/// The child half of the process-kill test: rank 1 of 2, which says hello and then blocks.
fn run_child(parent: &str) {
    let parent: SocketAddr = parent.parse().expect("parent address");
    let binding = TcpBinding::bind("127.0.0.1:0".parse().unwrap(), TcpConfig::default()).unwrap();
    let me = binding.local_addr();
    println!("CHILD_ADDR {me}");
    let plane = binding.start(1, vec![parent, me]).unwrap();
    plane
        .send(0, Tag::new(0, Kind::Control), b"hello".to_vec())
        .unwrap();
    // Blocks until the parent kills this process.
    let _ = plane.recv(0, Tag::new(1, Kind::Control), Duration::from_secs(60));
    std::process::exit(3);
}

#[test]
fn killed_peer_process_fails_its_neighbour_within_the_timeout() {
    if let Ok(parent) = std::env::var(CHILD_ENV) {
        return run_child(&parent);
    }
    let binding = TcpBinding::bind("127.0.0.1:0".parse().unwrap(), TcpConfig::default()).unwrap();
    let me = binding.local_addr();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "killed_peer_process_fails_its_neighbour_within_the_timeout",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, me.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child peer");
    // Kills the child even if an assertion below fails first.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(stdout).lines();
    let child_addr: SocketAddr = lines
        .by_ref()
        .map_while(Result::ok)
        // libtest may print "test <name> ... " on the same line first.
        .find_map(|l| {
            l.split_once("CHILD_ADDR ")
                .map(|(_, a)| a.trim().parse().unwrap())
        })
        .expect("the child printed its address");
    let plane = binding.start(0, vec![me, child_addr]).unwrap();
    assert_eq!(
        plane.recv(1, Tag::new(0, Kind::Control), LONG).unwrap(),
        b"hello"
    );
    let start = Instant::now();
    let err = std::thread::scope(|s| {
        let wait =
            s.spawn(|| plane.recv(1, Tag::new(2, Kind::Activation), Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(100));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        wait.join().unwrap().unwrap_err()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, CommError::PeerLost { peer: 1, .. }), "{text}");
    assert!(
        text.contains("rank 1 closed its connection") || text.contains("failed"),
        "{text}"
    );
}
