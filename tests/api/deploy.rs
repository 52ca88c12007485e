//! docker-compose.yml against deploy/: every user, password, virtual host, database role
//! and permission a service names is one that deploy/ creates (RabbitMQ definitions, the
//! PostgreSQL roles script, the Redis ACL file). Docker may not run where the tests do, so
//! this static check is the guard, plus `docker compose config` when the CLI is there.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use regex_automata::meta::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What deploy/ creates.
struct Deploy {
    rabbitmq: Value,
    /// `*_role` variable of roles.sql → its default role name.
    pg_roles: HashMap<String, String>,
    /// Redis ACL user → SHA-256 of its password (hex) and its key patterns.
    redis_users: HashMap<String, (String, Vec<String>)>,
}

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn deploy() -> Deploy {
    let rabbitmq = serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).expect("definitions.json");
    let pg_roles = read("deploy/postgres/roles.sql")
        .lines()
        .filter_map(|line| line.strip_prefix("\\set "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(var, _)| var.ends_with("_role"))
        .map(|(var, name)| (var.to_owned(), name.trim().to_owned()))
        .collect();
    let redis_users = read("deploy/redis/users.acl")
        .lines()
        .filter_map(|line| line.strip_prefix("user "))
        .filter(|rest| rest.split_whitespace().any(|w| w == "on"))
        .filter_map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let hash = words.iter().find_map(|w| w.strip_prefix('#'))?.to_owned();
            let keys = words.iter().filter_map(|w| w.strip_prefix('~')).map(str::to_owned).collect();
            Some((words[0].to_owned(), (hash, keys)))
        })
        .collect();
    Deploy { rabbitmq, pg_roles, redis_users }
}

/// `(service, text of its lines)` of every service in a compose file.
fn services(compose: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            inside = line.trim_end() == "services:";
            continue;
        }
        match line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            Some(name) if inside && !name.starts_with(' ') && !name.starts_with('#') => {
                found.push((name.to_owned(), String::new()))
            }
            _ => {
                if let Some((_, text)) = found.last_mut().filter(|_| inside) {
                    text.push_str(line.split(" #").next().unwrap_or_default());
                    text.push('\n');
                }
            }
        }
    }
    found
}

/// Every service URL in `text` (values such as `amqp://user:password@host:port/vhost`).
fn urls(text: &str) -> Vec<url::Url> {
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .filter_map(|word| {
            let at = word.find("://")?;
            let start = word[..at].rfind(|c: char| !c.is_ascii_alphabetic()).map_or(0, |j| j + 1);
            url::Url::parse(&word[start..]).ok()
        })
        .filter(|url| ["amqp", "amqps", "postgres", "redis", "rediss"].contains(&url.scheme()))
        .collect()
}

/// The value of `-v name=value` in `text`.
fn psql_variable<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!("-v {name}=");
    let start = text.find(&needle)? + needle.len();
    text[start..].split_whitespace().next()
}

fn percent_decoded(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ‖ SHA-256(salt ‖ password)).
fn rabbit_password_matches(hash: &str, password: &str) -> bool {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(hash) else { return false };
    bytes.len() == 36 && Sha256::new().chain_update(&bytes[..4]).chain_update(password).finalize()[..] == bytes[4..]
}

/// What each compose service does on the broker (namespace `walletq`): (configure, write, read).
fn broker_needs(service: &str) -> Option<[&'static [&'static str]; 3]> {
    match service {
        "worker" => Some([
            &[
                "walletq.requests",
                "walletq.ingress",
                "walletq.dead",
                "walletq.results",
                "walletq.requests.0",
                "walletq.ingress.owner",
                "walletq.requests.0.owner",
            ],
            &["walletq.ingress", "walletq.requests.0", "walletq.dead", "walletq.results", "amq.default"],
            &["walletq.requests", "walletq.ingress", "walletq.requests.0", "walletq.dead"],
        ]),
        // Publish requests; its own server-named reply queue; nothing else.
        "gateway" => Some([&["amq.gen-Xy1"], &["walletq.requests"], &["amq.gen-Xy1"]]),
        _ => None,
    }
}

/// What the gateway must not do: consume a partition, publish past the router.
const GATEWAY_FORBIDDEN: [(usize, &str); 3] = [(2, "walletq.requests.0"), (1, "amq.default"), (0, "walletq.ingress")];

