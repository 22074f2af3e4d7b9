//! The example manifests in `manifests/` parse, validate, survive a YAML round trip, and the
//! V3-scale job places onto the V3 cluster keeping every placement rule.
//!
//! Invariant: every file under `manifests/` is covered here, so a broken example fails CI.

use std::path::PathBuf;

use manifest::{
    DataSource, Precision, Schedule, TrainingJob, parse_cluster, parse_job, parse_job_for_cluster,
};

fn manifests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn load(name: &str) -> TrainingJob {
    let path = manifests_dir().join(name);
    let src = std::fs::read_to_string(&path).unwrap();
    match parse_job(&src, &path.display().to_string(), &[]) {
        Ok(job) => job,
        Err(err) => panic!("{err}"),
    }
}

fn cluster(name: &str) -> plan::topology::Cluster {
    let path = manifests_dir().join("clusters").join(name);
    let src = std::fs::read_to_string(&path).unwrap();
    match parse_cluster(&src, &path.display().to_string()) {
        Ok(cluster) => cluster,
        Err(err) => panic!("{err}"),
    }
}

#[test]
fn every_example_parses_and_round_trips() {
    let mut names: Vec<String> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "dsv3-671b.yaml",
            "micro.yaml",
            "simulated-32.yaml",
            "tiny.yaml"
        ]
    );
    for name in &names {
        let job = load(name);
        let yaml = job.to_yaml().unwrap();
        let again =
            parse_job(&yaml, "stored.yaml", &[]).unwrap_or_else(|e| panic!("{name}: {e}\n{yaml}"));
        assert_eq!(job, again, "{name} changed in a round trip");
    }
}

#[test]
fn tiny_is_the_issue_6_job() {
    let job = load("tiny.yaml");
    let par = &job.spec.parallelism;
    assert_eq!((par.pipeline, par.data, par.expert), (4, 2, 2));
    assert_eq!(par.schedule, Schedule::DualPipe);
    assert_eq!(job.spec.training.precision, Precision::Fp8);
    assert_eq!(job.spec.training.mtp.depth, Some(1));
    assert_eq!(job.spec.model.preset.as_deref(), Some("tiny"));
    assert!(matches!(job.spec.data, DataSource::Synthetic(_)));
}

