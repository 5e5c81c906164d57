//! Replay, dead-letter redrive and group reset through the real `sluice`
//! binary, with workers running in-process on the real broker and Redis.

use std::process::{Command, Output};
use std::time::Duration;

use pipeline::envelope::headers;
use serde_json::{json, Value};
use sluice_tests::*;

const HANG_GUARD: Duration = Duration::from_secs(90);

fn sluice(args: &[&str]) -> Output {
    let brokers = brokers();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--brokers", &brokers]);
    let output = Command::new(sluice_binary())
        .args(&all)
        .output()
        .expect("run sluice");
    assert!(
        output.status.success(),
        "sluice {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn sluice_json(args: &[&str]) -> Value {
    let output = sluice(args);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "sluice {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

async fn drained(settings: &pipeline::config::PipelineSettings, topics: &Topics) {
    let all = topics.all();
    let consumed = all[..all.len() - 1].to_vec();
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &consumed).await == 0
    })
    .await;
}

fn runs_of(handler: &Scripted, id: &str) -> usize {
    handler
        .calls()
        .iter()
        .filter(|c| c.job_id == id && c.finished)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_from_offset_reruns_exact_range() {
    let settings = settings("replay-offset", 1);
    let topics = Topics::create(&settings).await;
    let records: Vec<_> = (0..10)
        .map(|i| job(topics.main(), &format!("ro-{i}"), "k", json!({"i": i})))
        .collect();
    produce(&records).await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    wait_until("ten runs", HANG_GUARD, || async {
        handler.successes().len() == 10
    })
    .await;
    drained(&settings, &topics).await;

    let summary = sluice_json(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-offset",
        "3",
        "--to-offset",
        "7",
        "--dedupe",
        "bypass",
        "--yes",
        "--json",
    ]);
    assert_eq!(summary["summary"]["replayed"], 4);
    wait_until("the replayed runs", HANG_GUARD, || async {
        handler.calls().len() == 14
    })
    .await;
    drained(&settings, &topics).await;
    running.stop().await;

    for i in 0..10 {
        let expected = if (3..7).contains(&i) { 2 } else { 1 };
        assert_eq!(
            runs_of(&handler, &format!("ro-{i}")),
            expected,
            "runs of ro-{i}"
        );
    }
    let log = read_all(topics.main()).await;
    assert_eq!(log.len(), 14);
    let sources: Vec<&str> = log[10..]
        .iter()
        .filter_map(|r| header(&r.headers, headers::REPLAY_SOURCE))
        .collect();
    let main = topics.main();
    assert_eq!(sources, [3, 4, 5, 6].map(|o| format!("{main}/0@{o}")));
    assert_eq!(log[10].value, log[3].value, "payload byte for byte");
    assert_eq!(log[10].key, log[3].key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_from_time_and_dry_run() {
    let settings = settings("replay-time", 1);
    let topics = Topics::create(&settings).await;
    for batch in 0..3 {
        let records: Vec<_> = (0..3)
            .map(|i| job(topics.main(), &format!("rt-{batch}-{i}"), "k", json!({})))
            .collect();
        produce(&records).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = read_all(topics.main()).await;
    let time_of = |index: usize| pipeline::recover::format_time(log[index].timestamp_ms.unwrap());
    let (from, to) = (time_of(3), time_of(6));

    let dry = sluice_json(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-time",
        &from,
        "--to-time",
        &to,
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry["records"], 3, "{dry}");
    assert_eq!(dry["partitions"][0]["start"], 3);
    assert_eq!(dry["partitions"][0]["end"], 6);
    assert_eq!(dry["range_ends"][0]["first_offset"], 3);
    assert_eq!(dry["range_ends"][0]["last_offset"], 5);
    assert_eq!(
        read_all(topics.main()).await.len(),
        9,
        "a dry run writes nothing"
    );

    let into = unique("replay-into");
    let target = Topics::create(&pipeline::config::PipelineSettings {
        topic: pipeline::config::TopicSettings {
            name: into.clone(),
            ..settings.topic.clone()
        },
        ..settings.clone()
    })
    .await;
    let done = sluice_json(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-time",
        &from,
        "--to-time",
        &to,
        "--into",
        &into,
        "--yes",
        "--json",
    ]);
    assert_eq!(done["summary"]["replayed"], 3);
    let copies = read_all(target.main()).await;
    let ids: Vec<&str> = copies
        .iter()
        .filter_map(|r| header(&r.headers, headers::JOB_ID))
        .collect();
    assert_eq!(ids, ["rt-1-0", "rt-1-1", "rt-1-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn future_time_and_empty_partition_replay_nothing() {
    let settings = settings("replay-empty", 2);
    let topics = Topics::create(&settings).await;
    produce(&[job(topics.main(), "only", "one-key", json!({}))]).await;

    let future = sluice_json(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-time",
        "2099-01-01T00:00:00Z",
        "--yes",
        "--json",
    ]);
    assert_eq!(future["replayed"], 0, "{future}");
    let notes: Vec<String> = future["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["note"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("after the last record")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("empty partition")),
        "{notes:?}"
    );

    let below = sluice_json(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-offset",
        "0",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(
        below["records"], 1,
        "the one record, from the partition that has it"
    );
    assert_eq!(
        read_all(topics.main()).await.len(),
        1,
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn respect_skips_done_and_bypass_reruns_each_time() {
    let settings = settings("replay-dedupe", 1);
    let topics = Topics::create(&settings).await;
    let records: Vec<_> = (0..3)
        .map(|i| job(topics.main(), &format!("rd-{i}"), "k", json!({})))
        .collect();
    produce(&records).await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    wait_until("three runs", HANG_GUARD, || async {
        handler.successes().len() == 3
    })
    .await;
    drained(&settings, &topics).await;

    sluice(&[
        "replay",
        "--topic",
        topics.main(),
        "--from-offset",
        "0",
        "--to-offset",
        "3",
        "--yes",
    ]);
    drained(&settings, &topics).await;
    for i in 0..3 {
        assert_eq!(
            runs_of(&handler, &format!("rd-{i}")),
            1,
            "respect skips rd-{i}"
        );
    }

    for round in 2..=3 {
        sluice(&[
            "replay",
            "--topic",
            topics.main(),
            "--from-offset",
            "0",
            "--to-offset",
            "3",
            "--dedupe",
            "bypass",
            "--yes",
        ]);
        wait_until("bypass runs", HANG_GUARD, || async {
            handler.successes().values().sum::<usize>() == 3 * round
        })
        .await;
        drained(&settings, &topics).await;
        for i in 0..3 {
            assert_eq!(
                runs_of(&handler, &format!("rd-{i}")),
                round,
                "bypass round {round} reruns rd-{i}"
            );
        }
    }
    let summary = running.stop().await;
    assert_eq!(summary.dedupe_skipped, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redrive_moves_dead_letters_back_once() {
    let settings = settings("redrive", 2);
    let topics = Topics::create(&settings).await;
    produce(&[
        job(
            topics.main(),
            "heals",
            "a",
            json!({"mode": "reject_until_redriven"}),
        ),
        job(
            topics.main(),
            "stays-broken",
            "b",
            json!({"mode": "reject"}),
        ),
    ])
    .await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("two dead letters", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 2
    })
    .await;
    drained(&settings, &topics).await;

    let listed = sluice(&["dlq", "list", "--topic", topics.main(), "--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines
        .iter()
        .all(|l| l["redrive_count"] == 0 && l["error_class"] == "test_permanent"));

    let dry = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry["redriven"], 2);
    assert_eq!(
        read_all(topics.main()).await.len(),
        2,
        "a dry run writes nothing"
    );
    let none = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--error-class",
        "no_such_class",
        "--yes",
        "--json",
    ]);
    assert_eq!(none["redriven"], 0);

    let first = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--yes",
        "--json",
    ]);
    assert_eq!(first["redriven"], 2);
    wait_until("the healed job", HANG_GUARD, || async {
        handler.successes().contains_key("heals")
    })
    .await;
    wait_until("the broken job dead again", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 3
    })
    .await;
    drained(&settings, &topics).await;

    // The cursor moved: only the new dead letter is redriven.
    let second = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--yes",
        "--json",
    ]);
    assert_eq!(second["redriven"], 1, "{second}");
    assert_eq!(second["redriven_job_ids"], json!(["stays-broken"]));
    wait_until("the broken job dead a third time", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 4
    })
    .await;
    drained(&settings, &topics).await;
    running.stop().await;

    let letters = read_all(&dlq).await;
    let counts: Vec<Option<&str>> = letters
        .iter()
        .filter(|r| header(&r.headers, headers::JOB_ID) == Some("stays-broken"))
        .map(|r| header(&r.headers, headers::REDRIVE_COUNT))
        .collect();
    let mut sorted = counts.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [None, Some("1"), Some("2")],
        "redrive counts of the broken job"
    );
    assert_eq!(runs_of(&handler, "heals"), 1);
    assert_eq!(
        read_all(topics.main()).await.len(),
        2 + 2 + 1,
        "two jobs, two redrives, then one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filtered_then_full_redrive_sends_each_once() {
    let settings = settings("redrive-filter", 1);
    let topics = Topics::create(&settings).await;
    let records: Vec<_> = (0..3)
        .map(|i| {
            job(
                topics.main(),
                &format!("rf-{i}"),
                "same",
                json!({"mode": "reject_until_redriven"}),
            )
        })
        .collect();
    produce(&records).await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("three dead letters", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 3
    })
    .await;
    drained(&settings, &topics).await;

    // The middle one first, then everything: each dead letter goes back once.
    let one = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--job-id",
        "rf-1",
        "--yes",
        "--json",
    ]);
    assert_eq!(one["redriven"], 1);
    let rest = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--yes",
        "--json",
    ]);
    assert_eq!(rest["redriven"], 2, "{rest}");
    assert_eq!(rest["already_redriven"], 1, "{rest}");
    assert_eq!(rest["redriven_job_ids"], json!(["rf-0", "rf-2"]));
    let again = sluice_json(&[
        "dlq",
        "redrive",
        "--topic",
        topics.main(),
        "--yes",
        "--json",
    ]);
    assert_eq!(again["redriven"], 0, "{again}");
    assert_eq!(again["dry_run"], false);

    wait_until("all three healed", HANG_GUARD, || async {
        handler.successes().len() == 3
    })
    .await;
    drained(&settings, &topics).await;
    running.stop().await;
    assert_eq!(
        read_all(topics.main()).await.len(),
        6,
        "three jobs and one redrive copy each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_concurrent_redrive_refuses() {
    let settings = settings("redrive-twice", 1);
    let topics = Topics::create(&settings).await;
    let records: Vec<_> = (0..6)
        .map(|i| {
            job(
                topics.main(),
                &format!("rc-{i}"),
                &format!("k{i}"),
                json!({"mode": "reject"}),
            )
        })
        .collect();
    produce(&records).await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("six dead letters", HANG_GUARD, || async {
        read_all(&dlq).await.len() == 6
    })
    .await;
    running.stop().await;

    let brokers = brokers();
    let slow = Command::new(sluice_binary())
        .args([
            "dlq",
            "redrive",
            "--topic",
            topics.main(),
            "--rate",
            "2/s",
            "--yes",
            "--json",
            "--brokers",
            &brokers,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Long enough for the first redrive to join its cursor group.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = Command::new(sluice_binary())
        .args([
            "dlq",
            "redrive",
            "--topic",
            topics.main(),
            "--yes",
            "--json",
            "--brokers",
            &brokers,
        ])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another redrive"), "{stderr}");

    let first = slow.wait_with_output().unwrap();
    assert!(first.status.success());
    let summary: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(summary["redriven"], 6);
    assert_eq!(
        read_all(topics.main()).await.len(),
        12,
        "each dead letter redriven once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_reset_refuses_live_group_and_moves_idle_one() {
    let settings = settings("reset", 2);
    let topics = Topics::create(&settings).await;
    let records: Vec<_> = (0..6)
        .map(|i| {
            job(
                topics.main(),
                &format!("gr-{i}"),
                &format!("k{i}"),
                json!({}),
            )
        })
        .collect();
    produce(&records).await;
    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    drained(&settings, &topics).await;
    wait_until("six runs", HANG_GUARD, || async {
        handler.successes().len() == 6
    })
    .await;

    let group = settings.worker.group_id.clone();
    let brokers = brokers();
    let refused = Command::new(sluice_binary())
        .args([
            "group",
            "reset",
            "--group",
            &group,
            "--topic",
            topics.main(),
            "--to-earliest",
            "--yes",
            "--brokers",
            &brokers,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("active member"), "{stderr}");
    let group_name = group.clone();
    let members = tokio::task::spawn_blocking(move || {
        pipeline::recover::group::members(&kafka(), &group_name)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(members.len(), 1);
    assert!(
        stderr.contains(&members[0].id),
        "names the member {}: {stderr}",
        members[0].id
    );
    running.stop().await;

    let dry = sluice_json(&[
        "group",
        "reset",
        "--group",
        &group,
        "--topic",
        topics.main(),
        "--to-earliest",
        "--dry-run",
        "--json",
    ]);
    assert!(dry["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["new"] == 0));
    let before = offsets(&group, topics.main()).await;
    assert!(
        before.iter().all(|p| p.committed == Some(p.log_end)),
        "a dry run writes nothing"
    );

    sluice(&[
        "group",
        "reset",
        "--group",
        &group,
        "--topic",
        topics.main(),
        "--to-earliest",
        "--yes",
    ]);
    let after = offsets(&group, topics.main()).await;
    assert!(
        after.iter().all(|p| p.committed == Some(p.log_start)),
        "{after:?}"
    );

    sluice(&[
        "group",
        "reset",
        "--group",
        &group,
        "--topic",
        topics.main(),
        "--to-offset",
        "1",
        "--partitions",
        "0",
        "--yes",
    ]);
    let moved = offsets(&group, topics.main()).await;
    assert_eq!(moved[0].committed, Some(1.min(moved[0].log_end)));
}