fn check_amqp(deploy: &Deploy, service: &str, url: &url::Url, problems: &mut Vec<String>) {
    let user = percent_decoded(url.username());
    let vhost = percent_decoded(url.path().trim_start_matches('/'));
    let vhost = if vhost.is_empty() { "/".to_owned() } else { vhost };
    let defs = &deploy.rabbitmq;
    let Some(entry) = defs["users"].as_array().into_iter().flatten().find(|u| u["name"] == user.as_str()) else {
        return problems.push(format!("{service}: RabbitMQ user {user:?} is not in definitions.json"));
    };
    let password = percent_decoded(url.password().unwrap_or_default());
    if !rabbit_password_matches(entry["password_hash"].as_str().unwrap_or_default(), &password) {
        problems
            .push(format!("{service}: the password of RabbitMQ user {user:?} is not the one definitions.json hashes"));
    }
    if !defs["vhosts"].as_array().into_iter().flatten().any(|v| v["name"] == vhost.as_str()) {
        problems.push(format!("{service}: RabbitMQ virtual host {vhost:?} is not in definitions.json"));
    }
    let permissions = defs["permissions"].as_array().into_iter().flatten();
    let Some(granted) = permissions.into_iter().find(|p| p["user"] == user.as_str() && p["vhost"] == vhost.as_str())
    else {
        return problems.push(format!("{service}: RabbitMQ user {user:?} has no permissions on {vhost:?}"));
    };
    let pattern = |i: usize| {
        let key = ["configure", "write", "read"][i];
        Regex::new(granted[key].as_str().unwrap_or("^$")).expect("a permission regex")
    };
    for (i, needed) in broker_needs(service).into_iter().flatten().enumerate() {
        for resource in needed {
            if !pattern(i).is_match(resource) {
                problems.push(format!("{service}: {user:?} lacks {} on {resource}", ["configure", "write", "read"][i]));
            }
        }
    }
    for (i, resource) in GATEWAY_FORBIDDEN.iter().filter(|_| service == "gateway") {
        if pattern(*i).is_match(resource) {
            problems.push(format!(
                "{service}: {user:?} may {} {resource}, more than it needs",
                ["configure", "write", "read"][*i]
            ));
        }
    }
}

fn check_postgres(
    deploy: &Deploy,
    all: &[(String, String)],
    service: &str,
    url: &url::Url,
    problems: &mut Vec<String>,
) {
    let user = url.username();
    let password = url.password().unwrap_or_default();
    let text = |name: &str| all.iter().find(|(s, _)| s == name).map(|(_, t)| t.as_str()).unwrap_or_default();
    let (expected_password, ddl) = if user == "postgres" {
        (text("postgres").split("POSTGRES_PASSWORD:").nth(1).and_then(|r| r.split_whitespace().next()), true)
    } else if let Some((var, _)) = deploy.pg_roles.iter().find(|(_, name)| name.as_str() == user) {
        let password_var = var.replace("_role", "_password");
        (all.iter().find_map(|(_, t)| psql_variable(t, &password_var)), var == "migrator_role")
    } else {
        return problems.push(format!("{service}: PostgreSQL role {user:?} is not created by roles.sql"));
    };
    if expected_password != Some(password) {
        problems.push(format!("{service}: PostgreSQL role {user:?} is given another password than its URL's"));
    }
    let database = url.path().trim_start_matches('/');
    if !all.iter().any(|(_, t)| t.contains(&format!("createdb {database}"))) {
        problems.push(format!("{service}: no service creates database {database:?}"));
    }
    let service_text = text(service);
    if !ddl && !service_text.contains("WALLETQ_NO_MIGRATE: \"true\"") && !service_text.contains("\"migrate\"") {
        problems.push(format!("{service}: role {user:?} has no DDL rights, so the service needs WALLETQ_NO_MIGRATE"));
    }
    if service == "gateway" && deploy.pg_roles.get("gateway_role").map(String::as_str) != Some(user) {
        problems.push(format!("{service}: connects as {user:?}, not as the read-only gateway role"));
    }
}

fn check_redis(deploy: &Deploy, service: &str, url: &url::Url, problems: &mut Vec<String>) {
    let user = if url.username().is_empty() { "default" } else { url.username() };
    let Some((hash, keys)) = deploy.redis_users.get(user) else {
        return problems.push(format!("{service}: Redis user {user:?} is not enabled in users.acl"));
    };
    if &hex::encode(Sha256::digest(url.password().unwrap_or_default())) != hash {
        problems.push(format!("{service}: the password of Redis user {user:?} is not the one users.acl hashes"));
    }
    if !keys.iter().any(|k| k == "*" || k == "walletq:*") {
        problems.push(format!("{service}: Redis user {user:?} may not use the walletq:* keys"));
    }
}

