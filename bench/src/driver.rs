//! Load generation. `clients` concurrent clients each take the next request, as fast as
//! they can or when it falls due at `rate`, and the recorder notes when and how it ended.
//!
//! Latency is end to end: from the moment a request is due (taken, or scheduled under
//! `--rate`, so a late start counts against the approach) to its verdict — the call's
//! return for direct approaches, the result's arrival on the reply queue for queued ones.
//!
//! A request that follows another (a payout's capture, see [`crate::workload::Workload::after`])
//! is not taken by a client: it falls due when the result of the one it follows arrives
//! approved, and a pool of as many publishers as there are clients sends it then, as a
//! payout service sends its capture once the hold is approved and the bank has paid.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::approaches::Direct;
use super::stats::{Outcome, Recorder};
use super::workload::request_index;
use walletq::broker::{self, Names, Publisher};
use walletq::domain::{Request, Status};

/// A direct request that takes longer than this counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A queued run stops waiting for results after this long without a new one.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Publishing clients that share one AMQP connection (each has its own channel).
const CLIENTS_PER_CONNECTION: u32 = 25;
/// Marks a request that was not sent yet.
const NOT_SENT: u64 = u64::MAX;

/// How hard to push.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent clients.
    pub clients: u32,
    /// Requests per second over all clients; as fast as possible when `None`.
    pub rate: Option<f64>,
}

/// What a run measured, and the first error it met (errors are counted, not fatal).
pub struct Measured {
    /// Latencies and verdict counts.
    pub recorder: Recorder,
    /// The first error met, to show beside the counts.
    pub first_error: Option<String>,
}

/// State shared by the clients of one run.
struct Run {
    requests: Arc<Vec<Request>>,
    /// The requests the clients take, in order (all but those that follow another).
    order: Vec<usize>,
    next: AtomicUsize,
    start: Instant,
    rate: Option<f64>,
    recorder: Mutex<Recorder>,
    first_error: Mutex<Option<String>>,
    progress: ProgressBar,
    settled: watch::Sender<u64>,
}

impl Run {
    /// A run of `requests`; the clients take those `after` does not make follow another.
    fn new(requests: Arc<Vec<Request>>, after: &[Option<usize>], load: &Load, progress: ProgressBar) -> Self {
        let order = (0..requests.len()).filter(|&i| after.get(i).copied().flatten().is_none()).collect();
        Run {
            recorder: Mutex::new(Recorder::new(requests.len())),
            requests,
            order,
            next: AtomicUsize::new(0),
            start: Instant::now(),
            rate: load.rate,
            first_error: Mutex::new(None),
            progress,
            settled: watch::Sender::new(0),
        }
    }

    /// The next request and when it is due; waits until then under `--rate`.
    async fn take(&self) -> Option<(usize, Instant)> {
        let position = self.next.fetch_add(1, Ordering::Relaxed);
        let index = *self.order.get(position)?;
        let due = match self.rate {
            Some(rate) => {
                let due = self.start + Duration::from_secs_f64(position as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        Some((index, due))
    }

    fn complete(&self, index: usize, outcome: Outcome, due: Instant) {
        let now = Instant::now();
        if let Ok(mut recorder) = self.recorder.lock() {
            recorder.complete(index, outcome, now.saturating_duration_since(due), now - self.start);
        }
        self.progress.inc(1);
        self.settled.send_modify(|n| *n += 1);
    }

    fn fail(&self, error: &anyhow::Error) {
        tracing::debug!(error = %format!("{error:#}"), "a request failed");
        if let Ok(mut recorder) = self.recorder.lock() {
            recorder.fail();
        }
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| format!("{error:#}"));
        }
        self.progress.inc(1);
        self.settled.send_modify(|n| *n += 1);
    }

    fn finish(self: Arc<Self>) -> Measured {
        self.progress.finish_and_clear();
        let first_error = self.first_error.lock().ok().and_then(|mut e| e.take());
        let recorder = match Arc::try_unwrap(self) {
            Ok(run) => run.recorder.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()),
            Err(shared) => {
                // A straggling task still holds the run: take a copy of the books instead.
                let mut recorder = shared.recorder.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                std::mem::replace(&mut *recorder, Recorder::new(0))
            }
        };
        Measured { recorder, first_error }
    }
}

