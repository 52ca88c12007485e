//! Least privilege: the broker users of `scripts/rabbitmq-roles.sh`, the PostgreSQL roles
//! of `deploy/postgres/roles.sql` and the Redis ACL user of `deploy/redis/users.acl` are
//! each enough to run, and refuse the rest (a producer can't read a partition queue, the
//! worker role runs no DDL and deletes nothing, the Redis user sees only its keys).

use std::process::Command;
use std::time::Duration;

use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use walletq::Client;
use walletq::broker::{Publisher, json_properties};
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Money, Op, Status, UserId};
use walletq::ledger::audit::audit;
use walletq::ledger::{Ledger, Schema};
use walletq::lock::{LockAttempt, UserLocks};
use walletq::membership::{Membership, WorkerReport};

use crate::support::{
    CleanupOnDrop, drop_database, env_or, isolated_services, remove_redis_keys, request, spawn_app_with,
};

/// RabbitMQ users made for one test, deleted when dropped (also when the test fails).
struct BrokerUsers(Vec<String>);

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("rabbitmqctl").args(["--quiet", "delete_user", name]).output();
        }
    }
}

/// `base` with another user and password.
fn url_for(base: &str, user: &str, password: &str) -> String {
    let mut url = url::Url::parse(base).expect("AMQP_URL must be a URL");
    url.set_username(user).expect("user");
    url.set_password(Some(password)).expect("password");
    url.to_string()
}

#[tokio::test]
async fn broker_roles_let_each_side_do_its_job_and_nothing_else() {
    let mut app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Classic }, false).await;
    let namespace = app.names.namespace().to_owned();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (producer, worker) = (format!("wq-producer-{suffix}"), format!("wq-worker-{suffix}"));
    let (producer_password, worker_password) =
        (uuid::Uuid::new_v4().simple().to_string(), uuid::Uuid::new_v4().simple().to_string());
    let _users = BrokerUsers(vec![producer.clone(), worker.clone()]);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-roles.sh");
    let output = Command::new(script)
        .args(["--namespace", &namespace, "--producer", &producer, "--worker", &worker])
        .env("WALLETQ_PRODUCER_PASSWORD", &producer_password)
        .env("WALLETQ_WORKER_PASSWORD", &worker_password)
        .output()
        .expect("run scripts/rabbitmq-roles.sh");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rabbitmq-roles.sh failed: {printed}");
    assert!(!printed.contains(&producer_password) && !printed.contains(&worker_password), "a password was printed");

    // The worker runs with its own user: declares the topology, consumes, publishes results.
    let guest_url = app.services.amqp_url.clone();
    app.services.amqp_url = url_for(&guest_url, &worker, &worker_password);
    app.start_worker();

    // The producer publishes a request and reads its result from its own reply queue.
    let producer_url = url_for(&guest_url, &producer, &producer_password);
    let client = Client::connect(&producer_url, &namespace, None).await.expect("the producer connects");
    let request = client.request("alice", Op::Deposit, Money::from_cents(500).expect("amount"), None).expect("request");
    let result = client.submit_and_wait(&request, Duration::from_secs(30)).await.expect("a result for the producer");
    assert_eq!(result.status, Status::Approved);

    // But it can't read a partition queue …
    let connection = walletq::broker::connect(&producer_url, "producer probe", None).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let refused = channel
        .basic_consume(
            app.names.partition_queue(0).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("a producer must not consume a partition queue");
    assert!(refused.to_string().contains("ACCESS_REFUSED"), "{refused}");

    // … nor publish straight into one through the default exchange, past the router.
    let publisher = Publisher::open(&connection).await.expect("publisher");
    let sent = match publisher.send("", &app.names.partition_queue(0), &request.to_json(), json_properties()).await {
        Ok(confirm) => Publisher::confirmed(confirm).await,
        Err(error) => Err(error),
    };
    let refused = sent.expect_err("a producer must not write to the default exchange");
    assert!(format!("{refused:#}").contains("ACCESS_REFUSED"), "{refused:#}");
    let _ = connection.close(200, "OK".into()).await;

    app.services.amqp_url = guest_url;
    app.cleanup().await;
}

/// PostgreSQL roles made for one test, dropped when dropped (with their database).
struct DatabaseRoles {
    namespace: String,
    roles: Vec<String>,
}

impl Drop for DatabaseRoles {
    fn drop(&mut self) {
        let (namespace, roles) = (self.namespace.clone(), self.roles.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                drop_database(&namespace).await;
                let admin = sqlx::PgPool::connect(&database_url("postgres")).await.expect("admin connection");
                for role in roles {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS \"{role}\"")))
                        .execute(&admin)
                        .await;
                }
            });
        });
        let _ = dropped.join();
    }
}

