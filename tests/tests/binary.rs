//! The real `sluice` binary against the real broker and Redis: crashes,
//! graceful stops, the HTTP push handler, and command-line errors.

use std::process::Command;
use std::time::Duration;

use pipeline::envelope::headers;
use serde_json::json;
use sluice_tests::*;

const HANG_GUARD: Duration = Duration::from_secs(120);

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("bin"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_then_restart_handles_every_job() {
    let settings = settings("kill9", 3);
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());
    let count = 300;
    let records: Vec<_> = (0..count)
        .map(|i| {
            job(
                topics.main(),
                &format!("k9-{i}"),
                &format!("key-{}", i % 40),
                json!({"sleep_ms": 30}),
            )
        })
        .collect();
    produce(&records).await;

    let first = WorkerProcess::start(&config);
    wait_until("jobs in flight", HANG_GUARD, || async {
        webhook.deliveries().len() >= 60
    })
    .await;
    first.signal("KILL");
    let mut first = first;
    first
        .wait(Duration::from_secs(10))
        .expect("killed worker exits");
    assert!(
        webhook.delivered().len() < count,
        "the kill came after every job finished; the test needs jobs in flight"
    );

    let second = WorkerProcess::start(&config);
    let main = vec![topics.main().to_owned()];
    wait_until("lag 0 after restart", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &main).await == 0
    })
    .await;
    let delivered = webhook.delivered();
    for i in 0..count {
        assert!(
            delivered.contains_key(&format!("k9-{i}")),
            "job k9-{i} was never delivered"
        );
    }
    for p in offsets(&settings.worker.group_id, topics.main()).await {
        assert_eq!(
            p.committed,
            Some(p.log_end),
            "partition {} committed offset",
            p.partition
        );
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_commits_and_exits_zero() {
    let mut settings = settings("sigterm", 2);
    settings.worker.drain_deadline_ms = 8_000;
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());
    let count = 200;
    let records: Vec<_> = (0..count)
        .map(|i| {
            job(
                topics.main(),
                &format!("st-{i}"),
                &format!("key-{i}"),
                json!({"sleep_ms": 400}),
            )
        })
        .collect();
    produce(&records).await;

    let mut worker = WorkerProcess::start(&config);
    wait_until("jobs in flight", HANG_GUARD, || async {
        webhook.deliveries().len() >= 20
    })
    .await;
    let signaled = std::time::Instant::now();
    worker.signal("TERM");
    let status = worker
        .wait(Duration::from_secs(30))
        .expect("worker exits after SIGTERM within the drain deadline");
    // Kubernetes kills a pod after its grace period; the worker must be out
    // by the drain deadline plus the time to commit and leave the group.
    let took = signaled.elapsed();
    assert!(
        took < Duration::from_millis(settings.worker.drain_deadline_ms + 5_000),
        "worker took {took:?} to stop"
    );
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        worker.log_text()
    );
    let log = worker.log_text();
    assert!(log.contains("left the consumer group"), "{log}");

    // Everything handled before the stop is committed: the committed offset
    // of each partition is past every delivered job.
    let delivered_before = webhook.delivered();
    let committed: i64 = offsets(&settings.worker.group_id, topics.main())
        .await
        .iter()
        .map(|p| p.committed.unwrap_or(0))
        .sum();
    assert!(committed > 0, "nothing was committed at the stop");
    assert!(
        committed as usize <= delivered_before.len(),
        "committed past unfinished jobs"
    );

    let second = WorkerProcess::start(&config);
    wait_until("every job after restart", HANG_GUARD, || async {
        webhook.delivered().len() == count
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &[topics.main().to_owned()]).await == 0
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_push_walks_tiers_with_idempotency_key() {
    let settings = settings("http", 1);
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());
    produce(&[
        job(topics.main(), "http-fail", "a", json!({"mode": "fail"})),
        job(
            topics.main(),
            "http-first",
            "b",
            json!({"mode": "fail_first"}),
        ),
        job(topics.main(), "http-reject", "c", json!({"mode": "reject"})),
        job(topics.main(), "http-ok", "d", json!({"mode": "ok"})),
        job(
            topics.main(),
            "http-redirect",
            "e",
            json!({"mode": "redirect"}),
        ),
    ])
    .await;

    let worker = WorkerProcess::start(&config);
    let dlq = topics.dlq();
    wait_until("three dead letters", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 3
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &topics.all()[..3]).await == 0
    })
    .await;
    drop(worker);

    let attempts = |id: &str| -> Vec<(u32, u16)> {
        webhook
            .deliveries()
            .into_iter()
            .filter(|d| d.idempotency_key == id)
            .map(|d| (d.attempt, d.status))
            .collect()
    };
    assert_eq!(attempts("http-fail"), vec![(1, 503), (2, 503), (3, 503)]);
    assert_eq!(attempts("http-first"), vec![(1, 503), (2, 204)]);
    assert_eq!(attempts("http-reject"), vec![(1, 400)]);
    assert_eq!(attempts("http-ok"), vec![(1, 204)]);
    // A redirect is not followed (it would resend the job as a GET).
    assert_eq!(attempts("http-redirect"), vec![(1, 301)]);

    let dead = read_all(&dlq).await;
    let by_id = |id: &str| {
        dead.iter()
            .find(|r| header(&r.headers, headers::JOB_ID) == Some(id))
            .expect(id)
    };
    assert_eq!(
        header(&by_id("http-fail").headers, headers::ERROR_CLASS),
        Some("http_5xx")
    );
    assert_eq!(
        header(&by_id("http-fail").headers, headers::ATTEMPT),
        Some("3")
    );
    assert_eq!(
        header(&by_id("http-reject").headers, headers::ERROR_CLASS),
        Some("http_4xx")
    );
    assert_eq!(
        header(&by_id("http-redirect").headers, headers::ERROR_CLASS),
        Some("http_status")
    );
}

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(sluice_binary())
        .args(args)
        .output()
        .expect("run sluice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_reports_bad_lines_by_number() {
    let settings = settings("produce", 2);
    let topics = Topics::create(&settings).await;
    let dir = temp_dir();
    let input = dir.join("input.ndjson");
    std::fs::write(
        &input,
        "{\"id\":\"1\",\"repo\":\"a\"}\n{oops\n\n{\"id\":\"3\"}\n{\"id\":\"4\",\"repo\":\"b\"}\n",
    )
    .unwrap();
    let input = input.to_str().unwrap();
    let brokers = brokers();
    let base = [
        "produce",
        "--topic",
        topics.main(),
        "--input",
        input,
        "--key-field",
        "/repo",
        "--id-field",
        "/id",
        "--brokers",
        &brokers,
    ];

    let failed = sluice(&base);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("line 2: not valid JSON"), "{stderr}");
    assert!(stderr.contains("--on-bad-line skip"), "{stderr}");

    let missing = sluice(&[
        "produce",
        "--topic",
        "t-no-such-topic",
        "--input",
        input,
        "--brokers",
        &brokers,
    ]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("topics ensure"), "{stderr}");

    let mut args = base.to_vec();
    args.extend(["--on-bad-line", "skip", "--json"]);
    let skipped = sluice(&args);
    assert!(
        skipped.status.success(),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&skipped.stdout).expect("JSON summary");
    assert_eq!(summary["produced"], 2);
    assert_eq!(summary["skipped_lines"], 2);
    assert_eq!(summary["bad_lines"], json!([2, 4]));
    assert_eq!(summary["blank_lines"], 1);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(
        stderr.contains("line 4: missing key field /repo"),
        "{stderr}"
    );

    // The failed run stopped at line 2 after delivering line 1.
    let records = read_all(topics.main()).await;
    assert_eq!(records.len(), 3);
    assert_eq!(header(&records[0].headers, headers::JOB_ID), Some("1"));
}

