//! Chaos: three worker processes, one SIGKILLed every 2 s and replaced, Redis restarted,
//! the workers' PostgreSQL connections killed and RabbitMQ restarted, and now and then a
//! message no AMQP client can decode, all while 20,000 requests flow. Nothing may be lost,
//! applied twice or applied out of per-user order; every poison message ends dead-lettered.
//!
//! Its own test binary: it restarts shared services, so it must not run beside other tests
//! (cargo runs test binaries one after another).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "api/raw_amqp.rs"]
mod raw_amqp;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use helpers::{Lcg, SequentialModel, WorkerProcess, mixed_requests, spawn_app_with, spawn_worker_process_with};
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Request, Status};

const REQUESTS: usize = 20_000;
const USERS: u64 = 200;
const WINDOW: usize = 500;
const DEADLINE: Duration = Duration::from_secs(600);
/// Publishing is paced so the kills and outages hit a stream still in flight.
const PUBLISH_RATE_PER_SEC: u64 = 1_000;

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

async fn restart_redis() {
    tokio::task::spawn_blocking(|| {
        // Shutting down closes the connection, so redis-cli reports an error: ignore it.
        let _ = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"]).status();
        run(
            "redis-server",
            &["--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"],
        );
    })
    .await
    .expect("restart redis");
}

async fn restart_rabbitmq() {
    tokio::task::spawn_blocking(|| {
        run("rabbitmqctl", &["stop_app"]);
        run("rabbitmqctl", &["start_app"]);
        run("rabbitmqctl", &["await_startup"]);
    })
    .await
    .expect("restart rabbitmq");
}