/// Runs `requests` through a direct approach with `load.clients` concurrent callers.
pub async fn drive_direct<A: Direct>(
    approach: Arc<A>,
    requests: Arc<Vec<Request>>,
    load: &Load,
    progress: ProgressBar,
) -> Measured {
    let run = Arc::new(Run::new(requests, &[], load, progress));
    let mut clients = JoinSet::new();
    for _ in 0..load.clients.max(1) {
        let (run, approach) = (run.clone(), approach.clone());
        clients.spawn(async move {
            while let Some((index, due)) = run.take().await {
                match tokio::time::timeout(REQUEST_TIMEOUT, approach.execute(&run.requests[index])).await {
                    Ok(Ok(outcome)) => run.complete(index, outcome, due),
                    Ok(Err(error)) => run.fail(&error),
                    Err(_) => run.fail(&anyhow::anyhow!("no verdict within {REQUEST_TIMEOUT:?}")),
                }
            }
        });
    }
    while clients.join_next().await.is_some() {}
    run.finish()
}

/// Only what the bench reads of a result.
#[derive(Deserialize)]
struct ResultStatus {
    status: Status,
}

/// Requests that fall due when the result of the one they follow arrives: `(index, due)`.
type FollowUps = mpsc::UnboundedSender<(usize, Instant)>;

/// Reads the results on the run's reply queue and completes their requests, timed from
/// when each fell due (`due_ns`). A request that follows an approved one (`follow[i]`) is
/// handed to `follow_ups` then; one that follows a refused one is never sent (a payout
/// service does not capture a hold it did not get) and counts as refused.
async fn collect_results(
    mut consumer: lapin::Consumer,
    run: Arc<Run>,
    due_ns: Arc<Vec<AtomicU64>>,
    verdicts: bool,
    (follow, follow_ups): (Vec<Option<usize>>, FollowUps),
) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let correlation = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
        let Some(index) = correlation.as_deref().and_then(request_index) else {
            continue;
        };
        let Some(due) = due_ns.get(index).map(|d| d.load(Ordering::Acquire)).filter(|d| *d != NOT_SENT) else {
            continue;
        };
        let outcome = if !verdicts {
            Outcome::Echoed
        } else {
            match serde_json::from_slice::<ResultStatus>(&delivery.data) {
                Ok(ResultStatus { status: Status::Approved }) => Outcome::Approved,
                Ok(ResultStatus { status: Status::Rejected }) => Outcome::Rejected,
                Err(error) => {
                    run.fail(&anyhow::Error::from(error).context("a result that is not JSON"));
                    continue;
                }
            }
        };
        run.complete(index, outcome, run.start + Duration::from_nanos(due));
        if let Some(next) = follow.get(index).copied().flatten() {
            match outcome {
                Outcome::Rejected => run.complete(next, Outcome::Rejected, Instant::now()),
                _ => {
                    let _ = follow_ups.send((next, Instant::now()));
                }
            }
        }
    }
}

/// Publishes the requests handed over as they fall due, until the channel closes.
async fn publish_follow_ups(
    publisher: Publisher,
    run: Arc<Run>,
    due_ns: Arc<Vec<AtomicU64>>,
    (exchange, reply_queue): (String, String),
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(usize, Instant)>>>,
) {
    loop {
        let Some((index, due)) = queue.lock().await.recv().await else { return };
        let since_start = u64::try_from((due - run.start).as_nanos()).unwrap_or(NOT_SENT - 1);
        due_ns[index].store(since_start, Ordering::Release);
        if let Err(error) = publisher.publish_request(&exchange, &run.requests[index], Some(&reply_queue)).await {
            run.fail(&error);
        }
    }
}

