//! Traces, metrics and probes of the real `sluice` binary, with an OTLP
//! receiver inside the test.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use pipeline::produce::OutgoingRecord;
use serde_json::json;
use sluice_tests::*;

const HANG_GUARD: Duration = Duration::from_secs(120);
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("telemetry"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Stops a worker with SIGTERM so it flushes its spans, and checks it exits 0.
fn stop(mut worker: WorkerProcess) {
    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(30)).expect("worker exits");
    assert!(status.success(), "{status}; log:\n{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_follows_job_across_every_hop() {
    let settings = settings("trace", 1);
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let otlp = OtlpReceiver::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());

    // Produce with the real CLI, which starts the producer span.
    let input = dir.join("input.ndjson");
    std::fs::write(
        &input,
        "{\"id\":\"traced\",\"repo\":\"r\",\"mode\":\"fail\"}\n",
    )
    .unwrap();
    let produced = Command::new(sluice_binary())
        .args([
            "produce",
            "--topic",
            topics.main(),
            "--key-field",
            "/repo",
            "--id-field",
            "/id",
            "--brokers",
            &brokers(),
        ])
        .arg("--input")
        .arg(&input)
        .envs(otlp.env())
        .output()
        .unwrap();
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );

    let worker = WorkerProcess::start_with_env(&config, &otlp.env());
    let dlq = topics.dlq();
    wait_until("the dead letter", HANG_GUARD, || async {
        !read_all(&dlq).await.is_empty()
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &topics.all()[..3]).await == 0
    })
    .await;
    stop(worker);

    let spans = otlp.spans();
    let send_main = spans
        .iter()
        .find(|s| s.name == format!("send {}", topics.main()))
        .expect("producer span of the main topic");
    let trace: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == send_main.trace_id)
        .collect();
    let messaging: Vec<&ReceivedSpan> =
        trace.iter().copied().filter(|s| s.kind != CLIENT).collect();
    assert_eq!(messaging.len(), 7, "{messaging:#?}");

    // Walk the chain from the root: each hop is the only child of the one
    // before it.
    let expected = [
        (format!("send {}", topics.main()), PRODUCER),
        (format!("process {}", topics.main()), CONSUMER),
        (format!("send {}", topics.tier(0)), PRODUCER),
        (format!("process {}", topics.tier(0)), CONSUMER),
        (format!("send {}", topics.tier(1)), PRODUCER),
        (format!("process {}", topics.tier(1)), CONSUMER),
        (format!("send {}", topics.dlq()), PRODUCER),
    ];
    assert_eq!(
        send_main.parent_span_id, "",
        "the first send span is the root"
    );
    let mut parent = send_main;
    let mut chain = vec![parent];
    for (name, kind) in &expected[1..] {
        let child = messaging
            .iter()
            .find(|s| s.parent_span_id == parent.span_id && s.kind != CLIENT)
            .unwrap_or_else(|| panic!("no child of {} ; expected {name}", parent.name));
        assert_eq!(&child.name, name);
        assert_eq!(child.kind, *kind, "kind of {name}");
        chain.push(child);
        parent = child;
    }
    assert_eq!(chain[0].kind, PRODUCER);

    for span in &chain {
        assert_eq!(
            span.attributes.get("messaging.system").map(String::as_str),
            Some("kafka"),
            "{}",
            span.name
        );
        assert_eq!(
            span.attributes.get("sluice.job.id").map(String::as_str),
            Some("traced"),
            "{}",
            span.name
        );
    }
    let process: Vec<&&ReceivedSpan> = chain.iter().filter(|s| s.kind == CONSUMER).collect();
    let attribute =
        |span: &ReceivedSpan, key: &str| span.attributes.get(key).cloned().unwrap_or_default();
    assert_eq!(
        process
            .iter()
            .map(|s| attribute(s, "sluice.attempt"))
            .collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert_eq!(
        process
            .iter()
            .map(|s| attribute(s, "sluice.outcome"))
            .collect::<Vec<_>>(),
        ["retry", "retry", "dead_letter"]
    );
    assert_eq!(
        process
            .iter()
            .map(|s| attribute(s, "sluice.tier"))
            .collect::<Vec<_>>(),
        ["main", "retry-1s", "retry-2s"]
    );
    for span in &process {
        assert_eq!(attribute(span, "messaging.operation.type"), "process");
        assert_eq!(
            attribute(span, "messaging.consumer.group.name"),
            settings.worker.group_id
        );
        assert_eq!(attribute(span, "error.type"), "http_5xx");
        assert_eq!(span.status_code, 2, "process span status is error");
    }

    // The HTTP call of each attempt is a client span under its process span.
    for span in &process {
        let calls: Vec<_> = trace
            .iter()
            .filter(|s| s.kind == CLIENT && s.parent_span_id == span.span_id)
            .collect();
        assert_eq!(calls.len(), 1, "one POST under {}", span.name);
        assert_eq!(attribute(calls[0], "http.response.status_code"), "503");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_record_keeps_its_own_trace() {
    let settings = settings("trace-batch", 1);
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let otlp = OtlpReceiver::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());

    // Three records in one batch, produced without tracing in this process:
    // one without trace headers, two with their own (as another client
    // would send them).
    let traced = |id: &str, trace: &str, span: &str| {
        let mut record = job(topics.main(), id, "k", json!({}));
        record.headers.push((
            "traceparent".into(),
            Some(format!("00-{trace}-{span}-01").into_bytes()),
        ));
        record
    };
    let records: Vec<OutgoingRecord> = vec![
        job(topics.main(), "no-context", "k", json!({})),
        traced(
            "first",
            "11111111111111111111111111111111",
            "aaaaaaaaaaaaaaaa",
        ),
        traced(
            "second",
            "22222222222222222222222222222222",
            "bbbbbbbbbbbbbbbb",
        ),
    ];
    produce(&records).await;

    let worker = WorkerProcess::start_with_env(&config, &otlp.env());
    wait_until("three deliveries", HANG_GUARD, || async {
        webhook.delivered().len() == 3
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &[topics.main().to_owned()]).await == 0
    })
    .await;
    stop(worker);

    let spans = otlp.spans();
    let process: HashMap<String, &ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == CONSUMER)
        .filter_map(|s| Some((s.attributes.get("sluice.job.id")?.clone(), s)))
        .collect();
    let root = process
        .get("no-context")
        .expect("span of the record without context");
    assert_eq!(
        root.parent_span_id, "",
        "a record without trace headers starts a new trace"
    );
    assert_ne!(root.trace_id, "11111111111111111111111111111111");
    assert_ne!(root.trace_id, "22222222222222222222222222222222");

    let first = process.get("first").expect("span of first");
    assert_eq!(first.trace_id, "11111111111111111111111111111111");
    assert_eq!(first.parent_span_id, "aaaaaaaaaaaaaaaa");
    let second = process.get("second").expect("span of second");
    assert_eq!(second.trace_id, "22222222222222222222222222222222");
    assert_eq!(second.parent_span_id, "bbbbbbbbbbbbbbbb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_and_readiness_follows_redis() {
    let mut redis = PrivateRedis::start();
    let mut settings = settings("metrics", 2);
    settings.dedupe.redis_url = redis.url();
    let topics = Topics::create(&settings).await;
    let webhook = Webhook::start().await;
    let dir = temp_dir();
    let config = write_config(&dir, &settings, &webhook.handler_section());
    // Statistics (and so the lag metric) every second instead of five.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[kafka.properties]\n\"statistics.interval.ms\" = \"1000\"\n");
    std::fs::write(&config, text).unwrap();
    let base = format!("http://{}", server_address(&config));

    produce(&[
        job(topics.main(), "m-ok-1", "a", json!({})),
        job(topics.main(), "m-ok-2", "b", json!({})),
        job(topics.main(), "m-ok-3", "c", json!({})),
        job(topics.main(), "m-retry", "d", json!({"mode": "fail_first"})),
        job(topics.main(), "m-reject", "e", json!({"mode": "reject"})),
    ])
    .await;
    let worker = WorkerProcess::start(&config);
    wait_until("four deliveries", HANG_GUARD, || async {
        webhook.delivered().len() == 4
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &topics.all()[..3]).await == 0
    })
    .await;

    let main = topics.main();
    let handled = |tier: &str, outcome: &str| {
        format!(
            "sluice_jobs_handled_total{{topic=\"{main}\",tier=\"{tier}\",outcome=\"{outcome}\"}}"
        )
    };
    let tier_topic = topics.tier(0);
    let retried_success = format!(
        "sluice_jobs_handled_total{{topic=\"{tier_topic}\",tier=\"retry-1s\",outcome=\"success\"}}"
    );
    // The lag metric follows librdkafka's statistics, a second behind.
    let lag_series: Vec<String> = (0..2)
        .map(|p| format!("sluice_consumer_lag{{topic=\"{main}\",partition=\"{p}\"}}"))
        .collect();
    let metrics_url = format!("{base}/metrics");
    wait_until("lag metric 0 on both partitions", HANG_GUARD, || async {
        let (_, text) = http_get(&metrics_url).await;
        lag_series
            .iter()
            .all(|s| metric_value(&text, s) == Some(0.0))
    })
    .await;
    let (status, text) = http_get(&metrics_url).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&text, &handled("main", "success")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &handled("main", "retry")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &handled("main", "dead_letter")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric_value(&text, &retried_success), Some(1.0), "{text}");
    assert_eq!(
        metric_value(
            &text,
            "sluice_retries_total{tier=\"retry-1s\",error_class=\"http_5xx\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "sluice_dead_letters_total{error_class=\"http_4xx\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_handler_duration_seconds_count{tier=\"main\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "sluice_jobs_in_flight"),
        Some(0.0),
        "{text}"
    );
    assert!(!text.contains("m-ok-1"), "no job id may become a label");

    // Probes: live and ready, then not ready while Redis is down.
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
    redis.stop();
    let readyz = format!("{base}/readyz");
    wait_until("readyz to fail without Redis", HANG_GUARD, || async {
        let (status, body) = http_get(&readyz).await;
        status == 503 && body.contains("Redis")
    })
    .await;
    assert_eq!(
        http_get(&format!("{base}/healthz")).await.0,
        200,
        "liveness does not depend on Redis"
    );
    redis.resume();
    wait_until("readyz to recover", HANG_GUARD, || async {
        http_get(&readyz).await.0 == 200
    })
    .await;

    // `sluice status` agrees: nothing left, one dead letter.
    let output = Command::new(sluice_binary())
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let topics_json = status["topics"].as_array().unwrap();
    assert_eq!(topics_json[0]["topic"], main);
    assert_eq!(topics_json[0]["lag"], 0);
    let dlq = topics_json.iter().find(|t| t["role"] == "dlq").unwrap();
    assert_eq!(dlq["dead_letters"], 1);
    stop(worker);
}
