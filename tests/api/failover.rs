//! Several broker addresses in `AMQP_URL`: a connection goes to the first that answers, and
//! a worker whose broker address stops answering reconnects to the next one. Against the one
//! local broker, reached directly and through a fault relay (two addresses of one broker);
//! the node-loss test on a real 3-node cluster is `cluster.rs`.

use std::time::Duration;

use walletq::Client;
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Money, Op, Status};

use crate::fault::Relay;
use crate::support::{RESULT_TIMEOUT, free_port, spawn_app_with};

/// The local broker's `host:port`, from its URL.
fn host_port(url: &str) -> String {
    let url = url::Url::parse(url).expect("AMQP_URL must be a URL");
    format!("{}:{}", url.host_str().expect("a host"), url.port().unwrap_or(5672))
}

#[tokio::test]
async fn an_address_list_connects_to_the_first_that_answers_and_names_each_that_did_not() {
    let real = crate::support::env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let (dead_a, dead_b) = (free_port(), free_port());
    let dead = |port: u16| format!("amqp://guest:secret-{port}@127.0.0.1:{port}/%2f");

    let list = format!("{}, {real}", dead(dead_a));
    let (connection, address) =
        walletq::broker::connect_reporting(&list, "failover test", None).await.expect("the second address answers");
    assert_eq!(address, host_port(&real), "connected to the address that answers");
    let _ = connection.close(200, "OK".into()).await;

    let error = walletq::broker::connect(&format!("{},{}", dead(dead_a), dead(dead_b)), "failover test", None)
        .await
        .expect_err("no address answers");
    let message = format!("{error:#}");
    for port in [dead_a, dead_b] {
        assert!(message.contains(&format!("127.0.0.1:{port}")), "names every address tried: {message}");
        assert!(!message.contains(&format!("secret-{port}")), "never a password: {message}");
    }
}

#[tokio::test]
async fn a_worker_and_a_producer_move_to_the_next_address_when_theirs_stops_answering() {
    let mut app = spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, false).await;
    let real = app.services.amqp_url.clone();
    let relay = Relay::start(&host_port(&real)).await;
    // Two addresses of one broker: the relay first, so every connection starts there.
    let list = format!("{},{real}", relay.through(&real));
    app.services.amqp_url = list.clone();
    app.start_worker();
    let namespace = app.services.namespace.clone();

    let client = Client::connect(&list, &namespace, None).await.expect("producer through the relay");
    let deposit =
        client.request("fo-1", Op::Deposit, Money::parse_amount("10.00").expect("amount"), None).expect("request");
    let result = client.submit_and_wait(&deposit, RESULT_TIMEOUT).await.expect("served through the relay");
    assert_eq!(result.status, Status::Approved);
    assert!(relay.connections() >= 3, "worker (session, router) and producer went to the first address");

    // The first address stops answering: every connection through it is reset, and so is
    // every new one.
    relay.cut();
    let started = tokio::time::Instant::now();
    let deadline = started + RESULT_TIMEOUT;
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "not served through the second address within {RESULT_TIMEOUT:?}"
        );
        // A producer whose connection died reconnects with the same list.
        let Ok(client) = Client::connect(&list, &namespace, None).await else { continue };
        let amount = Money::parse_amount("1.00").expect("amount");
        let request = client.request("fo-1", Op::Withdraw, amount, Some(&format!("fo-w-{attempt}"))).expect("request");
        match client.submit_and_wait_for(&request, Duration::from_secs(5)).await {
            Ok(Some(result)) => break result,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(result.status, Status::Approved, "{result:?}");
    assert_eq!(relay.connections(), 0, "nothing goes through the cut address any more");
    eprintln!("failover: served through the second address {:?} after the first was cut", started.elapsed());
    drop(relay);
    app.cleanup().await;
}