/// Every mismatch between a compose file and deploy/.
fn problems(compose: &str, deploy: &Deploy) -> Vec<String> {
    let all = services(compose);
    let mut problems = Vec::new();
    for (service, text) in &all {
        for url in urls(text) {
            match url.scheme() {
                "amqp" | "amqps" => check_amqp(deploy, service, &url, &mut problems),
                "postgres" => check_postgres(deploy, &all, service, &url, &mut problems),
                _ => check_redis(deploy, service, &url, &mut problems),
            }
        }
        // The Redis health check logs in as a user of its own.
        if let Some(rest) = text.split("\"--user\", \"").nth(1) {
            let user = rest.split('"').next().unwrap_or_default();
            let password = text.split("\"--pass\", \"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
            let url = url::Url::parse(&format!("redis://{user}:{password}@redis")).expect("a URL");
            check_redis(deploy, service, &url, &mut problems);
        }
    }
    problems
}

#[test]
fn every_credential_and_permission_in_compose_is_created_by_deploy() {
    let compose = read("docker-compose.yml");
    let deploy = deploy();
    let names: Vec<String> = services(&compose).into_iter().map(|(s, _)| s).collect();
    assert!(
        ["rabbitmq", "postgres", "worker", "gateway", "migrate"].iter().all(|s| names.iter().any(|n| n == s)),
        "{names:?}"
    );
    let found = problems(&compose, &deploy);
    assert!(found.is_empty(), "docker-compose.yml names what deploy/ does not create:\n{}", found.join("\n"));
}

#[test]
fn the_check_catches_a_user_password_vhost_role_or_permission_deploy_does_not_create() {
    let compose = read("docker-compose.yml");
    let deploy = deploy();
    for (from, to, expected) in [
        // The defect this check was written for: a gateway user nobody creates.
        (
            "amqp://walletq-gateway:walletq-gateway-dev@",
            "amqp://walletq:walletq@",
            "\"walletq\" is not in definitions.json",
        ),
        (
            "walletq-gateway:walletq-gateway-dev@rabbitmq",
            "walletq-gateway:wrong@rabbitmq",
            "not the one definitions.json hashes",
        ),
        ("walletq-worker-dev@rabbitmq:5672/%2f", "walletq-worker-dev@rabbitmq:5672/other", "virtual host \"other\""),
        (
            "amqp://walletq-gateway:walletq-gateway-dev@",
            "amqp://walletq-worker:walletq-worker-dev@",
            "lacks write on walletq.requests",
        ),
        (
            "postgres://walletq_gateway:walletq-gateway-dev@",
            "postgres://walletq_reader:x@",
            "\"walletq_reader\" is not created",
        ),
        (
            "postgres://walletq_gateway:walletq-gateway-dev@",
            "postgres://postgres:walletq@",
            "not as the read-only gateway role",
        ),
        ("gateway_password=walletq-gateway-dev", "gateway_password=other", "another password"),
        ("redis://walletq:walletq-worker-dev@", "redis://walletq:nope@", "not the one users.acl hashes"),
        ("redis://walletq:walletq-worker-dev@", "redis://redis@", "\"redis\" is not enabled"),
    ] {
        assert!(compose.contains(from), "the compose file no longer has {from:?}");
        let broken = compose.replacen(from, to, 1);
        let found = problems(&broken, &deploy);
        assert!(found.iter().any(|p| p.contains(expected)), "{to:?}: expected {expected:?} in {found:#?}");
    }
    let no_flag = compose.replacen(
        "      WALLETQ_NO_MIGRATE: \"true\"\n      AMQP_URL: amqp://walletq-gateway",
        "      AMQP_URL: amqp://walletq-gateway",
        1,
    );
    assert!(problems(&no_flag, &deploy).iter().any(|p| p.contains("needs WALLETQ_NO_MIGRATE")));
}

#[test]
fn docker_compose_config_accepts_the_file_when_the_cli_is_installed() {
    let root = env!("CARGO_MANIFEST_DIR");
    let present = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("docker compose is not installed here: only the static check ran");
        return;
    }
    let output =
        Command::new("docker").args(["compose", "config", "--quiet"]).current_dir(root).output().expect("docker");
    assert!(output.status.success(), "docker compose config: {}", String::from_utf8_lossy(&output.stderr));
}