#[test]
fn minimal_manifest_gets_defaults() {
    let src = "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: m\nspec:\n  model:\n    preset: micro\n";
    let job = parse_job(src, "m.yaml", &[]).unwrap();
    assert_eq!(job.spec.parallelism.micro_batches, Some(1));
    assert_eq!(job.spec.training.mtp.depth, Some(1));
    assert_eq!(
        job.spec.fault_tolerance.failure_timeout,
        std::time::Duration::from_secs(5)
    );
    assert!(job.spec.fault_tolerance.failure_timeout <= std::time::Duration::from_secs(5));
    expect_test::expect![[r#"
        apiVersion: moetrain/v1
        kind: TrainingJob
        metadata:
          name: m
        spec:
          model:
            preset: micro
          parallelism:
            pipeline: 1
            data: 1
            expert: 1
            schedule: 1f1b
            microBatches: 1
            overlap: true
          training:
            steps: 100
            seqLen: 64
            microBatchSize: 1
            optimizer:
              lr: 0.0003
              minLr: 0.00003
              warmupSteps: 0
              weightDecay: 0.1
              beta1: 0.9
              beta2: 0.95
              eps: 1.0e-8
              gradClip: 1.0
              momentDtype: bf16
            precision: bf16
            mtp:
              depth: 1
              weight: 0.3
            biasUpdate:
              rate: 0.001
              subtractMean: false
            balanceLossWeight: 0.0001
            seed: 0
          data:
            synthetic:
              kind: pattern
          checkpointing:
            interval: 0
          faultTolerance:
            heartbeatInterval: 1s
            failureTimeout: 5s
            restartBudget: 3
            spareWorkers: 0
            receiveTimeout: 30s
          resources:
            device: cpu
            devicesPerRank: 1
    "#]]
    .assert_eq(&job.to_yaml().unwrap());
}

#[test]
fn overrides_change_fields_like_the_file_would() {
    let path = manifests_dir().join("micro.yaml");
    let src = std::fs::read_to_string(&path).unwrap();
    let overrides = [
        "spec.parallelism.schedule=dualpipev".to_string(),
        "spec.training.steps=9".to_string(),
        "metadata.labels.owner=ci".to_string(),
        "spec.model.overrides.n_group=2".to_string(),
        "spec.data.synthetic.kind=skewed".to_string(),
        "spec.resources={device: simulated, simulatedCosts: {forward: 1ms, backward: 2ms, backwardInput: 1ms, weight: 1ms, overlapped: 3ms}}".to_string(),
    ];
    let job = parse_job(&src, "micro.yaml", &overrides).unwrap();
    assert_eq!(job.spec.parallelism.schedule, Schedule::DualPipeV);
    assert_eq!(job.spec.training.steps, 9);
    assert_eq!(job.metadata.labels["owner"], "ci");
    assert_eq!(
        job.spec.data,
        manifest::DataSource::Synthetic(manifest::SyntheticData {
            kind: "skewed".into()
        })
    );
    let costs = job.spec.resources.simulated_costs.clone().unwrap();
    assert_eq!(costs.overlapped, std::time::Duration::from_millis(3));
    assert_eq!(job.spec.resources.device, manifest::DeviceKind::Simulated);
    let model = job.model_config(std::path::Path::new(".")).unwrap();
    assert_eq!(model.n_group, 2);
    assert_eq!(model.num_hidden_layers, 8);
}

#[test]
fn v3_job_places_on_the_v3_cluster() {
    let job = load("dsv3-671b.yaml");
    let v3 = cluster("v3-2048.yaml");
    assert_eq!(v3.total_devices(), 2048);
    let path = manifests_dir().join("dsv3-671b.yaml");
    let src = std::fs::read_to_string(&path).unwrap();
    parse_job_for_cluster(&src, "dsv3-671b.yaml", &[], &v3).unwrap();
    let model = job.model_config(std::path::Path::new(".")).unwrap();
    let req = job.placement_request(&model);
    let placement = plan::placement::place(&req, &v3).unwrap();
    placement.verify(&req, &v3).unwrap();

    let small = cluster("two-by-four.yaml");
    let err = job.check_cluster(&model, &small).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.parallelism: world size 2048 (pipeline 16 × data 128) exceeds what the cluster can ever hold: 8 ranks (8 devices in 2 nodes)"
    );
    let tiny = load("tiny.yaml");
    let tiny_model = tiny.model_config(std::path::Path::new(".")).unwrap();
    let req = tiny.placement_request(&tiny_model);
    let placement = plan::placement::place(&req, &small).unwrap();
    placement.verify(&req, &small).unwrap();
}

#[test]
fn cluster_manifest_errors_are_located() {
    let header = "apiVersion: moetrain/v1\nkind: Cluster\nmetadata:\n  name: c\nspec:\n";
    let cases = [
        (
            "  nodeGroups:\n    - prefix: ''\n      count: 2\n      devicesPerNode: 4\n",
            "c.yaml:7:7: spec.nodeGroups[0].prefix: must not be empty",
        ),
        (
            "  nodes:\n    - name: a\n      devices: 4\n    - name: a\n      devices: 2\n",
            "c.yaml:5:1: spec: invalid cluster: node a appears twice",
        ),
        (
            "  nodes:\n    - name: a\n      gpus: 4\n",
            "c.yaml:8:7: spec.nodes[0].gpus: unknown field `gpus`, expected `name` or `devices`",
        ),
        ("  nodes: []\n", "c.yaml:5:1: spec: lists no nodes"),
    ];
    for (body, expected) in cases {
        let err = parse_cluster(&format!("{header}{body}"), "c.yaml").unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn config_path_resolves_against_the_manifest_and_becomes_absolute() {
    // `origin` sits in the repository root, so `../shared/golden/v3-tiny` (a directory holding an
    // HF config.json) resolves against it.
    let origin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../job.yaml");
    let src = "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: golden\nspec:\n  model:\n    configPath: ../shared/golden/v3-tiny\n";
    let job = parse_job(src, &origin.display().to_string(), &[]).unwrap();
    let stored = job.spec.model.config_path.clone().unwrap();
    assert!(std::path::Path::new(&stored).is_absolute(), "{stored}");
    assert!(stored.ends_with("config.json"), "{stored}");
    let model = job
        .model_config(std::path::Path::new("/nonexistent"))
        .unwrap();
    assert_eq!(model.hidden_size, 256);

    let missing = src.replace("v3-tiny", "v9");
    let err = parse_job(&missing, &origin.display().to_string(), &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(":7:5: spec.model.configPath: cannot read "),
        "{text}"
    );
}