#[test]
fn bad_settings_name_the_key_and_fix() {
    let dir = temp_dir();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[topic]\nname = \"jobs\"\n[worker]\ngroup_id = \"g\"\nmax_in_flight = 0\n[handler]\nkind = \"noop\"\n",
    )
    .unwrap();
    let output = sluice(&["config", "check", "--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("worker.max_in_flight"), "{stderr}");
    assert!(stderr.contains("at least 1"), "{stderr}");

    std::fs::write(&path, "[topic]\nname = \"jobs\"\nmax_inflight = 3\n").unwrap();
    let output = sluice(&["config", "check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_inflight"), "{stderr}");

    let output = sluice(&["config", "check", "--config", "/nonexistent.toml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("file not found"), "{stderr}");

    let output = Command::new(sluice_binary())
        .args(["config", "check", "--config", path.to_str().unwrap()])
        .env("SLUICE_WORKER__MAX_IN_FLIGHT", "zero")
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_ensure_creates_then_reports_mismatch() {
    let settings = settings("ensure", 2);
    let dir = temp_dir();
    let config = write_config(&dir, &settings, "kind = \"noop\"");
    let config = config.to_str().unwrap();

    let created = sluice(&["topics", "ensure", "--config", config, "--json"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    // From here on the topics exist; delete them when the test ends.
    let topics = Topics {
        settings: settings.clone(),
    };
    let report: serde_json::Value = serde_json::from_slice(&created.stdout).expect("JSON report");
    let statuses: Vec<&str> = report["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["result"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["created"; 4]);

    let again = sluice(&["topics", "ensure", "--config", config]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("exists, matches"));

    let changed = Command::new(sluice_binary())
        .args(["topics", "ensure", "--config", config])
        .env("SLUICE_TOPIC__PARTITIONS", "3")
        .output()
        .unwrap();
    assert_eq!(changed.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&changed.stdout);
    assert!(
        stdout.contains("MISMATCH: partitions: wanted 3, actual 2"),
        "{stdout}"
    );
    let partitions = offsets(&settings.worker.group_id, topics.main())
        .await
        .len();
    assert_eq!(partitions, 2, "ensure must not change an existing topic");
}

#[test]
fn secrets_stay_out_of_logs_and_help() {
    let dir = temp_dir();
    let path = dir.join("secret.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\nsecurity_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"app\"\n\
         [kafka.properties]\n\"ssl.key.password\" = \"pw-prop-7731\"\n\
         [topic]\nname = \"jobs\"\n[dedupe]\nredis_url = \"redis://app:pw-url-7731@127.0.0.1:1\"\n\
         [worker]\ngroup_id = \"g\"\n[handler]\nkind = \"noop\"\n[server]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let secrets = [
        "pw-kafka-7731",
        "pw-redis-7731",
        "pw-url-7731",
        "pw-prop-7731",
        "secret-broker-7731",
    ];
    let run = |args: &[&str]| {
        let output = Command::new(sluice_binary())
            .args(args)
            .env("SLUICE_KAFKA__SASL_PASSWORD", "pw-kafka-7731")
            .env("SLUICE_DEDUPE__REDIS_PASSWORD", "pw-redis-7731")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let config = path.to_str().unwrap();
    let mut outputs = vec![run(&["config", "check", "--config", config])];
    for help in [
        vec!["--help"],
        vec!["work", "--help"],
        vec!["produce", "--help"],
        vec!["replay", "--help"],
    ] {
        let output = Command::new(sluice_binary())
            .args(&help)
            .env("SLUICE_KAFKA__BROKERS", "secret-broker-7731")
            .env("SLUICE_CONFIG", config)
            .output()
            .unwrap();
        outputs.push(String::from_utf8_lossy(&output.stdout).into_owned());
    }

    // A worker that cannot reach its brokers logs errors; none may carry a
    // secret. It stops on SIGTERM after a few seconds of trying.
    let mut worker = std::process::Command::new(sluice_binary())
        .args(["work", "--config", config])
        .env("SLUICE_KAFKA__SASL_PASSWORD", "pw-kafka-7731")
        .env("SLUICE_DEDUPE__REDIS_PASSWORD", "pw-redis-7731")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status();
    std::thread::sleep(Duration::from_secs(2));
    let _ = worker.kill();
    let output = worker.wait_with_output().unwrap();
    outputs.push(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ));

    assert!(outputs[0].contains("valid"), "{}", outputs[0]);
    assert!(
        outputs.last().unwrap().len() > 100,
        "the worker logged something"
    );
    for (index, text) in outputs.iter().enumerate() {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "output {index} contains {secret}:\n{text}"
            );
        }
    }
}
