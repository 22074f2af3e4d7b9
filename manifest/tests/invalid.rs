//! Issue 2, acceptance 4: a table of invalid manifests, each rejected with its exact message —
//! the field path, and the line and column (or `--set` argument) where the field was written.
//!
//! Invariant: every case starts from the same valid header, so its line numbers are easy to read:
//! line 1 `apiVersion`, 3 `metadata`, 5 `spec`, 6 `model`, 7 `preset`, and the case's own lines
//! from line 8 on.

use manifest::{parse_job, parse_job_for_cluster};
use plan::topology::Cluster;

const HEADER: &str = "apiVersion: moetrain/v1
kind: TrainingJob
metadata:
  name: bad
spec:
  model:
    preset: tiny
";

struct Case {
    name: &'static str,
    /// Appended to `HEADER` unless `whole` is set.
    body: &'static str,
    /// A whole document instead of `HEADER + body`.
    whole: bool,
    overrides: &'static [&'static str],
    /// Check against 2 nodes × 4 devices as well.
    cluster: bool,
    expected: &'static str,
}

const fn case(name: &'static str, body: &'static str, expected: &'static str) -> Case {
    Case {
        name,
        body,
        whole: false,
        overrides: &[],
        cluster: false,
        expected,
    }
}

const CASES: &[Case] = &[
    case(
        "dualpipe with an odd pipeline degree",
        "  parallelism:\n    pipeline: 3\n    schedule: dualpipe\n",
        "bad.yaml:9:5: spec.parallelism.pipeline: DualPipe needs an even pipeline degree, got 3",
    ),
    case(
        "dualpipe with fewer than 2P micro-batches",
        "  parallelism:\n    pipeline: 4\n    schedule: dualpipe\n    microBatches: 6\n",
        "bad.yaml:11:5: spec.parallelism.microBatches: dualpipe needs at least 2 × pipeline = 8 micro-batches, got 6",
    ),
    case(
        "dualpipe with an odd micro-batch count",
        "  parallelism:\n    pipeline: 4\n    schedule: dualpipe\n    microBatches: 9\n",
        "bad.yaml:11:5: spec.parallelism.microBatches: DualPipe needs an even number of micro-batches, got 9",
    ),
    case(
        "dualpipev with fewer than 2P micro-batches",
        "  parallelism:\n    pipeline: 2\n    schedule: dualpipev\n    microBatches: 3\n",
        "bad.yaml:11:5: spec.parallelism.microBatches: dualpipev needs at least 2 × pipeline = 4 micro-batches, got 3",
    ),
    case(
        "1f1b with fewer micro-batches than stages",
        "  parallelism:\n    pipeline: 4\n    schedule: 1f1b\n    microBatches: 2\n",
        "bad.yaml:11:5: spec.parallelism.microBatches: 1f1b needs at least pipeline = 4 micro-batches, got 2",
    ),
    case(
        "expert degree not dividing the data degree",
        "  parallelism:\n    data: 4\n    expert: 3\n",
        "bad.yaml:10:5: spec.parallelism.expert: expert degree 3 must divide data degree 4",
    ),
    case(
        "routed experts not divisible by the expert degree",
        "  parallelism:\n    data: 6\n    expert: 6\n",
        "bad.yaml:10:5: spec.parallelism.expert: 16 routed experts do not divide over expert degree 6",
    ),
    case(
        "routed experts not divisible by the group count",
        "    overrides:\n      n_group: 3\n",
        "bad.yaml:9:7: spec.model.overrides.n_group: n_routed_experts 16 is not divisible by n_group 3",
    ),
    case(
        "more top-k groups than groups",
        "    overrides:\n      topk_group: 5\n",
        "bad.yaml:9:7: spec.model.overrides.topk_group: 5 must be in 1..=n_group (4)",
    ),
    case(
        "fewer layers than dualpipev stages",
        "  parallelism:\n    pipeline: 4\n    schedule: dualpipev\n",
        "bad.yaml:9:5: spec.parallelism.pipeline: dualpipev with pipeline 4 cuts the model into 8 stages, but it has only 4 layers",
    ),
    Case {
        cluster: true,
        ..case(
            "a world size larger than the cluster can ever hold",
            "  parallelism:\n    pipeline: 2\n    data: 8\n    expert: 8\n",
            "bad.yaml:8:3: spec.parallelism: world size 16 (pipeline 2 × data 8) exceeds what the cluster can ever hold: 8 ranks (8 devices in 2 nodes)",
        )
    },
    case(
        "zero sequence length",
        "  training:\n    seqLen: 0\n",
        "bad.yaml:9:5: spec.training.seqLen: must be at least 1, got 0",
    ),
    case(
        "zero micro-batch size",
        "  training:\n    microBatchSize: 0\n",
        "bad.yaml:9:5: spec.training.microBatchSize: must be at least 1, got 0",
    ),
    case(
        "sequence longer than the model's positions",
        "  training:\n    seqLen: 2048\n",
        "bad.yaml:9:5: spec.training.seqLen: 2048 exceeds the model's max_position_embeddings (1024)",
    ),
    case(
        "an unknown field",
        "  training:\n    steps: 10\n    stepz: 20\n",
        "bad.yaml:10:5: spec.training.stepz: unknown field `stepz`, expected one of `steps`, `seqLen`, `microBatchSize`, `optimizer`, `precision`, `mtp`, `biasUpdate`, `balanceLossWeight`, `seed`",
    ),
    case(
        "a bad enum value",
        "  training:\n    precision: fp16\n",
        "bad.yaml:9:5: spec.training.precision: unknown variant `fp16`, expected one of `fp8`, `fp8-ue8m0`, `bf16`, `fp32`",
    ),
    case(
        "a bad schedule name",
        "  parallelism:\n    schedule: zerobubble\n",
        "bad.yaml:9:5: spec.parallelism.schedule: unknown variant `zerobubble`, expected one of `dualpipe`, `dualpipev`, `1f1b`",
    ),
    case(
        "a string where a number belongs",
        "  training:\n    steps: many\n",
        "bad.yaml:9:5: spec.training.steps: invalid type: string \"many\", expected u64",
    ),
    case(
        "a negative count",
        "  parallelism:\n    data: -2\n",
        "bad.yaml:9:5: spec.parallelism.data: invalid value: integer `-2`, expected u32",
    ),
    case(
        "an unparsable duration",
        "  faultTolerance:\n    failureTimeout: 5 parsecs\n",
        "bad.yaml:9:5: spec.faultTolerance.failureTimeout: invalid duration \"5 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations) (write e.g. \"1s\" or \"500ms\")",
    ),
    case(
        "a failure timeout not above the heartbeat interval",
        "  faultTolerance:\n    heartbeatInterval: 2s\n    failureTimeout: 1s\n",
        "bad.yaml:10:5: spec.faultTolerance.failureTimeout: must be longer than heartbeatInterval (2s), got 1s",
    ),
    case(
        "two data sources",
        "  data:\n    synthetic: {}\n    text:\n      path: a.txt\n",
        "bad.yaml:8:3: spec.data: expected a mapping with exactly one key naming the variant, one of `synthetic`, `text`, `tokens`",
    ),
    case(
        "a token file without a dtype",
        "  data:\n    tokens:\n      path: t.bin\n",
        "bad.yaml:9:5: spec.data.tokens: missing field `dtype`",
    ),
    case(
        "a checkpoint interval without a directory",
        "  checkpointing:\n    interval: 50\n",
        "bad.yaml:8:3: spec.checkpointing.dir: is required when checkpointing.interval is set (interval 50)",
    ),
    Case {
        whole: true,
        ..case(
            "fp8 on a model whose GEMMs are not 128-aligned",
            "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: bad\nspec:\n  model:\n    preset: micro\n  training:\n    precision: fp8\n",
            "bad.yaml:9:5: spec.training.precision: fp8 needs every GEMM inner dimension to be a multiple of 128, but hidden_size is 32",
        )
    },
    case(
        "an MTP depth beyond the model's MTP modules",
        "  training:\n    mtp:\n      depth: 2\n",
        "bad.yaml:10:7: spec.training.mtp.depth: 2 exceeds the model's num_nextn_predict_layers (1)",
    ),
    case(
        "an unknown model override key",
        "    overrides:\n      num_layers: 8\n",
        "bad.yaml:9:7: spec.model.overrides.num_layers: is not a deepseek_v3 config.json key",
    ),
    case(
        "both a preset and a config path",
        "    configPath: model/config.json\n",
        "bad.yaml:6:3: spec.model: set exactly one of `preset` or `configPath`",
    ),
    case(
        "simulated costs on a real device",
        "  resources:\n    device: cuda\n    simulatedCosts:\n      forward: 1ms\n      backward: 2ms\n      backwardInput: 1ms\n      weight: 1ms\n      overlapped: 3ms\n",
        "bad.yaml:10:5: spec.resources.simulatedCosts: is only used with device: simulated, but device is cuda",
    ),
    case(
        "more than one device per rank",
        "  resources:\n    devicesPerRank: 2\n",
        "bad.yaml:9:5: spec.resources.devicesPerRank: only 1 device per rank is supported (no tensor parallelism), got 2",
    ),
    Case {
        whole: true,
        ..case(
            "an unknown model preset",
            "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: bad\nspec:\n  model:\n    preset: v4\n",
            "bad.yaml:7:5: spec.model.preset: unknown model preset `v4` (known: v3-671b, tiny, micro)",
        )
    },
    Case {
        whole: true,
        ..case(
            "a future apiVersion",
            "apiVersion: moetrain/v2\nkind: TrainingJob\nmetadata:\n  name: bad\nspec:\n  model:\n    preset: tiny\n",
            "bad.yaml:1:1: apiVersion: unknown variant `moetrain/v2`, expected `moetrain/v1`",
        )
    },
    Case {
        whole: true,
        ..case(
            "a missing job name",
            "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  labels: {}\nspec:\n  model:\n    preset: tiny\n",
            "bad.yaml:3:1: metadata: missing field `name`",
        )
    },
    Case {
        whole: true,
        ..case(
            "an invalid job name",
            "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: Big_Job\nspec:\n  model:\n    preset: tiny\n",
            "bad.yaml:4:3: metadata.name: \"Big_Job\" is not a valid name: use 1–63 lowercase letters, digits or '-', starting and ending with a letter or digit",
        )
    },
    Case {
        whole: true,
        ..case(
            "malformed YAML",
            "apiVersion: moetrain/v1\nkind: [\n",
            "bad.yaml:2:7: unclosed bracket '['",
        )
    },
    case(
        "a duplicate key",
        "  training:\n    steps: 10\n    steps: 20\n",
        "bad.yaml:10:5: duplicate mapping key: steps",
    ),
    Case {
        overrides: &["spec.parallelism.pipelines=4"],
        ..case(
            "an override of an unknown path",
            "",
            "--set spec.parallelism.pipelines=4: spec.parallelism.pipelines: unknown field `pipelines`, expected one of `pipeline`, `data`, `expert`, `schedule`, `microBatches`, `overlap`",
        )
    },
    Case {
        overrides: &[
            "spec.parallelism.schedule=dualpipe",
            "spec.parallelism.pipeline=3",
        ],
        ..case(
            "an override that breaks a rule",
            "",
            "--set spec.parallelism.pipeline=3: spec.parallelism.pipeline: DualPipe needs an even pipeline degree, got 3",
        )
    },
    Case {
        overrides: &["spec.training.steps=ten"],
        ..case(
            "an override with a value of the wrong type",
            "  training:\n    steps: 10\n",
            "--set spec.training.steps=ten: spec.training.steps: invalid type: string \"ten\", expected u64",
        )
    },
    Case {
        overrides: &["spec.training.steps"],
        ..case(
            "an override without a value",
            "",
            "--set spec.training.steps: expected path.to.field=value",
        )
    },
    Case {
        overrides: &["spec.training.steps.max=3"],
        ..case(
            "an override inside a scalar",
            "  training:\n    steps: 10\n",
            "--set spec.training.steps.max=3: spec.training.steps: is not a mapping, so `--set spec.training.steps.max=3` cannot set a field inside it",
        )
    },
];

#[test]
fn invalid_manifests_are_rejected_with_exact_messages() {
    assert!(CASES.len() >= 15);
    let cluster = Cluster::uniform("node-", 2, 4);
    let mut failures = Vec::new();
    for case in CASES {
        let src = if case.whole {
            case.body.to_string()
        } else {
            format!("{HEADER}{}", case.body)
        };
        let overrides: Vec<String> = case.overrides.iter().map(|s| s.to_string()).collect();
        let result = if case.cluster {
            parse_job_for_cluster(&src, "bad.yaml", &overrides, &cluster)
        } else {
            parse_job(&src, "bad.yaml", &overrides)
        };
        match result {
            Ok(_) => failures.push(format!("{}: accepted", case.name)),
            Err(err) if err.to_string() != case.expected => failures.push(format!(
                "{}:\n  expected {}\n  got      {}",
                case.name, case.expected, err
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