/// The test database URL with another database and, when given, another user.
fn database_url(database: &str) -> String {
    let mut url = url::Url::parse(&env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq"))
        .expect("DATABASE_URL must be a URL");
    url.set_path(database);
    url.to_string()
}

fn as_user(database_url: &str, user: &str) -> String {
    let mut url = url::Url::parse(database_url).expect("URL");
    url.set_username(user).expect("user");
    url.to_string()
}

fn run_roles_sql(database_url: &str, migrator: &str, worker: &str, gateway: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/roles.sql");
    let output = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database_url, "-f", script])
        .args(["-v", &format!("migrator_role={migrator}"), "-v", &format!("worker_role={worker}")])
        .args(["-v", &format!("gateway_role={gateway}")])
        .output()
        .expect("run psql");
    assert!(output.status.success(), "roles.sql failed: {}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
async fn the_database_worker_role_applies_batches_but_runs_no_ddl_and_deletes_nothing() {
    let services = isolated_services();
    let namespace = services.namespace.clone();
    let (migrator, worker, gateway) = (format!("m_{namespace}"), format!("w_{namespace}"), format!("g_{namespace}"));
    let roles = vec![migrator.clone(), worker.clone(), gateway.clone()];
    let _roles = DatabaseRoles { namespace: namespace.clone(), roles };
    let admin_url = services.database_url.clone();
    let admin = sqlx::PgPool::connect(&database_url("postgres")).await.expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"walletq_{namespace}\"")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;

    // Roles, then migrate as the migrator, then the table grants.
    run_roles_sql(&admin_url, &migrator, &worker, &gateway);
    let migrated = Ledger::connect(&as_user(&admin_url, &migrator), 1, None).await.expect("the migrator migrates");
    migrated.pool().close().await;
    run_roles_sql(&admin_url, &migrator, &worker, &gateway);

    // The worker role: no DDL at connect, batches apply, the audit reads everything.
    let ledger = Ledger::connect_with(&as_user(&admin_url, &worker), 2, None, Schema::Check)
        .await
        .expect("the worker role connects without DDL");
    let batch = [request("d1", "alice", Op::Deposit, 30_000), request("w1", "alice", Op::Withdraw, 10_000)];
    let fences = [(UserId::parse("alice").expect("user"), 1)];
    let results = ledger.apply_batch(&batch, &fences).await.expect("the worker role applies a batch");
    assert!(results.iter().all(|r| r.status == Status::Approved), "{results:?}");
    assert!(audit(ledger.pool()).await.expect("the worker role audits").is_clean());

    // The gateway role reads what the gateway shows, and writes nothing at all.
    let reader = Ledger::connect_with(&as_user(&admin_url, &gateway), 1, None, Schema::Check)
        .await
        .expect("the gateway role connects without DDL");
    let alice = UserId::parse("alice").expect("user");
    let wallet = reader.wallet(&alice).await.expect("the gateway role reads wallets and coupons");
    assert_eq!(wallet.map(|w| w.balance.to_string()), Some("200.00".to_owned()));
    let stored = reader.stored_result(&batch[1].request_id).await.expect("the gateway role reads results");
    assert_eq!(stored.map(|r| r.status), Some(Status::Approved));
    // A repeated Idempotency-Key reads the stored request; GET /v1/holds/{hold_id} a hold.
    let request = reader.stored_request(&batch[1].request_id).await.expect("the gateway role reads requests");
    assert_eq!(request.map(|r| r.request), Some(batch[1].clone()));
    let hold = reader.hold(&alice, &batch[1].request_id).await.expect("the gateway role reads holds");
    assert_eq!(hold, None, "a deposit is no hold");
    for forbidden in [
        "INSERT INTO wallets (user_id, balance) VALUES ('mallory', 1000)",
        "UPDATE wallets SET balance = 1000",
        "SELECT count(*) FROM ledger_entries",
        "SELECT count(*) FROM user_fences",
        "CREATE TABLE stolen (id int)",
    ] {
        let refused = sqlx::query(forbidden).execute(reader.pool()).await.expect_err(forbidden);
        let code = refused.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        // 42501: insufficient privilege; 25006: read-only transaction.
        assert!(matches!(code.as_deref(), Some("42501" | "25006")), "{forbidden}: {refused}");
    }
    reader.pool().close().await;

    // Nothing else: no DDL, no deletes, no rewriting of the append-only tables.
    for forbidden in [
        "DELETE FROM ledger_entries",
        "DELETE FROM requests",
        "TRUNCATE wallets",
        "UPDATE requests SET status = 'approved'",
        "UPDATE coupons SET kind = 'lifetime_20_off'",
        "CREATE TABLE stolen (id int)",
        "ALTER TABLE wallets DROP CONSTRAINT wallets_balance_check",
        "DROP TABLE coupons",
    ] {
        let refused = sqlx::query(forbidden).execute(ledger.pool()).await.expect_err(forbidden);
        let code = refused.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert!(
            matches!(code.as_deref(), Some("42501")) || refused.to_string().contains("must be owner"),
            "{forbidden}: {refused}"
        );
    }
    ledger.pool().close().await;
}

