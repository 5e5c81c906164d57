//! The worker runtime in-process against the real broker and Redis, with a
//! scripted handler.

use std::time::{Duration, Instant};

use pipeline::envelope::{headers, Record};
use pipeline::produce::OutgoingRecord;
use serde_json::json;
use sluice_tests::*;

const HANG_GUARD: Duration = Duration::from_secs(90);

fn sluice_headers(record: &Record) -> Vec<&str> {
    record
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with(headers::PREFIX))
        .map(|(n, _)| n.as_str())
        .collect()
}

fn assert_one_of_each(record: &Record) {
    let names = sluice_headers(record);
    for name in [
        headers::VERSION,
        headers::JOB_ID,
        headers::ATTEMPT,
        headers::TIER,
        headers::ERROR_CLASS,
        headers::ERROR_MESSAGE,
        headers::ORIGIN_TOPIC,
        headers::ORIGIN_PARTITION,
        headers::ORIGIN_OFFSET,
    ] {
        assert_eq!(
            names.iter().filter(|n| **n == name).count(),
            1,
            "{name} in {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retryable_job_walks_tiers_to_dead_letter() {
    let settings = settings("walk", 1);
    let topics = Topics::create(&settings).await;
    let mut record = job(
        topics.main(),
        "job-walk",
        "key-1",
        json!({"mode": "fail", "n": 1}),
    );
    record
        .headers
        .insert(0, ("user-a".into(), Some(vec![0, 1, 2, 255])));
    record.headers.push(("user-empty".into(), None));
    record.headers.push((
        "traceparent".into(),
        Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec()),
    ));
    produce(std::slice::from_ref(&record)).await;

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("a dead letter", HANG_GUARD, || async {
        !read_all(&dlq).await.is_empty()
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &topics.all()[..3]).await == 0
    })
    .await;
    let summary = running.stop().await;

    let calls = handler.calls();
    let attempts: Vec<(u32, String)> = calls.iter().map(|c| (c.attempt, c.topic.clone())).collect();
    assert_eq!(
        attempts,
        vec![
            (1, topics.main().to_owned()),
            (2, topics.tier(0)),
            (3, topics.tier(1))
        ]
    );
    // Each tier waited for its delay after the failure before it.
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(900));
    assert!(calls[2].at.duration_since(calls[1].at) >= Duration::from_millis(1900));

    let source = read_all(topics.main()).await.remove(0);
    for (index, topic) in [topics.tier(0), topics.tier(1), topics.dlq()]
        .iter()
        .enumerate()
    {
        let copies = read_all(topic).await;
        assert_eq!(copies.len(), 1, "one copy on {topic}");
        let copy = &copies[0];
        assert_one_of_each(copy);
        assert_eq!(copy.key, source.key, "key on {topic}");
        assert_eq!(copy.value, source.value, "payload on {topic}");
        let user = |r: &Record| -> Vec<(String, Option<Vec<u8>>)> {
            r.headers
                .iter()
                .filter(|(n, _)| !n.starts_with(headers::PREFIX))
                .cloned()
                .collect()
        };
        assert_eq!(user(copy), user(&source), "user headers on {topic}");
        assert_eq!(header(&copy.headers, headers::JOB_ID), Some("job-walk"));
        assert_eq!(
            header(&copy.headers, headers::ATTEMPT),
            Some(["2", "3", "3"][index])
        );
        assert_eq!(
            header(&copy.headers, headers::ERROR_CLASS),
            Some("test_retryable")
        );
        assert_eq!(
            header(&copy.headers, headers::ORIGIN_TOPIC),
            Some(topics.main())
        );
        assert_eq!(header(&copy.headers, headers::ORIGIN_OFFSET), Some("0"));
    }
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(summary.retried, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_error_goes_straight_to_dead_letter() {
    let settings = settings("permanent", 1);
    let topics = Topics::create(&settings).await;
    produce(&[job(
        topics.main(),
        "job-reject",
        "k",
        json!({"mode": "reject"}),
    )])
    .await;

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("a dead letter", HANG_GUARD, || async {
        !read_all(&dlq).await.is_empty()
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &topics.all()[..1]).await == 0
    })
    .await;
    running.stop().await;

    assert_eq!(handler.calls().len(), 1);
    assert!(read_all(&topics.tier(0)).await.is_empty());
    let dead = read_all(&dlq).await;
    assert_eq!(header(&dead[0].headers, headers::ATTEMPT), Some("1"));
    assert_eq!(
        header(&dead[0].headers, headers::ERROR_CLASS),
        Some("test_permanent")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_records_dead_letter_and_neighbors_run() {
    let settings = settings("undecodable", 1);
    let topics = Topics::create(&settings).await;
    let raw = |value: Option<&[u8]>| OutgoingRecord {
        topic: topics.main().to_owned(),
        key: Some(b"same-key".to_vec()),
        payload: value.map(<[u8]>::to_vec),
        headers: vec![],
    };
    produce(&[
        job(topics.main(), "good-1", "same-key", json!({})),
        raw(None),
        raw(Some(&[0xff, 0xfe, 0x00])),
        raw(Some(b"{\"broken\": ")),
        OutgoingRecord {
            headers: vec![(headers::JOB_ID.to_owned(), Some(Vec::new()))],
            ..raw(Some(b"{}"))
        },
        raw(Some(format!("\"{}\"", "x".repeat(990_000)).as_bytes())),
        job(topics.main(), "good-2", "same-key", json!({})),
    ])
    .await;

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &[topics.main().to_owned()]).await == 0
    })
    .await;
    running.stop().await;

    let ran: Vec<String> = handler.calls().into_iter().map(|c| c.job_id).collect();
    assert_eq!(ran, vec!["good-1", "good-2"]);
    let dead = read_all(&topics.dlq()).await;
    let classes: Vec<&str> = dead
        .iter()
        .filter_map(|r| header(&r.headers, headers::ERROR_CLASS))
        .collect();
    assert_eq!(
        classes,
        vec![
            "null_value",
            "invalid_utf8",
            "invalid_json",
            "invalid_header",
            "oversized"
        ]
    );
    assert_eq!(dead[0].value, None);
    assert_eq!(dead[1].value.as_deref(), Some(&[0xff, 0xfe, 0x00][..]));
    assert_eq!(header(&dead[1].headers, headers::ORIGIN_OFFSET), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_job_id_twice_runs_once() {
    let settings = settings("twice", 2);
    let topics = Topics::create(&settings).await;
    // Different keys, so the copies may land on different partitions.
    produce(&[
        job(topics.main(), "dup-1", "a", json!({})),
        job(topics.main(), "dup-1", "b", json!({})),
        job(topics.main(), "other", "c", json!({})),
    ])
    .await;

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &[topics.main().to_owned()]).await == 0
    })
    .await;
    let summary = running.stop().await;

    let successes = handler.successes();
    assert_eq!(successes.get("dup-1"), Some(&1));
    assert_eq!(successes.get("other"), Some(&1));
    assert_eq!(summary.dedupe_skipped, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn panic_and_timeout_count_as_retryable() {
    let mut settings = settings("panic", 1);
    settings.worker.handler_timeout_ms = 300;
    settings.retry.tiers.truncate(1);
    let topics = Topics::create(&settings).await;
    produce(&[
        job(topics.main(), "panics-once", "a", json!({"mode": "panic"})),
        job(
            topics.main(),
            "too-slow",
            "b",
            json!({"mode": "sleep", "sleep_ms": 2000}),
        ),
    ])
    .await;

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    let dlq = topics.dlq();
    wait_until("the slow job dead-lettered", HANG_GUARD, || async {
        !read_all(&dlq).await.is_empty()
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(
            &settings.worker.group_id,
            &[topics.main().to_owned(), topics.tier(0)],
        )
        .await
            == 0
    })
    .await;
    running.stop().await;

    let successes = handler.successes();
    assert_eq!(successes.get("panics-once"), Some(&1));
    let retried = read_all(&topics.tier(0)).await;
    let classes: Vec<&str> = retried
        .iter()
        .filter_map(|r| header(&r.headers, headers::ERROR_CLASS))
        .collect();
    assert!(classes.contains(&"panic"), "{classes:?}");
    assert!(classes.contains(&"timeout"), "{classes:?}");
    let dead = read_all(&dlq).await;
    assert_eq!(header(&dead[0].headers, headers::JOB_ID), Some("too-slow"));
    assert_eq!(
        header(&dead[0].headers, headers::ERROR_CLASS),
        Some("timeout")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_pauses_handling_and_commits() {
    let mut redis = PrivateRedis::start();
    let mut settings = settings("redis-down", 2);
    settings.dedupe.redis_url = redis.url();
    let topics = Topics::create(&settings).await;
    let main = vec![topics.main().to_owned()];

    let handler = Scripted::default();
    let running = start(&settings, handler.clone());
    produce(&[job(topics.main(), "before", "k", json!({}))]).await;
    wait_until("the first job", HANG_GUARD, || async {
        handler.successes().contains_key("before")
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &main).await == 0
    })
    .await;

    redis.stop();
    let records: Vec<_> = (0..20)
        .map(|i| {
            job(
                topics.main(),
                &format!("during-{i}"),
                &format!("k{i}"),
                json!({}),
            )
        })
        .collect();
    produce(&records).await;
    // Long enough for several fetch, claim and commit rounds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        handler.calls().len(),
        1,
        "no job may run while Redis is down"
    );
    assert_eq!(
        lag(&settings.worker.group_id, &main).await,
        20,
        "nothing may be committed while Redis is down"
    );

    redis.resume();
    wait_until("all jobs after Redis returned", HANG_GUARD, || async {
        handler.successes().len() == 21
    })
    .await;
    wait_until("lag 0", HANG_GUARD, || async {
        lag(&settings.worker.group_id, &main).await == 0
    })
    .await;
    let summary = running.stop().await;
    assert!(summary.redis_errors > 0);
    assert!(handler.successes().values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_between_two_members_loses_nothing() {
    let settings = settings("rebalance", 6);
    let topics = Topics::create(&settings).await;
    let main = vec![topics.main().to_owned()];
    let count = 1200;
    let records: Vec<_> = (0..count)
        .map(|i| {
            job(
                topics.main(),
                &format!("r-{i}"),
                &format!("key-{}", i % 97),
                json!({"mode": "sleep", "sleep_ms": 5}),
            )
        })
        .collect();
    produce(&records).await;

    let handler = Scripted::default();
    let first = start(&settings, handler.clone());
    wait_until("some progress", HANG_GUARD, || async {
        handler.successes().len() >= 100
    })
    .await;
    let second = start(&settings, handler.clone());

    // Watch committed offsets: a commit for a revoked partition by the old
    // owner would show up as an offset moving backwards.
    let mut last: Vec<Option<i64>> = vec![None; 6];
    let started = Instant::now();
    let mut stopped_first = None;
    loop {
        for p in offsets(&settings.worker.group_id, topics.main()).await {
            let previous = last[p.partition as usize];
            assert!(
                previous.is_none_or(|prev| p.committed.is_some_and(|c| c >= prev)),
                "partition {} committed offset moved backwards: {previous:?} -> {:?}",
                p.partition,
                p.committed
            );
            last[p.partition as usize] = p.committed;
        }
        if stopped_first.is_none() && handler.successes().len() >= count / 2 {
            stopped_first = Some(first.shutdown.clone());
            first.shutdown.cancel();
        }
        if lag(&settings.worker.group_id, &main).await == 0 && handler.successes().len() == count {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.task.await.expect("first member");
    second.stop().await;

    let successes = handler.successes();
    assert_eq!(successes.len(), count, "every job ran");
    let repeated: Vec<_> = successes.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "jobs that ran twice: {repeated:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_tier_partition_moves_and_returns_on_time() {
    let mut settings = settings("paused-move", 1);
    settings.retry.tiers = vec![pipeline::config::TierSettings {
        name: "retry-6s".into(),
        delay_ms: 6_000,
        attempts: 1,
    }];
    let topics = Topics::create(&settings).await;
    produce(&[job(
        topics.main(),
        "moving",
        "k",
        json!({"mode": "fail_first"}),
    )])
    .await;

    let handler = Scripted::default();
    let first = start(&settings, handler.clone());
    wait_until("the first attempt", HANG_GUARD, || async {
        handler.calls().len() == 1
    })
    .await;
    let failed_at = handler.calls()[0].at;
    let tier = topics.tier(0);
    wait_until("the retry copy", HANG_GUARD, || async {
        !read_all(&tier).await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The first member holds the tier partition paused. Hand everything to
    // a second member, then back to a third, before the job is due.
    let second = start(&settings, handler.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.stop().await;
    let third = start(&settings, handler.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.stop().await;

    wait_until("the retry to run", HANG_GUARD, || async {
        handler.successes().contains_key("moving")
    })
    .await;
    let calls = handler.calls();
    let retry = calls.iter().find(|c| c.attempt == 2).expect("attempt 2");
    let waited = retry.at.duration_since(failed_at);
    assert!(
        waited >= Duration::from_millis(5_900),
        "retry ran early, after {waited:?}"
    );
    // Generous hang guard: a stranded pause would never resume at all.
    assert!(
        waited < Duration::from_secs(30),
        "retry ran late, after {waited:?}"
    );
    assert_eq!(calls.len(), 2, "{calls:?}");
    wait_until("lag 0", HANG_GUARD, || async {
        lag(
            &settings.worker.group_id,
            &[topics.main().to_owned(), tier.clone()],
        )
        .await
            == 0
    })
    .await;
    third.stop().await;
}