/// Publishes every request with confirms in windows; after a broker failure it reconnects
/// and sends the unconfirmed window again (duplicates are replays, order is kept).
async fn publish_resilient(amqp_url: String, exchange: String, requests: Vec<Request>) -> usize {
    let mut resent_windows = 0;
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let started = tokio::time::Instant::now();
    for (index, window) in requests.chunks(WINDOW).enumerate() {
        let due = Duration::from_millis((index * WINDOW) as u64 * 1_000 / PUBLISH_RATE_PER_SEC);
        tokio::time::sleep_until(started + due).await;
        loop {
            if publisher.is_none() {
                match walletq::broker::connect(&amqp_url, "chaos publisher", None).await {
                    Ok(connection) => match Publisher::open(&connection).await {
                        Ok(p) => publisher = Some((connection, p)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    },
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
                continue;
            }
            let Some((_, current)) = &publisher else { continue };
            let attempt = async {
                let mut confirms = Vec::with_capacity(window.len());
                for r in window {
                    let properties = request_properties(r.request_id.as_str());
                    confirms.push(current.send(&exchange, r.user_id.as_str(), &r.to_json(), properties).await?);
                }
                for confirm in confirms {
                    Publisher::confirmed(confirm).await?;
                }
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                Ok(Ok(())) => break,
                _ => {
                    resent_windows += 1;
                    publisher = None;
                }
            }
        }
    }
    resent_windows
}

/// Publishes one message whose `app_id` is not UTF-8 (RabbitMQ takes it, lapin cannot
/// decode it). True when the broker confirmed it; false when it could not be sent (the
/// broker may be restarting).
async fn publish_poison(amqp_url: &str, exchange: &str, n: usize) -> bool {
    let url = url::Url::parse(amqp_url).expect("AMQP_URL must be a URL");
    let address = format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(5672));
    let Ok(mut raw) = raw_amqp::RawPublisher::connect(&address, url.username(), url.password().unwrap_or("")).await
    else {
        return false;
    };
    let user = format!("chaos-poison-{n}");
    let body = format!(r#"{{"request_id":"{user}","user_id":"{user}","op":"deposit","amount":"1.00"}}"#);
    let app_id = raw_amqp::RawProperty::AppId(b"\xff\xfe".to_vec());
    matches!(raw.publish(exchange, &user, &[app_id], body.as_bytes()).await, Ok(raw_amqp::Published::Acked))
}

/// Messages in `queue`, from a passive declaration on a fresh connection.
async fn queue_length(amqp_url: &str, queue: &str) -> Option<u32> {
    let connection = walletq::broker::connect(amqp_url, "chaos probe", None).await.ok()?;
    let channel = connection.create_channel().await.ok()?;
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await.ok()?;
    let _ = connection.close(200, "OK".into()).await;
    Some(declared.message_count())
}

async fn stored_count(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM requests").fetch_one(pool).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_outages_lose_nothing_and_keep_order() {
    let app = spawn_app_with(TopologySettings { partitions: 16, queue_type: QueueType::Quorum }, false).await;
    let requests = mixed_requests("c", REQUESTS, USERS, 4, 10_000, 2026);
    let mut rng = Lcg(7);

    // Worker logs at error only: the outages make every worker warn many times a second.
    let spawn = || spawn_worker_process_with(&app, &[("RUST_LOG", "error")]);
    let mut workers: Vec<WorkerProcess> = (0..3).map(|_| spawn()).collect();
    let publishing =
        tokio::spawn(publish_resilient(app.services.amqp_url.clone(), app.names.requests_exchange(), requests.clone()));

    let started = Instant::now();
    let (mut kills, mut outages, mut poisons) = (0usize, 0usize, 0usize);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tick.tick().await;
        assert!(started.elapsed() < DEADLINE, "chaos run did not finish within {DEADLINE:?}");
        let victim = rng.next_below(workers.len() as u64) as usize;
        workers[victim].kill();
        workers[victim] = spawn();
        kills += 1;
        match kills {
            1 => {
                restart_redis().await;
                outages += 1;
            }
            3 => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(&app.pool)
                .await
                .expect("kill the workers' PostgreSQL connections");
                outages += 1;
            }
            5 => {
                restart_rabbitmq().await;
                outages += 1;
            }
            // Every other tick, while requests flow: a message no client can decode.
            n if n % 2 == 0 && !publishing.is_finished() => {
                let exchange = app.names.requests_exchange();
                poisons += usize::from(publish_poison(&app.services.amqp_url, &exchange, n).await);
            }
            _ => {}
        }
        let stored = stored_count(&app.pool).await.unwrap_or(0);
        if outages == 3 && publishing.is_finished() && stored == REQUESTS as i64 {
            break;
        }
    }
    let resent_windows = publishing.await.expect("publisher");
    drop(workers);

    let stored = app.stored_results().await;
    let mut model = SequentialModel::default();
    let (mut lost, mut out_of_order, mut approved) = (0usize, 0usize, 0i64);
    for r in &requests {
        let (status, reason, balance) = model.apply(r);
        approved += i64::from(status == Status::Approved);
        match stored.get(r.request_id.as_str()) {
            None => lost += 1,
            Some(result) => {
                let matches = result.status == status
                    && result.reason.map(|x| x.as_str()) == reason
                    && result.balance.map(|b| b.cents()) == balance;
                out_of_order += usize::from(!matches);
            }
        }
    }
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries").fetch_one(&app.pool).await.expect("entries");
    let applied_twice = usize::try_from((entries - approved).max(0)).unwrap_or(usize::MAX);
    let audit = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
    // Only the poison messages are dead-lettered: valid traffic never is.
    let dead_queue = app.names.dead_queue();
    let poison_deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = queue_length(&app.services.amqp_url, &dead_queue).await;
        if dead.is_some_and(|d| d as usize >= poisons) || Instant::now() > poison_deadline {
            break dead.unwrap_or(0) as usize;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let poison_applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM requests WHERE request_id LIKE 'chaos-poison-%'")
            .fetch_one(&app.pool)
            .await
            .expect("poison count");

    let summary = format!(
        "chaos: {REQUESTS} requests, {kills} kills, {outages} outages, {poisons} poison messages ({dead} dead-lettered), \
         {lost} lost, {applied_twice} applied twice, {out_of_order} out of order \
         ({resent_windows} publish windows re-sent, {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    // Straight to the terminal, past the test harness's capture, so CI shows the figures.
    let _ = writeln!(std::io::stderr(), "{summary}");
    assert_eq!((lost, applied_twice, out_of_order), (0, 0, 0), "{summary}");
    assert_eq!(stored.len() - poison_applied as usize, REQUESTS, "exactly one stored result per request");
    assert_eq!(entries, approved, "one ledger entry per approved request");
    assert!(audit.is_clean(), "audit: {audit:?}");
    assert_eq!(poison_applied, 0, "no poison message was applied");
    assert!(poisons > 0, "the run published poison messages: {summary}");
    assert_eq!(dead, poisons, "exactly the poison messages are dead-lettered: {summary}");
    app.cleanup().await;
}