/// Redis ACL users made for one test, deleted when dropped.
struct RedisUser(String);

impl Drop for RedisUser {
    fn drop(&mut self) {
        let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
        let _ = Command::new("redis-cli").args(["-u", &redis_url, "ACL", "DELUSER", &self.0]).output();
    }
}

#[tokio::test]
async fn the_redis_acl_user_is_enough_for_locks_and_membership_and_nothing_else() {
    let services = isolated_services();
    let namespace = services.namespace.clone();
    // The rules of deploy/redis/users.acl's `walletq` user, for this test's namespace.
    let acl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/redis/users.acl")).expect("acl");
    let line = acl.lines().find(|l| l.starts_with("user walletq ")).expect("a walletq user in users.acl");
    let password = uuid::Uuid::new_v4().simple().to_string();
    let user = format!("wq-{namespace}");
    let mut rules: Vec<String> = line
        .split_whitespace()
        .skip(2)
        .filter(|rule| !rule.starts_with('#') && !rule.starts_with('>'))
        .map(|rule| if rule == "~walletq:*" { format!("~{namespace}:*") } else { rule.to_owned() })
        .collect();
    rules.push(format!(">{password}"));
    let admin = redis::Client::open(services.redis_url.as_str()).expect("redis url");
    let mut admin = admin.get_multiplexed_async_connection().await.expect("redis");
    let _user = RedisUser(user.clone());
    let _keys = CleanupOnDrop::new({
        let (redis_url, namespace) = (services.redis_url.clone(), namespace.clone());
        async move { remove_redis_keys(&redis_url, &namespace).await }
    });
    let _: () =
        redis::cmd("ACL").arg("SETUSER").arg(&user).arg(&rules).query_async(&mut admin).await.expect("ACL SETUSER");

    let mut url = url::Url::parse(&services.redis_url).expect("REDIS_URL");
    url.set_username(&user).expect("user");
    url.set_password(Some(&password)).expect("password");
    let url = url.to_string();
    // Locks: take, extend, release, ping.
    let locks = UserLocks::connect(&url, None, &namespace, 2_000).await.expect("locks connect as the ACL user");
    let alice = UserId::parse("alice").expect("user");
    let grant = match locks.try_acquire(std::slice::from_ref(&alice)).await.expect("acquire") {
        LockAttempt::Granted(grant) => grant,
        LockAttempt::Contended(user) => panic!("{user} is locked in a fresh namespace"),
    };
    assert!(locks.extend(&grant).await.expect("extend"));
    locks.release(&grant).await.expect("release");
    locks.ping().await.expect("ping");
    // Membership: heartbeat, snapshot (walletq status), leave.
    let membership = Membership::connect(&url, None, &namespace, "w1", 3_000).await.expect("membership connects");
    let report = WorkerReport {
        worker_id: "w1".into(),
        started_at: chrono::Utc::now(),
        heartbeat_at: chrono::Utc::now(),
        partitions: vec![0],
        version: Some("0.2.0".into()),
        router_forwarded_at: None,
        broker: None,
    };
    let live = membership.heartbeat(&report, &[]).await.expect("heartbeat");
    assert_eq!(live, vec!["w1".to_owned()]);
    let snapshot = walletq::membership::snapshot(&url, None, &namespace, 3_000).await.expect("snapshot");
    assert_eq!(snapshot.workers.len(), 1);
    membership.leave().await.expect("leave");

    // Other keys and other commands are refused.
    let mut redis =
        redis::Client::open(url.as_str()).expect("url").get_multiplexed_async_connection().await.expect("c");
    for (command, args) in [("GET", vec!["other:key".to_owned()]), ("KEYS", vec!["*".to_owned()]), ("FLUSHALL", vec![])]
    {
        let refused: redis::RedisResult<redis::Value> = redis::cmd(command).arg(&args).query_async(&mut redis).await;
        let refused = refused.expect_err(command);
        assert!(refused.to_string().to_lowercase().contains("noperm"), "{command}: {refused}");
    }
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{namespace}:*")).query_async(&mut admin).await.expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut admin).await.expect("del");
    }
}