/// Waits until every request is settled, or no result came for [`STALL_TIMEOUT`].
async fn wait_until_settled(run: &Run, total: u64) {
    let mut settled = run.settled.subscribe();
    loop {
        if *settled.borrow_and_update() >= total {
            return;
        }
        match tokio::time::timeout(STALL_TIMEOUT, settled.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let missing = total.saturating_sub(*settled.borrow());
                tracing::warn!(missing, "no result for {STALL_TIMEOUT:?}; reporting the run as incomplete");
                return;
            }
        }
    }
}

/// The connections and `count` confirming publishers over them ([`CLIENTS_PER_CONNECTION`]
/// publishers per connection).
async fn open_publishers(
    amqp_url: &str,
    ca_file: Option<&Path>,
    count: u32,
) -> anyhow::Result<(Vec<lapin::Connection>, Vec<Publisher>)> {
    let mut connections = Vec::new();
    for _ in 0..count.div_ceil(CLIENTS_PER_CONNECTION) {
        connections.push(broker::connect(amqp_url, "walletq bench publishers", ca_file).await?);
    }
    let mut publishers = Vec::new();
    for n in 0..count {
        publishers.push(Publisher::open(&connections[(n / CLIENTS_PER_CONNECTION) as usize]).await?);
    }
    Ok((connections, publishers))
}

/// Publishes `requests` to the partitioning exchange of `names` with `load.clients`
/// confirming publishers, and collects the results from a reply queue of its own.
/// `verdicts`: whether results carry a verdict (false for the broker echo). The requests
/// that follow another (`after`) are published by as many more publishers, each when the
/// result of the one it follows arrives.
pub async fn drive_queued(
    amqp_url: &str,
    ca_file: Option<&Path>,
    names: &Names,
    (requests, after): (Arc<Vec<Request>>, &[Option<usize>]),
    load: &Load,
    progress: ProgressBar,
    verdicts: bool,
) -> anyhow::Result<Measured> {
    let total = requests.len() as u64;
    let replies = broker::connect(amqp_url, "walletq bench results", ca_file).await?;
    let (reply_queue, consumer) = broker::open_reply_queue(&replies).await?;

    let clients = load.clients.max(1);
    let follows = after.iter().any(Option::is_some);
    let (connections, mut publishers) =
        open_publishers(amqp_url, ca_file, if follows { 2 * clients } else { clients }).await?;
    let followers = publishers.split_off(clients as usize);

    let run = Arc::new(Run::new(requests, after, load, progress));
    // When each request fell due, in nanoseconds since the start.
    let due_ns: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(NOT_SENT)).collect());
    let mut follow = vec![None; after.len()];
    for (j, i) in after.iter().enumerate() {
        if let Some(i) = *i {
            follow[i] = Some(j);
        }
    }
    let (follow_ups, queue) = mpsc::unbounded_channel();
    let collector =
        tokio::spawn(collect_results(consumer, run.clone(), due_ns.clone(), verdicts, (follow, follow_ups)));

    let exchange = names.requests_exchange();
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    let mut follow_up_tasks = JoinSet::new();
    for publisher in followers {
        let target = (exchange.clone(), reply_queue.clone());
        follow_up_tasks.spawn(publish_follow_ups(publisher, run.clone(), due_ns.clone(), target, queue.clone()));
    }
    let mut senders = JoinSet::new();
    for publisher in publishers {
        let (run, due_ns, exchange, reply_queue) = (run.clone(), due_ns.clone(), exchange.clone(), reply_queue.clone());
        senders.spawn(async move {
            while let Some((index, due)) = run.take().await {
                let since_start = u64::try_from((due - run.start).as_nanos()).unwrap_or(NOT_SENT - 1);
                due_ns[index].store(since_start, Ordering::Release);
                let request = &run.requests[index];
                if let Err(error) = publisher.publish_request(&exchange, request, Some(&reply_queue)).await {
                    run.fail(&error);
                }
            }
        });
    }
    while senders.join_next().await.is_some() {}

    wait_until_settled(&run, total).await;
    follow_up_tasks.abort_all();
    for connection in connections {
        let _ = connection.close(200, "OK".into()).await;
    }
    let _ = replies.close(200, "OK".into()).await;
    collector.abort();
    let _ = collector.await;
    while follow_up_tasks.join_next().await.is_some() {}
    Ok(run.finish())
}
